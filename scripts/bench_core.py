"""Measures the Rust state core (synapse._core) and its pure-Python reference side by side.

Prints one JSON object (and writes it to --json FILE). Figures are wall-clock on this
machine; compare them within one run. Each measurement that needs a clean heap runs in its own
subprocess so resident-memory figures are not polluted by earlier ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

from synapse import _core
from synapse.cli.progress import bars
from synapse.reference import ReferenceStore

TARGETS = {
    "update_ns_per_op": ("<=", 400),
    "update_speedup": (">=", 20),
    "full_hash_gib_per_s": (">=", 1.0),
    "diff_ms_1m_100": ("<=", 10),
    "snapshot_load_s_1m": ("<=", 1.0),
    "bytes_per_entry": ("<=", 300),
}

KEY_LEN = 16
VALUE_LEN = 100
BATCH = 1000


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def fill(store, n: int, value_len: int, rng: random.Random, chunk: int = 10_000) -> list[bytes]:
    """Puts n random keys in batches; returns the keys (kept by the caller only if needed)."""
    keys = []
    for start in range(0, n, chunk):
        batch = [(rng.randbytes(KEY_LEN), rng.randbytes(value_len)) for _ in range(min(chunk, n - start))]
        store.apply(batch)
        keys.extend(k for k, _ in batch)
    return keys


def overwrite_ns_per_op(store, keys: list[bytes], batches: int, rng: random.Random, sustained: bool) -> float:
    """Amortized ns per put: batches of BATCH overwrites of random existing keys.

    sustained: the batches are built first and applied back to back (a node replaying its
    log); otherwise each batch is built just before its apply call (a node applying entries
    as they commit), and the worker threads go idle in between. Only apply calls are timed."""
    gc.collect()
    make = lambda: [(rng.choice(keys), rng.randbytes(VALUE_LEN)) for _ in range(BATCH)]  # noqa: E731
    work = [make() for _ in range(batches)] if sustained else None
    elapsed = 0.0
    for i in range(batches):
        ops = work[i] if work is not None else make()
        t = time.perf_counter()
        store.apply(ops)
        elapsed += time.perf_counter() - t
    return elapsed / (batches * BATCH) * 1e9


def bench_update(n: int, batches: int) -> dict:
    rng = random.Random(1)
    store = _core.StateStore()
    keys = fill(store, n, VALUE_LEN, rng)
    sustained = overwrite_ns_per_op(store, keys, batches, rng, sustained=True)
    intermittent = overwrite_ns_per_op(store, keys, batches, rng, sustained=False)
    assert store.digest() == store.recompute_digest(), "incremental digest drifted"
    return {
        "update_ns_per_op": sustained,
        "update_ns_per_op_intermittent": intermittent,
        "update_store_entries": n,
    }


def bench_reference_update(n: int, batches: int) -> dict:
    # The reference costs the same per op whatever the store's size (a dict and a fixed-size
    # lattice), so a smaller store keeps the baseline's set-up time reasonable.
    rng = random.Random(2)
    store = ReferenceStore()
    keys = fill(store, n, VALUE_LEN, rng, chunk=1000)
    ns = overwrite_ns_per_op(store, keys, batches, rng, sustained=True)
    return {"reference_update_ns_per_op": ns, "reference_store_entries": n}


def bench_full_hash(n: int) -> dict:
    rng = random.Random(3)
    store = _core.StateStore()
    fill(store, n, 1024, rng)
    stats = store.stats()
    best = min(timed(store.recompute_digest) for _ in range(3))
    gib = (stats["key_bytes"] + stats["value_bytes"]) / 2**30
    return {"full_hash_gib_per_s": gib / best, "full_hash_state_gib": gib}


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def bench_diff_and_snapshot(n: int, d: int, workdir: str) -> dict:
    rng = random.Random(4)
    a = _core.StateStore()
    keys = fill(a, n, VALUE_LEN, rng)
    b = a.clone()
    b.apply([(k, b"changed") for k in rng.sample(keys, d)])
    diff_s = min(timed(a.diff, b) for _ in range(5))
    diff = a.diff(b)
    assert len(diff) == d, f"diff found {len(diff)} keys, expected {d}"

    # The same diff as two processes would run it: only digests and bucket contents cross.
    def protocol():
        frontier = [0]
        if a.node_digests(0) == b.node_digests(0):
            return []
        for level in range(_core.TREE_DEPTH):
            remote = b.children_digests(level, frontier)
            frontier = a.compare_children(level, frontier, remote)
        return a.diff_buckets(frontier, b.bucket_entries(frontier))

    protocol_s = min(timed(protocol) for _ in range(5))
    assert protocol() == diff

    path = os.path.join(workdir, "bench.snap")
    write_s = min(timed(a.write_snapshot, path, 1) for _ in range(3))
    size = os.path.getsize(path)
    load_s = min(timed(_core.StateStore.load_snapshot, path) for _ in range(3))
    loaded, _ = _core.StateStore.load_snapshot(path)
    assert loaded.digest() == a.digest()
    return {
        "diff_ms_1m_100": diff_s * 1e3,
        "diff_protocol_ms_1m_100": protocol_s * 1e3,
        "snapshot_write_mb_per_s": size / 1e6 / write_s,
        "snapshot_load_s_1m": load_s,
        "snapshot_bytes_1m": size,
    }


def bench_memory(n: int) -> dict:
    rng = random.Random(5)
    gc.collect()
    before = rss_bytes()
    store = _core.StateStore()
    fill(store, n, VALUE_LEN, rng)
    gc.collect()
    after = rss_bytes()
    return {
        "bytes_per_entry": (after - before) / n,
        "estimated_bytes_per_entry": store.memory_usage() / n,
    }


MEASUREMENTS = {
    "update": lambda a: bench_update(a.entries, a.batches),
    "reference_update": lambda a: bench_reference_update(a.reference_entries, a.reference_batches),
    "full_hash": lambda a: bench_full_hash(a.hash_entries),
    "diff_snapshot": lambda a: bench_diff_and_snapshot(a.entries, 100, a.workdir),
    "memory": lambda a: bench_memory(a.entries),
}


def run_isolated(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--only", name, "--entries", str(args.entries),
           "--batches", str(args.batches), "--hash-entries", str(args.hash_entries),
           "--reference-entries", str(args.reference_entries),
           "--reference-batches", str(args.reference_batches), "--workdir", args.workdir]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", help="also write the JSON object to this file")
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--batches", type=int, default=300, help="batches of 1,000 overwrites")
    p.add_argument("--hash-entries", type=int, default=1 << 20, help="1 KiB entries for the full hash")
    p.add_argument("--reference-entries", type=int, default=20_000)
    p.add_argument("--reference-batches", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where snapshot files go (default: a temp dir)")
    p.add_argument("--only", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.only:
        print(json.dumps(MEASUREMENTS[args.only](args)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, bars() as shown:
        args.workdir = tmp
        result: dict = {}
        measured = shown.bar("bench-core", total=len(MEASUREMENTS), unit="measurements")
        for name in MEASUREMENTS:
            print(f"bench-core: {name} ...", file=sys.stderr)
            measured.step(f"bench-core: {name}")
            result.update(run_isolated(name, args))
    result["update_speedup"] = result["reference_update_ns_per_op"] / result["update_ns_per_op"]
    result["targets"] = {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
    result["targets_met"] = {
        k: (result[k] <= v if op == "<=" else result[k] >= v) for k, (op, v) in TARGETS.items()
    }
    result["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
