"""A/B for task throughput: two versions of Synapse side by side in one run, as ratios.

Each version (a git commit, or the working tree; built as ``bench_ab`` builds them) runs its
own 3-node cluster on loopback and 2 execution nodes (``synapse worker start``, the default
sandbox, ``--slots`` each); both run at once, and in each of ``--rounds`` rounds each version
runs ``--tasks`` trivial tasks (``true``) from ``--submitters`` clients, the order flipped
every round — ``bench_tasks``'s throughput phase, with its CPU per task by part (leader,
followers, workers, sandboxes, clients). Per version the medians over the rounds; then B over
A, with the per-round ratios of tasks/s.

Usage: ./scripts/bench-tasks-ab --a REF [--b REF] [--rounds 4] [--tasks 1000] [--json FILE] [--keep]
REF: a commit, or ``.`` for the working tree (default b).
"""

from __future__ import annotations

import argparse
import atexit
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ab  # noqa: E402  (building a version, putting its tree first)
import bench_node as bn  # noqa: E402
import bench_tasks  # noqa: E402  (the workers and the throughput phase)

from synapse.cli.progress import bars  # noqa: E402

PARTS = ("leader", "followers", "workers", "sandboxes", "clients", "total")


def log(msg: str) -> None:
    print(f"[bench-tasks-ab] {msg}", file=sys.stderr, flush=True)


class Version:
    def __init__(self, name: str, ref: str, root: Path, slots: int) -> None:
        self.name, self.ref = name, ref
        self.tree, self.label = bench_ab.checkout(ref, root)
        self.rounds: list[dict] = []
        with bench_ab.source_first(self.tree):
            self.cluster = bn.SynapseCluster(root / name / "cluster", 3).start()
            self.workers = bench_tasks.Workers(self.cluster, root / name, slots)
            for w in (f"{name}1", f"{name}2"):
                self.workers.start(w)
        with bench_tasks._client(self.cluster) as c:
            bench_tasks._wait_workers(c, {f"{name}1", f"{name}2"})
            self.sandbox = {w["worker_id"]: w["driver"] for w in c.status()["workers"]}

    def summary(self) -> dict:
        cpu = {part: round(statistics.median(r["throughput_detail"]["cpu_ms_per_task"][part] for r in self.rounds), 2)
               for part in PARTS}
        return {"ref": self.ref, "source": self.label, "sandbox": self.sandbox,
                "tasks_per_s": round(statistics.median(r["tasks_per_s"] for r in self.rounds), 1),
                "cpu_ms_per_task": cpu,
                "rounds": [{"tasks_per_s": r["tasks_per_s"], "states": r["throughput_detail"]["states"]}
                           for r in self.rounds]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_ab.versions_arguments(p, rounds=4)
    p.add_argument("--tasks", type=int, default=1000, help="trivial tasks per version per round (default 1000)")
    p.add_argument("--submitters", type=int, default=32)
    p.add_argument("--slots", type=int, default=16, help="slots per worker (default 16)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, bn._raise_exit)
    atexit.register(bn.kill_all)
    tmp = bn._WORKDIR = Path(tempfile.mkdtemp(prefix="synapse-bench-tasks-ab-"))
    versions: list[Version] = []
    failed: BaseException | None = None
    result: dict = {"machine": bn.machine_info(), "settings": vars(args)}
    try:
        with bars() as shown:
            steps = shown.bar("bench-tasks-ab", total=2 + 2 * args.rounds, unit="steps")
            for name, ref in (("a", args.a), ("b", args.b)):
                steps.step(f"bench-tasks-ab: building and starting version {name}")
                versions.append(Version(name, ref, tmp, args.slots))
                log(f"version {name}: {versions[-1].label}, sandboxes {versions[-1].sandbox}")
            for n in range(args.rounds):
                for v in versions if n % 2 == 0 else versions[::-1]:
                    steps.step(f"bench-tasks-ab: round {n + 1}/{args.rounds}, {v.name}")
                    r = bench_tasks.run_throughput(v.cluster, v.workers, args.tasks, args.submitters)
                    v.rounds.append(r)
                    log(f"round {n + 1}/{args.rounds} {v.name}: {r['tasks_per_s']} tasks/s, "
                        f"CPU per task {r['throughput_detail']['cpu_ms_per_task']}")
        a, b = (v.summary() for v in versions)
        result.update({"a": a, "b": b})
        ratios = {"b_over_a_tasks_per_s": round(b["tasks_per_s"] / a["tasks_per_s"], 3)}
        for part in PARTS:
            if a["cpu_ms_per_task"][part]:
                ratios[f"b_over_a_cpu_ms_per_task_{part}"] = round(
                    b["cpu_ms_per_task"][part] / a["cpu_ms_per_task"][part], 3)
        ratios["b_over_a_tasks_per_s_per_round"] = [
            round(rb["tasks_per_s"] / ra["tasks_per_s"], 3) for ra, rb in zip(versions[0].rounds, versions[1].rounds)]
        result["ratios"] = ratios
    except BaseException as e:  # noqa: BLE001 — published below with the exit status it calls for
        failed = e
        log(f"failed: {type(e).__name__}: {e}")
    finally:
        bn.kill_all()
        bench_ab.remove_checkouts([v.tree for v in versions])
    bn.publish(result, args.json, tmp, args.keep, failed, log)


if __name__ == "__main__":
    main()
