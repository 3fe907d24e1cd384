"""The `synapse` command against a real single node (local mode)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import Cluster


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("cli"), 1).start()
    yield c
    c.close()


def cli(node, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    n = node.nodes[0]
    r = subprocess.run(
        [sys.executable, "-m", "synapse.cli.main", *args[:1], "--url", n.url, "--token-file", str(n.data_dir / "root.token"), *args[1:]],
        capture_output=True, text=True, timeout=60,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_kv_put_get_scan_delete(node):
    assert json.loads(cli(node, "kv", "put", "cli/a", '{"x": 1}').stdout)["version"] == 1
    cli(node, "kv", "put", "cli/b", "plain text", "--string")
    assert json.loads(cli(node, "kv", "get", "cli/a").stdout)["value"] == {"x": 1}
    assert json.loads(cli(node, "kv", "get", "cli/b").stdout)["value"] == "plain text"
    items = json.loads(cli(node, "kv", "scan", "--prefix", "cli/", "--output", "json").stdout)
    assert [item["key"] for item in items] == ["cli/a", "cli/b"]
    table = cli(node, "kv", "scan", "--prefix", "cli/").stdout.splitlines()
    assert table[0].split() == ["KEY", "VALUE", "VERSION"] and table[1].split()[0] == "cli/a"
    assert json.loads(cli(node, "kv", "delete", "cli/a").stdout)["deleted"] is True
    r = cli(node, "kv", "get", "cli/a", check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_conflicts_and_bad_values_are_reported(node):
    cli(node, "kv", "put", "cli/c", "1")
    r = cli(node, "kv", "put", "cli/c", "2", "--if-version", "5", check=False)
    assert r.returncode != 0 and "current version 1" in r.stderr
    r = cli(node, "kv", "put", "cli/c", "not json", check=False)
    assert r.returncode != 0 and "--string" in r.stderr


def test_cluster_status_table(node):
    out = cli(node, "cluster", "status").stdout
    assert "leader n1" in out and "state hash" in out and "n1" in out.splitlines()[-1]
    assert json.loads(cli(node, "cluster", "status", "--json").stdout)["node_id"] == "n1"


def test_missing_token_is_explained(node, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "synapse.cli.main", "kv", "--url", node.nodes[0].url, "--token-file", str(tmp_path / "none"), "get", "x"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0 and "no token" in r.stderr


def test_checkpoint_create_and_list(node):
    made = json.loads(cli(node, "checkpoint", "create", "--label", "cli-made").stdout)
    assert made["agreed"] and made["label"] == "cli-made" and made["nodes"]["n1"]["agrees"] is True
    table = cli(node, "checkpoint", "list").stdout.splitlines()
    assert table[0].split() == ["INDEX", "LABEL", "AGREED", "DIGEST", "NODES"]
    assert any(line.startswith(str(made["index"])) and "cli-made" in line and "n1:ok" in line for line in table)
    assert "agrees" in cli(node, "cluster", "status").stdout
    r = cli(node, "checkpoint", "create", "--label", "x" * 200, check=False)
    assert r.returncode != 0 and "label" in r.stderr


def test_debug_corrupt_is_refused_without_the_flag(node):
    r = cli(node, "debug", "corrupt", "--key", "cli/z", check=False)
    assert r.returncode != 0 and "--debug-fault-injection" in r.stderr


def test_task_submit_wait_status_logs_list_and_cancel(node):
    # The local node runs an embedded execution node; the status table lists it.
    assert "WORKER" in cli(node, "cluster", "status").stdout
    done = json.loads(cli(node, "task", "submit", "--wait", "30", "--json", "--", "python3", "-c", "print(6 * 7)").stdout)
    assert done["task"]["state"] == "succeeded"
    task_id = done["task_id"]
    assert cli(node, "task", "logs", task_id).stdout == "42\n"
    assert "succeeded" in cli(node, "task", "status", task_id).stdout
    assert task_id in cli(node, "task", "list").stdout
    failing = json.loads(cli(node, "task", "submit", "--json", "--", "false").stdout)["task_id"]
    assert cli(node, "task", "wait", failing, check=False).returncode == 1
    again = json.loads(cli(node, "task", "submit", "--json", "--idempotency-key", "cli-k", "--", "true").stdout)
    dup = json.loads(cli(node, "task", "submit", "--json", "--idempotency-key", "cli-k", "--", "true").stdout)
    assert dup["task_id"] == again["task_id"] and dup["duplicate"] is True
    slow = json.loads(cli(node, "task", "submit", "--json", "--", "sleep", "30").stdout)["task_id"]
    assert "cancelled" in cli(node, "task", "cancel", slow).stdout
    assert cli(node, "task", "wait", slow, check=False).returncode == 1


def test_bad_task_specs_are_refused_naming_the_field(node):
    r = cli(node, "task", "submit", "--cpu-s", "-3", "--", "true", check=False)
    assert r.returncode != 0 and "limits.cpu_s" in r.stderr
    r = cli(node, "task", "submit", "--entry", "not an entry", check=False)
    assert r.returncode != 0 and "spec.entry" in r.stderr


def test_connection_options_work_before_and_after_the_subcommand(node):
    n = node.nodes[0]
    run = lambda *a: subprocess.run([sys.executable, "-m", "synapse.cli.main", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60, cwd="/")
    token = (n.data_dir / "root.token").read_text().strip()
    after = run("kv", "put", "cli/order", '"after"', "--url", n.url, "--token", token)
    assert after.returncode == 0, after.stderr
    before = run("kv", "--url", n.url, "--token", token, "get", "cli/order")
    assert before.returncode == 0 and json.loads(before.stdout)["value"] == "after", before.stderr
    mixed = run("cluster", "--url", n.url, "status", "--token", token)
    assert mixed.returncode == 0 and "LEADER" in mixed.stdout.upper(), mixed.stderr
    # Given on the command, it wins over the group's (the nearest one, as a user reads it).
    wrong = run("kv", "--url", "http://127.0.0.1:9", "get", "cli/order", "--url", n.url, "--token", token)
    assert wrong.returncode == 0 and json.loads(wrong.stdout)["value"] == "after", wrong.stderr
    missing = run("kv", "get", "cli/order", "--url", n.url, "--token-file", "/nonexistent/token")
    assert missing.returncode != 0 and "/nonexistent/token" in missing.stderr


def test_every_command_has_a_one_line_help():
    import click

    from synapse.cli.main import main

    def leaves(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from leaves(sub, path + [name])
        yield path, cmd

    missing = [" ".join(path) for path, cmd in leaves(main, ["synapse"])
               if not (cmd.help or "").strip().splitlines()[:1]]
    assert missing == []


@pytest.mark.parametrize("command", [
    ("cluster", "status"), ("checkpoint", "list"), ("principal", "list"), ("role", "list"), ("token", "list"),
    ("task", "list"), ("kv", "scan"),
])
def test_list_and_status_commands_print_a_table_or_json(node, command):
    as_json = cli(node, *command, "--output", "json").stdout
    assert isinstance(json.loads(as_json), (list, dict))
    assert json.loads(cli(node, *command, "--json").stdout) == json.loads(as_json) or command == ("cluster", "status")
    table = cli(node, *command).stdout
    assert not table.lstrip().startswith(("{", "[")), table  # for people: not JSON
    bad = cli(node, *command, "--output", "yaml", check=False)
    assert bad.returncode == 2 and "--output" in bad.stderr
