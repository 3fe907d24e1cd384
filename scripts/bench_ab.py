"""A/B: two versions of Synapse side by side in one run, on the same machine, as ratios.

Each version (a git commit, or the working tree) runs as its own 3-node cluster on loopback
(cluster secret on, defaults otherwise); both run at once and are driven alternately, in
``--rounds`` rounds of short windows, the order flipped every round, with the same load
generator as the other bench scripts (``bench_node.run_load``: ``--clients`` clients, one
request in flight each, 100-byte values): writes (``PUT``) then linearizable reads (``GET``),
sent to the leader (``--target leader``) or spread over every node (``--target spread``: the
k-th request of client c goes to node (c + k) mod 3). A commit is built in a git worktree of
its own (``cargo build`` of its ``synapse._core`` and launcher; the venv's packages are
shared) and its nodes run with that worktree first on ``PYTHONPATH``.

Per version: writes/s, write p50/p99, linearizable reads/s, read p50/p99 (medians over the
rounds), and server CPU per acknowledged write (µs, the three nodes summed); then ``ratios``
(B over A) with the spread of the per-round ratios. Shared, noisy machines swing ±10–15%
between runs: that is why both versions run in one.

Usage: ./scripts/bench-ab --a REF [--b REF] [--rounds 6] [--duration 5] [--clients 64] [--scoped a,b] [--tls a,b]
       [--target leader|spread] [--json FILE] [--keep]
REF: a commit (anything ``git rev-parse`` takes), or ``.`` for the working tree (default b).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_node as bn  # noqa: E402

from synapse.cli.progress import bars  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench-ab] {msg}", file=sys.stderr, flush=True)


def checkout(ref: str, tmp: Path) -> tuple[Path, str]:
    """(the source tree of ``ref``, its label). ``.``: this working tree, as it is."""
    if ref == ".":
        return ROOT, "working tree"
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True,
                         text=True)
    if sha.returncode != 0:
        raise SystemExit(f"error: --a/--b {ref!r} is not a commit here ({sha.stderr.strip()}); give a commit or '.'")
    sha = sha.stdout.strip()
    tree = tmp / f"src-{sha[:12]}"
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), sha], cwd=ROOT, check=True,
                   capture_output=True)
    log(f"building {sha[:12]} in {tree}")
    target = tmp / f"target-{sha[:12]}"
    env = dict(os.environ, CARGO_TARGET_DIR=str(target))
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "synapse-py", "-p", "synapse-launch"], cwd=tree,
                   env=env, check=True)
    suffix = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy(target / "release" / "lib_core.so", tree / "synapse" / f"_core{suffix}")
    launcher = target / "release" / "synapse-launch"
    if launcher.exists():
        shutil.copy(launcher, tree / "synapse" / "execution" / "synapse-launch")
    return tree, sha[:12]


@contextlib.contextmanager
def source_first(tree: Path):
    """The processes started inside import synapse from ``tree``: PYTHONPATH comes before the
    venv's path file."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree) + (os.pathsep + previous if previous else "")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def remove_checkouts(trees: list[Path]) -> None:
    for tree in trees:
        if tree != ROOT:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)


def versions_arguments(p: argparse.ArgumentParser, rounds: int) -> None:
    """The options every A/B script takes: the two versions, the rounds, the output."""
    p.add_argument("--a", required=True, help="the baseline: a commit, or '.' (the working tree)")
    p.add_argument("--b", default=".", help="the candidate (default: the working tree)")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--json", help="also write the JSON object to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, worktrees) after the run")


class Version:
    def __init__(self, name: str, ref: str, tree: Path, label: str, root: Path, scoped: bool = False,
                 tls: bool = False) -> None:
        self.name, self.ref, self.tree, self.label = name, ref, tree, label
        with source_first(tree):
            self.cluster = bn.SynapseCluster(root / name, extra=["--worker-slots", "0"], tls=tls).start()
        self.token = self.cluster._token()
        self.tls, self.scoped = tls, scoped
        if scoped:
            self.token = scoped_token(self.cluster, self.token, self.url(self.cluster.leader()))
        self.rounds: list[dict] = []

    def url(self, member) -> str:
        return f"{'https' if self.tls else 'http'}://{member.api}"

    def urls(self, target: str) -> list[str]:
        if target == "leader":
            return [self.url(self.cluster.leader())]
        return [self.url(m) for m in self.cluster.members]

    def close(self) -> None:
        for m in self.cluster.members:
            m.sigkill()


