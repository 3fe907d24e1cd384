"""Measures what a Synapse stack takes from its machine, per deployment mode, in one run, and
prints one JSON object (also written to --json FILE).

For each mode of ``--modes`` (local, docker):

- ``idle``: the stack just started and ready, nothing stored, after ``--settle`` s: memory
  (local: the RSS of the node process and its children — the embedded worker's sandboxes;
  docker: the sum of the containers' memory usage as the engine's cgroups count it, per
  container too) and disk (local: the data dir; docker: the stack's named volumes, plus the
  image, counted once).
- ``loaded``: after ``--keys`` kv writes of 100-byte values (16 clients), ``--memories``
  memories remembered in batches of 64 (the node embeds the texts: the model is loaded), and
  ``--tasks`` tasks run to their end (each a short Python command, in the mode's sandbox:
  bubblewrap or a process locally, a container in docker mode): the same readings, plus the
  peak memory sampled every 0.5 s while the load ran.
- ``against_seed``: the readings as fractions of the machine the product brief sizes each
  mode for (local: 2 cores, 4 GB memory, 10 GB disk; docker: 4 cores, 8 GB, 50 GB).

Local mode starts ``synapse node start`` (its defaults: embedded Chroma, an embedded worker)
on free loopback ports in a temp dir. Docker mode runs deploy/docker/compose.yaml under a
compose project of its own (``synapse-footprint-<pid>``), on free ports and a /24 of its own,
with the images ./scripts/docker-build made, and removes its containers, network and volumes
at the end however the run ends. Use ./scripts/bench-footprint, which builds what is needed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_memory as bm  # noqa: E402  (SingleNode: a local node as a subprocess)
import bench_node as bn  # noqa: E402  (processes, ports, /proc readings)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from synapse.cli.progress import bars  # noqa: E402
from synapse.client import Client  # noqa: E402
from synapse.state.tasks import TERMINAL as ENDED  # noqa: E402
from tests.docker_stack import NODES, Stack  # noqa: E402

SEED = {"local": {"cores": 2, "memory_gb": 4, "disk_gb": 10}, "docker": {"cores": 4, "memory_gb": 8, "disk_gb": 50}}
WORDS = ("user prefers tea coffee morning evening meeting invoice customer order shipped delayed agent "
         "remembers project deadline Friday Monday report draft review budget travel Oslo Paris").split()
MEMORY_BATCH = 64


def log(msg: str) -> None:
    print(f"bench-footprint [{time.strftime('%H:%M:%S')}]: {msg}", file=sys.stderr, flush=True)


def mb(n: float) -> float:
    return round(n / 2**20, 1)


# --- the load, the same for every mode -------------------------------------------------------

def run_load(client_for, keys: int, memories: int, tasks: int, task_timeout: float) -> dict:
    """kv writes, memories, tasks through the API; seconds each part took."""
    out: dict = {}
    value = "x" * 100
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        def put(i: int) -> None:
            client_for(i).put(f"footprint/{i:08d}", value)
        list(pool.map(put, range(keys)))
    out["kv_writes_s"] = round(time.monotonic() - t0, 1)

    rnd = random.Random(7)
    texts = [" ".join(rnd.choice(WORDS) for _ in range(12)) + f" #{i}" for i in range(memories)]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        def remember(start: int) -> None:
            client_for(start).remember_many("footprint/agent",
                                            [{"text": t} for t in texts[start:start + MEMORY_BATCH]])
        list(pool.map(remember, range(0, memories, MEMORY_BATCH)))
    out["memories_s"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    c = client_for(0)
    ids = [c.submit_task({"command": ["python3", "-c", f"print(sum(range({100_000 + i})))"]})["task_id"]
           for i in range(tasks)]
    states, deadline = {}, time.monotonic() + task_timeout
    for task_id in ids:
        while True:  # the API waits at most 60 s per call
            task = c.task(task_id, wait=max(0.1, min(30.0, deadline - time.monotonic())))
            if task["state"] in ENDED or time.monotonic() >= deadline:
                break
        states[task_id] = task["state"]
    out["tasks_s"] = round(time.monotonic() - t0, 1)
    ended = sum(1 for s in states.values() if s == "succeeded")
    out["tasks_succeeded"] = f"{ended}/{tasks}"
    if ended != tasks:
        raise RuntimeError(f"only {ended} of {tasks} tasks succeeded: {sorted(set(states.values()))}")
    return out


class Sampler:
    """Calls ``read()`` (bytes) every 0.5 s on a thread; ``peak``."""

    def __init__(self, read) -> None:
        self._read, self.peak, self._stop = read, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._read())
            except Exception:  # a container or process between states
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def against(seed: dict, memory_bytes: float, disk_bytes: float) -> dict:
    return {"memory_fraction": round(memory_bytes / (seed["memory_gb"] * 1e9), 3),
            "disk_fraction": round(disk_bytes / (seed["disk_gb"] * 1e9), 4)}


# --- local mode ------------------------------------------------------------------------------

def tree_rss(pid: int) -> int:
    """RSS of the process and all its descendants, bytes."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        stack.extend(int(c) for c in children)
    return total


