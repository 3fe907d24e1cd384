"""Progress bars (synapse/cli/progress.py): drawn on stderr when it is a terminal, nothing
otherwise; stdout is the same bytes either way (`--output json` stays parseable); the library
functions behind the long commands report ``progress(done, total)`` from 0 up to done ==
total. Real nodes; a pseudo-terminal stands for a person's terminal on stderr."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import struct
import subprocess
import termios
import threading
from pathlib import Path

import pytest
from rich.console import Console

import synapse
from synapse.chaos.runner import Run, RunConfig
from synapse.cli import progress
from synapse.client import Client
from synapse.config import NodeConfig
from synapse.integrity import backup
from synapse.integrity.audit import verify
from tests.harness import SYNAPSE, Cluster, free_ports, wait_until

# Variables that would make rich draw on a pipe (or not on a terminal), whatever the test means.
_RICH_VARIABLES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", progress.ENV)
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    for name in _RICH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RICH_VARIABLES}
    env.update(TERM="xterm", COLUMNS="100", LINES="25")
    return env


def _run(*args: str, tty: bool) -> tuple[subprocess.CompletedProcess, str]:
    """The command with stdout on a pipe and stderr on a pipe or (``tty``) a pseudo-terminal:
    the result, and what the terminal received (escape codes removed)."""
    if not tty:
        done = subprocess.run([*SYNAPSE, *args], capture_output=True, text=True, timeout=120, env=_env())
        return done, ""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 25, 100, 0, 0))
    received = bytearray()

    def drain() -> None:  # the terminal's buffer is small: read it while the command runs
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # EIO: the command exited and closed its end
                return
            if not data:
                return
            received.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        done = subprocess.run([*SYNAPSE, *args], stdout=subprocess.PIPE, stderr=terminal, text=True, timeout=120,
                              env=_env())
    finally:
        os.close(terminal)
        reader.join(10)
        os.close(controller)
    done.stderr = ""
    return done, _ESCAPE.sub("", received.decode("utf-8", "replace"))


# --- the helper ---


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100), out


def test_bars_are_drawn_on_a_terminal():
    console, out = _console(terminal=True)
    with progress.bars(console=console) as shown:
        assert shown.shown
        entries = shown.bar("replaying the log", total=5, unit="entries")
        size = shown.bar("saving x.snap", unit="bytes")
        for i in range(6):
            entries(i, 5)
        size(1_000_000, 2_000_000)
        phases = shown.bar("bench", total=3, unit="phases")
        for name in ("writes", "reads"):  # a step is counted when the next one begins
            phases.step(f"bench: {name}")
    text = _ESCAPE.sub("", out.getvalue())
    assert "replaying the log" in text and "5/5 entries" in text
    assert "bench: reads" in text and "1/3 phases" in text
    assert "saving x.snap" in text and "1.0 MB/2.0 MB" in text


def test_nothing_is_written_when_stderr_is_no_terminal_or_bars_are_off(monkeypatch):
    console, out = _console(terminal=False)
    with progress.bars(console=console) as shown:
        assert not shown.shown
        bar = shown.bar("replaying the log", total=5, unit="entries")
        bar(3, 5)  # a bar that is not shown takes the same calls
        bar.advance(description="next")
        with shown.paused():
            pass
    assert out.getvalue() == ""

    console, out = _console(terminal=True)
    with progress.bars(show=False, console=console) as shown:  # --output json
        shown.bar("replaying the log", total=5)(5, 5)
    monkeypatch.setenv(progress.ENV, "never")
    with progress.bars(console=console) as shown:
        shown.bar("replaying the log", total=5)(5, 5)
    assert out.getvalue() == ""


def test_always_draws_even_without_a_terminal(monkeypatch):
    console, out = _console(terminal=False)
    monkeypatch.setenv(progress.ENV, "always")
    with progress.bars(console=console) as shown:
        shown.bar("replaying the log", total=2)(2, 2)
    assert "replaying the log" in _ESCAPE.sub("", out.getvalue())


# --- the commands: stdout unchanged, bars on a terminal only ---


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("progress"), 1, extra=["--worker-slots", "0"]).start()
    client = c.client()
    for i in range(50):
        client.put(f"progress/{i:02d}", {"i": i, "pad": "x" * 200})
    yield c
    c.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A stopped node's data dir: its log no longer changes between two verifications."""
    root = tmp_path_factory.mktemp("progress-audit")
    api, raft = free_ports(2)
    cfg = NodeConfig(data_dir=root, api=f"127.0.0.1:{api}", raft=f"127.0.0.1:{raft}", worker_slots=0)
    with synapse.Node(cfg) as n, synapse.Client(n.api_url, n.root_token) as c:
        wait_until(lambda: c.status()["leader"] is not None, 15, "a leader")
        for i in range(60):
            c.put(f"audited/{i}", i)
        c.checkpoint(label="progress", wait=True)
    return root


def _saved_line(file: Path) -> str:
    """What `snapshot save` printed before there were bars, from the file it wrote."""
    info = backup.inspect(file)
    return f"saved {file}: log index {info['index']}, state {info['state_hash'][:16]}, {info['bytes']:,} bytes\n"


