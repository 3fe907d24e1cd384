"""What bubblewrap itself costs per task here: `bwrap <the bwrap driver's options> -- /bin/true`,
run N times as uid/gid 65534 (as the driver runs it, through setpriv), with the driver's
options and with one of them left out at a time. Prints JSON: machine-wide busy CPU per run (from
/proc/stat, so the kernel's asynchronous namespace teardown counts) and wall time per run.

It measures the floor under `scripts/bench-tasks`'s bubblewrap figure; it changes nothing.

Usage: python scripts/bench_bwrap.py [--runs 200]  (as root, with bwrap and setpriv installed)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synapse.execution.drivers import _BWRAP_BASE  # noqa: E402 (the driver's own options)

_AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# Options with their argument count, as _BWRAP_BASE spells them.
_ARITY = {"--ro-bind": 2, "--dev": 1, "--proc": 1, "--tmpfs": 1}


def _busy_jiffies() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _without(option: str) -> list[str]:
    out, i = [], 0
    while i < len(_BWRAP_BASE):
        if _BWRAP_BASE[i] == option:
            i += 1 + _ARITY.get(option, 0)
            continue
        out.append(_BWRAP_BASE[i])
        i += 1
    return out


def _measure(options: list[str], runs: int) -> dict:
    time.sleep(1.0)  # let the previous variant's teardown finish
    busy, start = _busy_jiffies(), time.perf_counter()
    for _ in range(runs):
        subprocess.run([*_AS_NOBODY, "bwrap", *options, "--", "/bin/true"], check=True)
    wall = time.perf_counter() - start
    time.sleep(0.5)  # namespace teardown is asynchronous: count it
    ms_per_jiffy = 1000 / 100  # USER_HZ
    return {"busy_cpu_ms_per_run": round((_busy_jiffies() - busy) * ms_per_jiffy / runs, 2),
            "wall_ms_per_run": round(wall * 1000 / runs, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    for tool in ("bwrap", "setpriv"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: {tool} is not installed (apt-get install bubblewrap util-linux)")
    variants = {"driver's options": list(_BWRAP_BASE), "with --share-net": [*_BWRAP_BASE, "--share-net"]}
    for option in ("--dev", "--proc", "--tmpfs"):
        variants[f"without {option}"] = _without(option)
    result = {"runs": args.runs, "options": _BWRAP_BASE,
              "variants": {name: _measure(options, args.runs) for name, options in variants.items()},
              "notes": ["busy CPU is machine-wide: run it on an otherwise idle machine"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
