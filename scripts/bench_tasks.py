"""Benchmarks task orchestration: a 3-node Synapse cluster on loopback and 2 execution nodes
(`synapse worker start`, the default sandbox), in one run. Prints one JSON object (and writes
it to --json FILE):

- ``tasks_per_s``: ``--tasks`` trivial tasks (``true``), submitted by ``--submitters``
  concurrent clients, run across the 2 workers (``--slots`` each); tasks ended / (last task's
  finish − first task's submit), both from the replicated task records. While they run, the
  bench only asks a few times a second whether any is unfinished. Every task must end
  ``succeeded``. ``throughput_detail`` has the states, the submit rate and the per-worker
  split, and ``cpu_ms_per_task``: CPU per task of the leader, the followers, the worker
  processes, their sandboxes (launcher, bwrap, the task) and the bench's clients. The default sandbox is measured (bubblewrap when usable); ``tasks_per_s_process_driver``
  repeats the run with ``--driver process`` (no namespaces), to show what the sandbox costs.
- ``schedule_latency_p50_ms`` (+ p90, p99): with the cluster otherwise idle, ``--latency-tasks``
  tasks submitted one at a time; for each, its record's ``started_ms`` (the worker's clock
  when the sandbox started) − ``submitted_ms`` (the API node's clock when it took the
  request): submit commit + scheduling round + assignment delivery + sandbox start. Same
  machine, so the clocks agree.
- ``reschedule_s`` (median of ``--reschedule-trials``) and ``reschedule_detail``: a task
  (``sleep``) runs on worker A; A is SIGKILLed; the time until the task runs on worker B
  (its second ``running`` history entry, on the cluster's clock) after the kill. The target
  is heartbeat timeout (``--heartbeat-timeout``, default 2 s here) + 1 s.

Every process this script starts is in its own session, gets SIGKILL if this script dies and
is torn down on exit. Only 127.0.0.1 is used.

Usage: ./scripts/bench-tasks --json FILE [--tasks 2000] [--slots 16] [--heartbeat-timeout 2]
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_node as bn  # noqa: E402  (the cluster and process plumbing, shared)

from synapse.cli.progress import bars  # noqa: E402
from synapse.client import Client  # noqa: E402

ENDED = ("succeeded", "failed", "timed-out", "cancelled", "lost")


def log(msg: str) -> None:
    print(f"bench-tasks [{time.strftime('%H:%M:%S')}]: {msg}", file=sys.stderr, flush=True)


class Workers:
    def __init__(self, cluster: bn.SynapseCluster, root: Path, slots: int) -> None:
        self.cluster, self.root, self.slots = cluster, root, slots
        self.procs: dict[str, object] = {}

    def start(self, worker_id: str, driver: str = "auto") -> None:
        join = ",".join(f"http://{m.api}" for m in self.cluster.members)
        args = bn.synapse_command() + ["worker", "start", "--join", join, "--token", self.cluster._token(),
                                       "--id", worker_id, "--slots", str(self.slots), "--driver", driver]
        self.procs[worker_id] = bn.spawn(args, self.root / f"{worker_id}.log")

    def kill(self, worker_id: str) -> None:
        p = self.procs.pop(worker_id)
        bn._signal_group(p, signal.SIGKILL)
        p.wait(10)

    def stop(self, worker_id: str) -> None:
        """A clean stop: the worker leaves the cluster (marked down at once)."""
        p = self.procs.pop(worker_id)
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def _client(cluster: bn.SynapseCluster, timeout: float = 30.0) -> Client:
    return Client([f"http://{m.api}" for m in cluster.members], cluster._token(), timeout=timeout)


def _wait_workers(client: Client, ids: set[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        up = {w["worker_id"] for w in client.status()["workers"] if w["state"] == "up"}
        if ids <= up:
            return
        time.sleep(0.1)
    raise RuntimeError(f"workers {sorted(ids)} not up within {timeout} s")


def _wait_ended(client: Client, ids: list[str], timeout: float) -> list[dict]:
    deadline, out = time.monotonic() + timeout, []
    for t in ids:
        while True:
            task = client.task(t, wait=max(0.0, min(5.0, deadline - time.monotonic())))
            if task["state"] in ENDED:
                out.append(task)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"task {t} still {task['state']} after {timeout} s")
    return out


def _cpu_snapshot(cluster, workers: "Workers") -> dict[str, float]:
    """CPU seconds so far: each node, each worker process, each worker's sandboxes, and this
    process (the submitting and polling clients)."""
    out = {m.name: bn.proc_cpu_s(m.pid) or 0.0 for m in cluster.members if m.alive()}
    for w, p in workers.procs.items():
        out[w] = bn.proc_cpu_s(p.pid) or 0.0
        out[w + ":sandboxes"] = bn.proc_cpu_s(p.pid, children=True) or 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["clients"] = usage.ru_utime + usage.ru_stime
    return out


def run_throughput(cluster, workers: "Workers", tasks: int, submitters: int) -> dict:
    ids: list[str] = []
    lock = threading.Lock()
    per = [tasks // submitters + (1 if i < tasks % submitters else 0) for i in range(submitters)]

    def submit(n: int) -> None:
        with _client(cluster) as c:
            for _ in range(n):
                t = c.submit_task({"command": ["true"], "limits": {"wall_s": 30}})["task_id"]
                with lock:
                    ids.append(t)

    cpu0 = _cpu_snapshot(cluster, workers)
    t0 = time.monotonic()
    threads = [threading.Thread(target=submit, args=(n,)) for n in per]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    submit_s = time.monotonic() - t0
    with _client(cluster) as c:
        # Until none is left pending, assigned or running: a few requests a second, so the
        # measuring client adds no per-task load (a wait per task would add a read barrier,
        # a log entry, per task); then every record, for its timestamps.
        deadline = time.monotonic() + 600
        while any(c.tasks(state, limit=1)["tasks"] for state in ("pending", "assigned", "running")):
            if time.monotonic() > deadline:
                raise RuntimeError("tasks still unfinished after 600 s")
            time.sleep(0.25)
        cpu1 = _cpu_snapshot(cluster, workers)
        done = _wait_ended(c, ids, timeout=60)
    # Where the CPU went, in ms per task (the leader is the node with the most).
    spent = {k: (cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) * 1000 / len(ids) for k in cpu1}
    nodes = sorted((v for k, v in spent.items() if k in {m.name for m in cluster.members}), reverse=True)
    cpu_ms = {"leader": round(nodes[0], 2) if nodes else None,
              "followers": round(sum(nodes[1:]), 2),
              "workers": round(sum(v for k, v in spent.items() if k in workers.procs), 2),
              "sandboxes": round(sum(v for k, v in spent.items() if k.endswith(":sandboxes")), 2),
              "clients": round(spent["clients"], 2)}
    cpu_ms["total"] = round(sum(v for v in cpu_ms.values() if v is not None), 2)
    states: dict[str, int] = {}
    for t in done:
        states[t["state"]] = states.get(t["state"], 0) + 1
    span_ms = max(t["finished_ms"] for t in done) - min(t["submitted_ms"] for t in done)
    per_worker: dict[str, int] = {}
    for t in done:
        per_worker[t["worker"]] = per_worker.get(t["worker"], 0) + 1
    return {"tasks_per_s": round(len(done) / (span_ms / 1000), 1), "throughput_detail": {
        "tasks": len(done), "states": states, "span_s": round(span_ms / 1000, 3),
        "submit_per_s": round(len(ids) / submit_s, 1), "per_worker": per_worker, "submitters": submitters,
        "cpu_ms_per_task": cpu_ms}}


def run_latency(cluster, count: int) -> dict:
    lat = []
    with _client(cluster) as c:
        for _ in range(count):
            t = c.submit_task({"command": ["true"], "limits": {"wall_s": 30}})["task_id"]
            task = _wait_ended(c, [t], timeout=60)[0]
            if task["state"] != "succeeded" or task["started_ms"] is None:
                raise RuntimeError(f"latency task {t} ended {task['state']}")
            lat.append(task["started_ms"] - task["submitted_ms"])
    lat.sort()
    return {"schedule_latency_p50_ms": bn.pct(lat, 0.5), "schedule_latency_p90_ms": bn.pct(lat, 0.9),
            "schedule_latency_p99_ms": bn.pct(lat, 0.99), "latency_tasks": count}


def run_reschedule(cluster, workers: Workers, trials: int, heartbeat_timeout: float) -> dict:
    detail = []
    with _client(cluster) as c:
        for n in range(trials):
            a, b = f"ra{n}", f"rb{n}"
            workers.start(a)
            _wait_workers(c, {a})
            t = c.submit_task({"command": ["sleep", "30"], "retries": 1, "limits": {"wall_s": 60}})["task_id"]
            deadline = time.monotonic() + 30
            while c.task(t)["state"] != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError("the reschedule task did not start")
                time.sleep(0.02)
            workers.start(b)
            _wait_workers(c, {b})
            killed_ms = int(time.time() * 1000)
            workers.kill(a)
            deadline = time.monotonic() + heartbeat_timeout + 30
            while True:
                task = c.task(t)
                runs = [h for h in task["history"] if h["state"] == "running"]
                if len(runs) >= 2:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"task {t} was not rescheduled: {task['history']}")
                time.sleep(0.02)
            down = next((h["at_ms"] for h in task["history"] if "worker down" in h["detail"]), None)
            detail.append({"reschedule_s": round((runs[1]["at_ms"] - killed_ms) / 1000, 3),
                           "marked_down_after_s": round((down - killed_ms) / 1000, 3) if down else None,
                           "worker": task["worker"]})
            c.cancel_task(t)
            workers.stop(b)
    return {"reschedule_s": round(statistics.median(d["reschedule_s"] for d in detail), 3),
            "reschedule_detail": detail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the JSON object to this file")
    p.add_argument("--tasks", type=int, default=2000, help="trivial tasks for tasks_per_s (default 2000)")
    p.add_argument("--submitters", type=int, default=32, help="concurrent submitting clients (default 32)")
    p.add_argument("--slots", type=int, default=16, help="slots per worker (default 16)")
    p.add_argument("--latency-tasks", type=int, default=100, help="tasks for the latency figure (default 100)")
    p.add_argument("--reschedule-trials", type=int, default=3)
    p.add_argument("--no-process-driver", dest="process_driver", action="store_false",
                   help="skip the second throughput run with the process driver")
    p.add_argument("--heartbeat-timeout", type=float, default=2.0)
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = p.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, bn._raise_exit)
    atexit.register(bn.kill_all)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    log(f"work dir {tmp}")
    result: dict = {"machine": bn.machine_info(), "settings": {
        "tasks": args.tasks, "submitters": args.submitters, "slots_per_worker": args.slots, "workers": 2,
        "heartbeat_timeout_s": args.heartbeat_timeout, "latency_tasks": args.latency_tasks}}
    failed = None
    try:
        with bars() as shown:
            steps = shown.bar("bench-tasks", total=4 + args.process_driver, unit="phases")
            steps.step("bench-tasks: starting 3 nodes and 2 workers")
            cluster = bn.SynapseCluster(tmp / "cluster", 3, ["--heartbeat-timeout", str(args.heartbeat_timeout)]).start()
            workers = Workers(cluster, tmp, args.slots)
            for w in ("w1", "w2"):
                workers.start(w)
            with _client(cluster) as c:
                _wait_workers(c, {"w1", "w2"})
                result["sandbox"] = {w["worker_id"]: w["driver"] for w in c.status()["workers"]}
            steps.step("bench-tasks: latency")
            log("latency")
            result.update(run_latency(cluster, args.latency_tasks))
            steps.step("bench-tasks: throughput")
            log("throughput")
            result.update(run_throughput(cluster, workers, args.tasks, args.submitters))
            workers.stop("w1")
            workers.stop("w2")
            if args.process_driver:
                # The same with the process driver (rlimits and cgroups, no namespaces): what the
                # bubblewrap sandbox itself costs per task on this machine.
                steps.step("bench-tasks: throughput, process driver")
                log("throughput, process driver")
                for w in ("p1", "p2"):
                    workers.start(w, driver="process")
                with _client(cluster) as c:
                    _wait_workers(c, {"p1", "p2"})
                other = run_throughput(cluster, workers, args.tasks, args.submitters)
                result["tasks_per_s_process_driver"] = other["tasks_per_s"]
                result["throughput_detail_process_driver"] = other["throughput_detail"]
                workers.stop("p1")
                workers.stop("p2")
            steps.step("bench-tasks: reschedule")
            log("reschedule")
            result.update(run_reschedule(cluster, workers, args.reschedule_trials, args.heartbeat_timeout))
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        failed = e
        result["error"] = f"{type(e).__name__}: {e}"[:4000]
        log(f"FAILED: {result['error']}")
    finally:
        bn.kill_all()
    targets = {"tasks_per_s": (">=", 200), "schedule_latency_p50_ms": ("<=", 20),
               "reschedule_s": ("<=", args.heartbeat_timeout + 1)}
    result["targets"] = {k: {"target": f"{op} {v}", "measured": result.get(k),
                             "met": None if result.get(k) is None else
                             (result[k] >= v if op == ">=" else result[k] <= v)} for k, (op, v) in targets.items()}
    result["notes"] = ["2-core machine shared by the 3 nodes, 2 workers, their sandboxes and the clients."]
    bn.publish(result, args.json, tmp, args.keep, failed, log)


if __name__ == "__main__":
    os.chdir(bn.ROOT)
    main()