def test_snapshot_save_prints_the_same_line_with_or_without_a_terminal(node, tmp_path):
    n = node.nodes[0]
    connection = ["--url", n.url, "--token", node.token]
    piped, _ = _run("snapshot", "save", str(tmp_path / "piped.snap"), *connection, tty=False)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == _saved_line(tmp_path / "piped.snap") and piped.stderr == ""
    shown, terminal = _run("snapshot", "save", str(tmp_path / "shown.snap"), *connection, tty=True)
    assert shown.returncode == 0, terminal
    assert shown.stdout == _saved_line(tmp_path / "shown.snap")
    assert "saving shown.snap" in terminal


def test_snapshot_restore_prints_the_same_lines_with_or_without_a_terminal(node, tmp_path):
    file = tmp_path / "restore.snap"
    node.client().save_snapshot(file)
    raft = f"127.0.0.1:{free_ports(1)[0]}"
    outputs = []
    for tty in (False, True):
        done, terminal = _run("snapshot", "restore", str(file), "--data-dir", str(tmp_path / f"d-{tty}"),
                              "--raft", raft, tty=tty)
        assert done.returncode == 0, done.stderr or terminal
        assert done.stderr == ""
        outputs.append(done.stdout.replace(f"d-{tty}", "d"))
        if tty:
            assert "restoring restore.snap" in terminal and "2/2 steps" in terminal
    assert outputs[0] == outputs[1] and outputs[0].startswith("restored log index ")


def test_audit_verify_output_is_unchanged_and_json_gets_no_bar(data_dir):
    expected = verify(data_dir)
    assert expected.ok, expected.failure
    as_json = json.dumps(expected.as_dict(), indent=2, ensure_ascii=False) + "\n"
    for tty in (False, True):
        done, terminal = _run("audit", "verify", "--data-dir", str(data_dir), "--output", "json", tty=tty)
        assert done.returncode == 0 and done.stdout == as_json and done.stderr == ""
        assert json.loads(done.stdout)["ok"] is True
        assert terminal.strip() == ""  # --output json: no bar, even on a terminal
    piped, _ = _run("audit", "verify", "--data-dir", str(data_dir), tty=False)
    shown, terminal = _run("audit", "verify", "--data-dir", str(data_dir), tty=True)
    assert piped.returncode == shown.returncode == 0 and piped.stderr == ""
    assert piped.stdout.startswith("audit: OK") and shown.stdout == piped.stdout
    assert "replaying the log" in terminal and " entries" in terminal


def test_chaos_run_lines_stay_on_stdout_under_the_bars(tmp_path):
    done, terminal = _run("chaos", "run", "--mode", "loopback", "--duration", "2", "--clients", "2", "--keys", "3",
                          "--nemesis", "", "--runs", "2", "--seed", "11", "--out", str(tmp_path), tty=True)
    assert done.returncode == 0, terminal
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["run 1/2 (seed 11)", "run 2/2 (seed 12)", "chaos"], done.stdout
    assert "PASSED" in lines[0] and lines[2] == "chaos: 2 of 2 runs passed"
    assert "chaos runs" in terminal and "run 2/2 (seed 12)" in terminal


# --- the library's callbacks ---


def _counts_up(calls: list[tuple[float, float]]) -> None:
    """From 0, never backwards, one total, and the last call at done == total."""
    assert calls, "progress was never called"
    dones, totals = [d for d, _ in calls], {t for _, t in calls}
    assert dones[0] == 0 and dones == sorted(dones)
    assert len(totals) == 1 and dones[-1] == totals.pop()


def test_save_snapshot_reports_the_bytes_received(node, tmp_path):
    calls: list[tuple[float, float]] = []
    with Client(node.nodes[0].url, node.token) as c:
        saved = c.save_snapshot(tmp_path / "s.snap", progress=lambda done, total: calls.append((done, total)))
    _counts_up(calls)
    assert calls[-1] == (saved["bytes"], saved["bytes"]) == ((tmp_path / "s.snap").stat().st_size,) * 2


def test_restore_reports_its_steps(node, tmp_path):
    file = tmp_path / "r.snap"
    node.client().save_snapshot(file)
    calls: list[tuple[float, float]] = []
    backup.restore(file, tmp_path / "d", [f"127.0.0.1:{free_ports(1)[0]}"], progress=lambda *c: calls.append(c))
    _counts_up(calls)
    assert calls == [(i, backup.RESTORE_STEPS) for i in range(backup.RESTORE_STEPS + 1)]


def test_audit_verify_reports_every_entry(data_dir):
    calls: list[tuple[float, float]] = []
    result = verify(data_dir, progress=lambda *c: calls.append(c))
    assert result.ok, result.failure
    _counts_up(calls)
    total = calls[-1][1]
    assert [d for d, _ in calls] == list(range(total + 1)) and total >= result.entries_replayed


def test_a_chaos_run_reports_the_seconds_of_load(tmp_path):
    calls: list[tuple[float, float]] = []
    config = RunConfig(nodes=3, duration=1.5, clients=2, keys=3, nemeses=(), mode="loopback", seed=5)
    result = Run(config, tmp_path / "run").execute(progress=lambda *c: calls.append(c))
    assert result.ok, result.checks
    assert calls[0][0] >= 0 and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert {t for _, t in calls} == {1.5} and calls[-1] == (1.5, 1.5) and len(calls) >= 2
