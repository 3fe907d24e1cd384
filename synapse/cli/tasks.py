"""``synapse task …`` (submit, watch, cancel tasks) and ``synapse worker start`` (an execution
node). Registered on the ``synapse`` group by synapse/cli/main.py."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import click

from synapse.cli.common import ClientGroup, client_from, client_options, output_option, print_json, run_call, table
from synapse.config import WORKER_DRIVERS

_ENDED = ("succeeded", "failed", "timed-out", "cancelled", "lost")


@click.group(cls=ClientGroup)
@client_options
def task(**_connection) -> None:
    """Submit tasks to the cluster's execution nodes and follow them."""


@task.command("submit", context_settings={"ignore_unknown_options": True})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSON file with the whole spec (the options below override its fields).")
@click.option("--entry", help="A Python entry point 'package.module:function' instead of a command.")
@click.option("--args", "args_json", help="JSON arguments for the entry point (a list: positional; an object: keywords).")
@click.option("--env", "env", multiple=True, help="NAME=VALUE added to the task's (scrubbed) environment.")
@click.option("--file", "files", multiple=True, help="LOCAL[=NAME]: copy a local file into the task's working directory.")
@click.option("--cpu-s", type=float, help="CPU seconds.")
@click.option("--memory-mb", type=int, help="Memory (address space) in MiB.")
@click.option("--wall-s", type=float, help="Wall-clock seconds before the task is killed (default 600).")
@click.option("--output-bytes", type=int, help="Bytes of stdout and of stderr kept (default 65536).")
@click.option("--processes", type=int, help="Processes and threads the task may have.")
@click.option("--network", is_flag=True, default=None, help="Grant network access (none by default).")
@click.option("--read-path", multiple=True, help="Grant reading this absolute path.")
@click.option("--write-path", multiple=True, help="Grant writing this absolute path.")
@click.option("--label", multiple=True, help="NAME=VALUE the execution node must carry.")
@click.option("--priority", type=int, help="0-1000, higher first (default 100).")
@click.option("--retries", type=int, help="Extra attempts after a failure or a lost node (default 0).")
@click.option("--backoff-ms", type=int, help="Pause before the first retry, doubling each time.")
@click.option("--idempotency-key", help="Submitting twice with the same key gives the first task.")
@click.option("--wait", "wait_s", type=float, default=None, help="Wait up to this many seconds for the task to end.")
@output_option
@click.pass_context
def task_submit(ctx, argv, spec_file, entry, args_json, env, files, cpu_s, memory_mb, wall_s, output_bytes, processes,
                network, read_path, write_path, label, priority, retries, backoff_ms, idempotency_key, wait_s,
                as_json) -> None:
    """Submit a task: `synapse task submit -- python3 -c 'print(1)'` or `--entry mod:fn --args '[1]'`."""
    spec = json.loads(spec_file.read_text()) if spec_file else {}
    if argv:
        spec["command"] = list(argv)
    if entry:
        spec["entry"] = entry
    if args_json is not None:
        try:
            spec["args"] = json.loads(args_json)
        except ValueError:
            raise click.UsageError(f"--args {args_json!r} is not JSON") from None
    if env:
        spec["env"] = dict(spec.get("env") or {}, **_pairs(env, "--env"))
    if files:
        spec["files"] = dict(spec.get("files") or {})
        for item in files:
            local, _, name = item.partition("=")
            try:
                content = Path(local).read_bytes()
            except OSError as e:
                raise click.UsageError(f"--file {local}: {e.strerror}") from None
            spec["files"][name or Path(local).name] = {"base64": base64.b64encode(content).decode()}
    limits = {k: v for k, v in (("cpu_s", cpu_s), ("memory_mb", memory_mb), ("wall_s", wall_s),
                                ("output_bytes", output_bytes), ("processes", processes)) if v is not None}
    if limits:
        spec["limits"] = dict(spec.get("limits") or {}, **limits)
    caps = dict(spec.get("capabilities") or {})
    if network is not None:
        caps["network"] = network
    if read_path:
        caps["read_paths"] = list(read_path)
    if write_path:
        caps["write_paths"] = list(write_path)
    if caps:
        spec["capabilities"] = caps
    if label:
        spec["labels"] = dict(spec.get("labels") or {}, **_pairs(label, "--label"))
    for name, value in (("priority", priority), ("retries", retries), ("backoff_ms", backoff_ms)):
        if value is not None:
            spec[name] = value
    with client_from(ctx) as c:
        answer = run_call(lambda: c.submit_task(spec, idempotency_key))
        if wait_s:
            answer = {"task_id": answer["task_id"], "duplicate": answer["duplicate"],
                      "task": _wait(c, answer["task_id"], wait_s)}
    if as_json:
        print_json(answer)
    else:
        t = answer["task"] or {}
        click.echo(f"{answer['task_id']}  {t.get('state', '?')}{'  (existing task: same idempotency key)' if answer['duplicate'] else ''}")