def run_local(tmp: Path, args) -> dict:
    node = bm.SingleNode(tmp, "local", worker_slots=-1)  # local mode's defaults: the embedded worker too
    node.start()
    try:
        time.sleep(args.settle)
        idle_mem, idle_disk = tree_rss(node.pid), bn.disk_bytes(node.data_dir)
        log(f"local idle: {mb(idle_mem)} MB memory, {mb(idle_disk)} MB disk")
        client = Client(node.url, node.token, timeout=60)
        with Sampler(lambda: tree_rss(node.pid)) as peak:
            load = run_load(lambda i: client, args.keys, args.memories, args.tasks, args.task_timeout)
        time.sleep(args.settle)
        mem, disk = tree_rss(node.pid), bn.disk_bytes(node.data_dir)
        log(f"local loaded: {mb(mem)} MB memory (peak {mb(peak.peak)}), {mb(disk)} MB disk; {load}")
        seed = SEED["local"]
        return {
            "idle": {"memory_mb": mb(idle_mem), "disk_mb": mb(idle_disk)},
            "loaded": {"memory_mb": mb(mem), "memory_peak_mb": mb(peak.peak), "disk_mb": mb(disk), "load": load},
            "seed": seed, "against_seed": {"idle": against(seed, idle_mem, idle_disk),
                                           "loaded_peak": against(seed, peak.peak, disk)},
        }
    finally:
        node.stop()


# --- docker mode -----------------------------------------------------------------------------

def docker(*argv: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *argv], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def _bytes(text: str) -> float:
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _UNITS[unit]
    return float(text)


class DockerStack:
    """deploy/docker/compose.yaml under a project of this run's own (tests/docker_stack.py:
    free ports, a free /24, its own secrets), with the readings this benchmark takes."""

    def __init__(self) -> None:
        self.stack = Stack(ROOT / "deploy/docker/compose.yaml", healthy=(*NODES, "postgres", "chroma", "redis"),
                           running=("worker",), project=f"synapse-footprint-{os.getpid()}")
        self.project = self.stack.project
        self.ports = [self.stack.ports[n] for n in NODES]

    @property
    def token(self) -> str:
        return self.stack.token

    def up(self) -> None:
        self.stack.up()

    def containers(self) -> list[str]:
        return docker("ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}").split()

    def memory(self) -> tuple[float, dict]:
        out = docker("stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}", *self.containers())
        per = {}
        for line in out.strip().splitlines():
            name, usage = line.split("\t")
            per[name.removeprefix(self.project + "_")] = _bytes(usage.split(" / ")[0].strip())
        return sum(per.values()), {k: mb(v) for k, v in sorted(per.items())}

    def disk(self) -> tuple[float, dict]:
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}").split()
        per = {}
        for v in volumes:
            mount = docker("volume", "inspect", "--format", "{{.Mountpoint}}", v).strip()
            per[v.removeprefix(self.project + "_")] = bn.disk_bytes(Path(mount))
        return sum(per.values()), {k: mb(v) for k, v in sorted(per.items())}

    def down(self) -> None:
        self.stack.down()


def run_docker(tmp: Path, args) -> dict:
    image = os.environ.get("SYNAPSE_IMAGE", "synapse:latest")
    image_bytes = float(docker("image", "inspect", "--format", "{{.Size}}", image).strip())
    stack = DockerStack()
    try:
        t0 = time.monotonic()
        stack.up()
        up_s = round(time.monotonic() - t0, 1)
        time.sleep(args.settle)
        idle_mem, idle_per = stack.memory()
        idle_disk, idle_vols = stack.disk()
        log(f"docker idle (up in {up_s} s): {mb(idle_mem)} MB memory {idle_per}, volumes {mb(idle_disk)} MB")
        clients = [Client(f"http://127.0.0.1:{p}", stack.token, timeout=60) for p in stack.ports]
        with Sampler(lambda: stack.memory()[0]) as peak:
            load = run_load(lambda i: clients[i % 3], args.keys, args.memories, args.tasks, args.task_timeout)
        time.sleep(args.settle)
        mem, per = stack.memory()
        disk, vols = stack.disk()
        log(f"docker loaded: {mb(mem)} MB memory (peak {mb(peak.peak)}), volumes {mb(disk)} MB; {load}")
        seed = SEED["docker"]
        return {
            "image": image, "image_mb": mb(image_bytes), "up_s": up_s,
            "idle": {"memory_mb": mb(idle_mem), "memory_by_container_mb": idle_per, "volumes_mb": mb(idle_disk),
                     "volumes_by_name_mb": idle_vols, "disk_mb": mb(idle_disk + image_bytes)},
            "loaded": {"memory_mb": mb(mem), "memory_peak_mb": mb(peak.peak), "memory_by_container_mb": per,
                       "volumes_mb": mb(disk), "volumes_by_name_mb": vols, "disk_mb": mb(disk + image_bytes),
                       "load": load},
            "seed": seed, "against_seed": {"idle": against(seed, idle_mem, idle_disk + image_bytes),
                                           "loaded_peak": against(seed, peak.peak, disk + image_bytes)},
        }
    finally:
        stack.down()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the JSON object to this file")
    p.add_argument("--modes", default="local,docker", help="comma-separated: local, docker (default both)")
    p.add_argument("--keys", type=int, default=20_000, help="kv writes of the load (default 20000)")
    p.add_argument("--memories", type=int, default=2_048, help="memories remembered (default 2048)")
    p.add_argument("--tasks", type=int, default=20, help="tasks run to their end (default 20)")
    p.add_argument("--task-timeout", type=float, default=300.0, help="seconds to wait for all tasks (default 300)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds before each reading (default 5)")
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in SEED]
    if bad or not modes:
        p.error(f"--modes: unknown mode(s) {', '.join(bad) or '(none)'}; use local and/or docker")
    tmp = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    result: dict = {"machine": bn.machine_info(), "commit": _commit(), "args": vars(args)}
    try:
        with bars() as shown:
            steps = shown.bar("bench-footprint", total=len(modes), unit="modes")
            for mode in modes:
                steps.step(f"bench-footprint: {mode} mode")
                log(f"{mode} mode")
                result[mode] = run_local(tmp, args) if mode == "local" else run_docker(tmp, args)
    finally:
        bn.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def _commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
