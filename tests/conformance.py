"""Running schemathesis (the version pinned in scripts/lib/setup.sh) against a node and
reading its report: tests/test_api_conformance.py (one node, in the suite) and
scripts/hostile_input.py (a 3-node cluster, by hand) share it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "synapse" / "api" / "openapi.yaml"
SCHEMATHESIS_VERSION = "4.32.5"  # as pinned in scripts/lib/setup.sh
SEED = 20261203
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"


def run_schemathesis(url: str, tmp: Path, name: str, headers: list[str], max_examples: int, phases: str,
                 exclude: list[str] = ()) -> dict:
    """One schemathesis run against the node at ``url``: its exit code, its output, and from
    its NDJSON report the statuses each operation answered with (and how many cases ran)."""
    report = tmp / name
    args = [sys.executable, "-m", "schemathesis.cli", "run", str(SPEC), "--url", url,
            "--checks", CHECKS, "--seed", str(SEED), "--generation-database", "none", "--workers", "1",
            "--max-examples", str(max_examples), "--phases", phases, "--request-timeout", "30",
            "--report", "ndjson", "--report-dir", str(report), "--no-color"]
    for header in headers:
        args += ["-H", header]
    for label in exclude:
        args += ["--exclude-name", label]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    statuses: dict[str, set[int]] = {}  # operation -> the statuses it answered with
    for path in report.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            finished = json.loads(line).get("ScenarioFinished")
            if not finished or not finished.get("recorder"):
                continue
            recorder = finished["recorder"]
            for case_id, interaction in recorder.get("interactions", {}).items():
                if interaction.get("response"):
                    case = recorder["cases"][case_id]["value"]  # its path is the spec's template
                    label = f"{case['method'].upper()} {case['path']}"
                    statuses.setdefault(label, set()).add(interaction["response"]["status_code"])
    seconds = time.monotonic() - started
    cases = re.search(r"(\d+) generated", proc.stdout)
    print(f"schemathesis {name}: {cases.group(1) if cases else '?'} cases in {seconds:.0f} s, exit {proc.returncode}",
          file=sys.stderr)
    return {"rc": proc.returncode, "output": proc.stdout + proc.stderr, "statuses": statuses,
            "cases": int(cases.group(1)) if cases else None, "seconds": round(seconds, 1)}


def failures(output: str) -> str:
    """The failures and errors sections of schemathesis' output, for the assertion message."""
    start = min((i for i in (output.find("=== ERRORS ==="), output.find("=== FAILURES ===")) if i >= 0),
                default=0)
    return re.sub(r"\n{3,}", "\n\n", output[max(0, output.rfind("\n", 0, start)):])[:20000]