@task.command("status")
@click.argument("task_id")
@output_option
@click.pass_context
def task_status(ctx, task_id, as_json) -> None:
    """A task's state, attempts, result and history."""
    with client_from(ctx) as c:
        t = run_call(lambda: c.task(task_id))
    if as_json:
        print_json(t)
        return
    _describe(t)


@task.command("list")
@click.option("--state", type=click.Choice(["pending", "assigned", "running", *_ENDED]))
@click.option("--limit", type=int, default=50)
@output_option
@click.pass_context
def task_list(ctx, state, limit, as_json) -> None:
    """Tasks in id order (the newest ended ones are kept: 100,000)."""
    with client_from(ctx) as c:
        answer = run_call(lambda: c.tasks(state, limit))
    if as_json:
        print_json(answer)
        return
    rows = [("TASK", "STATE", "ATTEMPTS", "WORKER", "WHAT")]
    for t in answer["tasks"]:
        what = t["what"] if isinstance(t["what"], str) else " ".join(t["what"])
        rows.append((t["task_id"], t["state"], str(t["attempts"]), t["worker"] or "-", what[:60]))
    table(rows)


@task.command("cancel")
@click.argument("task_id")
@click.pass_context
def task_cancel(ctx, task_id) -> None:
    """Cancel a task; a running one is killed on its execution node."""
    with client_from(ctx) as c:
        answer = run_call(lambda: c.cancel_task(task_id))
    click.echo(f"{task_id}  {answer['state']}" + (f" (was running on {answer['was_on']})" if answer["was_on"] else ""))


@task.command("logs")
@click.argument("task_id")
@click.option("--stream", type=click.Choice(["stdout", "stderr", "both"]), default="both")
@click.pass_context
def task_logs(ctx, task_id, stream) -> None:
    """The captured output of the task's last attempt."""
    with client_from(ctx) as c:
        logs = run_call(lambda: c.task_logs(task_id))
    if stream in ("stdout", "both"):
        click.echo(logs["stdout"], nl=False)
        if logs["stdout_truncated"]:
            click.echo("\n[stdout truncated at the task's output limit]", err=True)
    if stream in ("stderr", "both"):
        click.echo(logs["stderr"], nl=False, err=True)
        if logs["stderr_truncated"]:
            click.echo("\n[stderr truncated at the task's output limit]", err=True)


@task.command("wait")
@click.argument("task_id")
@click.option("--timeout", type=float, default=600.0, help="Give up after this many seconds (exit 2).")
@output_option
@click.pass_context
def task_wait(ctx, task_id, timeout, as_json) -> None:
    """Wait for a task to end. Exit 0 if it succeeded, 1 if it ended otherwise, 2 on timeout."""
    with client_from(ctx) as c:
        t = _wait(c, task_id, timeout)
    if as_json:
        print_json(t)
    else:
        _describe(t)
    if t["state"] not in _ENDED:
        raise SystemExit(2)
    raise SystemExit(0 if t["state"] == "succeeded" else 1)