def scoped_token(cluster: bn.SynapseCluster, root: str, url: str) -> str:
    """A token of its own principal and role, limited to the keys the load uses: every write
    and read is then checked against scopes, on the route and at apply time, like a real
    agent's (the root token's ``*`` matches at once)."""
    from synapse.client import Client

    with Client(url, root, ssl_context=cluster.ssl_context) as c:
        c.put_role("bench", ["kv:read:ab/", "kv:write:ab/"], deny=["kv:write:ab/never/"])
        c.put_principal("bench-agent", "agent", ["bench"])
        return c.create_token(["kv:read:ab/", "kv:write:ab/"], principal="bench-agent")["token"]


def window(version: Version, mode: str, args, prefix: str) -> dict:
    pids = {m.name: m.pid for m in version.cluster.members}
    urls = version.urls(args.target)
    extra = {"prefix": prefix, "urls": urls, "tls": version.cluster.tls_files}
    r = bn.run_load(mode, urls[0], version.token, args.clients, args.generators, pids, args.warmup, args.duration,
                    extra=extra)
    cpu_pct = sum(r.get("node_cpu_pct", {}).values())
    return {"per_s": r["per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"],
            "node_cpu_pct": cpu_pct,
            "cpu_us_per_op": round(cpu_pct / 100 * 1e6 / r["per_s"], 1) if r["per_s"] else None}


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def summary(version: Version) -> dict:
    out = {"ref": version.ref, "source": version.label, "tls": version.tls, "scoped_token": version.scoped}
    for mode, name in (("put", "writes"), ("get", "lin_reads")):
        rows = [r[mode] for r in version.rounds]
        out[f"{name}_per_s"] = median([r["per_s"] for r in rows])
        out[f"{name}_p50_ms"] = median([r["p50_ms"] for r in rows])
        out[f"{name}_p99_ms"] = median([r["p99_ms"] for r in rows])
        out[f"{name}_cpu_us_per_op"] = median([r["cpu_us_per_op"] for r in rows])
        out[f"{name}_errors"] = sum(sum(r["errors"].values()) for r in rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    versions_arguments(p, rounds=6)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per window (default 5)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--generators", type=int, default=1)
    p.add_argument("--target", choices=("leader", "spread"), default="leader")
    p.add_argument("--tls", default="", help="versions (a, b or a,b) served over HTTPS with mutual TLS "
                   "(certificates from `synapse tls init`); their clients verify and present certificates")
    p.add_argument("--scoped", default="", help="versions (a, b or a,b) driven with a scoped token instead of the root token")
    args = p.parse_args()
    tmp = bn._WORKDIR = Path(tempfile.mkdtemp(prefix="synapse-bench-ab-"))
    versions: list[Version] = []
    failed: BaseException | None = None
    result: dict = {"machine": bn.machine_info(), "settings": vars(args)}
    try:
        with bars() as shown:
            # Each version built and started, then every round's four windows.
            steps = shown.bar("bench-ab", total=2 + 4 * args.rounds, unit="steps")
            for name, ref in (("a", args.a), ("b", args.b)):
                steps.step(f"bench-ab: building and starting version {name}")
                tree, label = checkout(ref, tmp)
                log(f"starting version {name} ({label})")
                versions.append(Version(name, ref, tree, label, tmp, scoped=name in args.scoped, tls=name in args.tls))
            for n in range(args.rounds):
                order = versions if n % 2 == 0 else versions[::-1]
                rows = {v.name: {} for v in versions}
                for mode in ("put", "get"):
                    for v in order:
                        steps.step(f"bench-ab: round {n + 1}/{args.rounds}, {v.name} {mode}")
                        rows[v.name][mode] = r = window(v, mode, args, f"ab/{n}")
                        log(f"round {n + 1}/{args.rounds} {v.name} {mode}: {r['per_s']}/s p99 {r['p99_ms']} ms, "
                            f"{r['cpu_us_per_op']} µs CPU per op")
                for v in versions:
                    v.rounds.append(rows[v.name])
        a, b = (summary(v) for v in versions)
        result.update({"a": a, "b": b})
        ratios = {}
        for key in ("writes_per_s", "lin_reads_per_s", "writes_p99_ms", "lin_reads_p99_ms", "writes_cpu_us_per_op"):
            ratios[f"b_over_a_{key}"] = round(b[key] / a[key], 3) if a[key] and b[key] else None
        per_round = [vb["put"]["per_s"] / va["put"]["per_s"] for va, vb in zip(versions[0].rounds, versions[1].rounds)
                     if va["put"]["per_s"]]
        ratios["b_over_a_writes_per_round"] = [round(x, 3) for x in per_round]
        result["ratios"] = ratios
    except BaseException as e:  # noqa: BLE001 — published below with the exit status it calls for
        failed = e
        log(f"failed: {type(e).__name__}: {e}")
    finally:
        for v in versions:
            v.close()
        remove_checkouts([v.tree for v in versions])
    bn.publish(result, args.json, tmp, args.keep, failed, log)


if __name__ == "__main__":
    main()