def _wait(c, task_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        t = run_call(lambda: c.task(task_id, wait=max(0.0, min(left, 5.0))))
        if t["state"] in _ENDED or left <= 0:
            return t


def _describe(t: dict) -> None:
    what = t["what"] if isinstance(t["what"], str) else " ".join(t["what"])
    click.echo(f"task {t['task_id']}: {t['state']} (attempts {t['attempts']}, worker {t['worker'] or '-'})")
    click.echo(f"  runs: {what}")
    r = t.get("result")
    if r:
        click.echo(f"  result: {r['status']} ({r['reason']}), exit code {r['exit_code']}, signal {r['signal']}, "
                   f"output {r['stdout_bytes']}+{r['stderr_bytes']} bytes, hash {(r['output_hash'] or '')[:16]}")
        if r.get("usage"):
            click.echo("  usage: " + ", ".join(f"{k} {v}" for k, v in r["usage"].items()))
        if r.get("return_value") is not None:
            click.echo(f"  returned: {json.dumps(r['return_value'])[:200]}")
    for h in t.get("history", []):
        click.echo(f"  {time.strftime('%H:%M:%S', time.localtime(h['at_ms'] / 1000))}.{h['at_ms'] % 1000:03d} "
                   f"{h['state']:<9} {h['detail']}")


def _pairs(items, option: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.UsageError(f"{option} {item!r} is not NAME=VALUE")
        out[name] = value
    return out


# --- execution nodes ---


@click.group()
def worker() -> None:
    """Run an execution node."""


@worker.command("start")
@click.option("--join", "join", required=True, help="API URL(s) of the cluster's nodes (comma-separated; one is enough).")
@click.option("--token", help="API token (default $SYNAPSE_TOKEN).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), help="File holding the API token.")
@click.option("--id", "worker_id", help="This execution node's id (default HOSTNAME-PID).")
@click.option("--slots", type=click.IntRange(1, 4096), help="Tasks run at once (default: the CPU count).")
@click.option("--label", multiple=True, help="NAME=VALUE that tasks can ask for (repeatable).")
@click.option("--memory-mb", type=click.IntRange(1), help="Memory offered to tasks (tasks' memory limits count against it).")
@click.option("--driver", type=click.Choice(WORKER_DRIVERS), default="auto",
              help="Sandbox (auto: a container when SYNAPSE_TASK_IMAGE names an image a reachable Docker engine has, else bubblewrap when usable, else a plain process).")
@click.option("--tls-ca", help="Verify https:// nodes against this CA certificate.")
@click.option("--tls-cert", help="Client certificate for nodes that require one (mutual TLS).")
@click.option("--tls-key", help="The key of --tls-cert.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def worker_start(join, token, token_file, worker_id, slots, label, memory_mb, driver, tls_ca, tls_cert, tls_key,
                 log_level) -> None:
    """Start an execution node in the foreground; Ctrl-C stops it (its running tasks are
    killed and rescheduled by the cluster within their retry budget)."""
    from synapse.execution import SandboxUnavailable
    from synapse.execution.worker import Worker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = token or os.environ.get("SYNAPSE_TOKEN")
    if not token and token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise click.UsageError(f"--token-file {token_file}: {e.strerror}") from None
    if not token:
        raise click.UsageError("no token: pass --token, --token-file or set SYNAPSE_TOKEN")
    try:
        tls = None
        if tls_ca or tls_cert or tls_key:
            from synapse.security.tls import client_context

            tls = client_context(*(Path(p) if p else None for p in (tls_ca, tls_cert, tls_key)))
        w = Worker(join, token, worker_id=worker_id, slots=slots, labels=_pairs(label, "--label"),
                   memory_mb=memory_mb, driver=driver, ssl_context=tls)
    except SandboxUnavailable as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"synapse: worker {w.worker_id} joining {join} with {w.slots} slots, sandbox {w.driver.name}", err=True)
    worker_thread = threading.Thread(target=w.run, args=(stop,), daemon=True)
    worker_thread.start()
    while worker_thread.is_alive():
        worker_thread.join(0.5)
    w.close()
    click.echo("synapse: worker stopped", err=True)
