"""The hostile-input campaign (issue 15), run by hand: a live 3-node cluster on loopback fed
schemathesis on every route of synapse/api/openapi.yaml — through every node, with the root
token, a read-only scoped token, no token and a wrong token — then hostile frames on every
node's Raft port (synapse/chaos/hostile.py). Prints one JSON object:

- per schemathesis run: the node, the cases, the 5xx answers, whether every check held (no
  server error, every status documented, every body matching its schema), and for the runs
  whose every change must be refused, whether nothing changed: the state hash on every node
  (no token, a wrong one: nothing reaches the log) or every key's version and every
  principal, role and token (a read-only token: its linearizable reads are log entries, and
  every entry moves the hash);
- for the Raft attack: the connections made, whether every node stayed up and the state
  (applied index, hash, term) did not move.

Usage: ./scripts/hostile-input [--examples N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synapse.chaos.hostile import attack  # noqa: E402
from tests.conformance import run_schemathesis  # noqa: E402
from tests.harness import SECRET, Cluster  # noqa: E402

# With a valid root token, a generated valid request to this route adds a voter that does not
# exist; the cluster then waits for a quorum it cannot have (tests/test_api_conformance.py).
NEVER_WITH_A_VALID_TOKEN = ["POST /v1/cluster/members", "DELETE /v1/cluster/members/{node_id}"]
# A read-only token may still mint narrower tokens for itself (a real change): left out of the
# run whose state must not move.
MINTS = ["POST /v1/tokens"]


def five_hundreds(statuses: dict[str, set[int]]) -> dict[str, list[int]]:
    return {op: sorted(s for s in codes if s >= 500 and s != 503) for op, codes in statuses.items()
            if any(s >= 500 and s != 503 for s in codes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=20, help="schemathesis examples per operation (root-token runs)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="synapse-hostile-"))
    cluster = Cluster.create(work / "cluster", 3, extra=["--worker-slots", "0", "--checkpoint-interval", "0"]).start()
    started = time.monotonic()
    result: dict = {"schemathesis": [], "raft": {}}
    try:
        admin = cluster.client()
        admin.put_role("hostile-reader", ["kv:read:", "memory:read:"])
        admin.put_principal("hostile", "agent", ["hostile-reader"])
        reader = admin.create_token(["kv:read:"], principal="hostile")["token"]

        def hashes() -> dict[str, str]:
            return {k: v["state_hash"] for k, v in cluster.wait_converged(30).items()}

        def records() -> tuple:
            """What a token could change: every key with its version, the principals, roles and
            tokens. (The state hash moves with every log entry, and a linearizable read is one.)"""
            cluster.wait_converged(30)
            kv, after = [], None
            while True:
                page = admin.scan("", limit=1000, start_after=after)
                kv += [(i["key"], i["version"]) for i in page["items"]]
                after = page["next_start_after"]
                if after is None:
                    break
            return kv, admin.principals(), admin.roles(), admin.tokens()

        for i, node in enumerate(cluster.nodes):
            # The last field: what must not move — None, the records a token could change
            # (reads still append log entries), or the whole state hash (nothing reaches the log).
            runs = [("root-token", [f"Authorization: Bearer {cluster.token}"], args.examples,
                     "coverage,fuzzing,stateful", NEVER_WITH_A_VALID_TOKEN, None),
                    ("read-only-token", [f"Authorization: Bearer {reader}"], max(5, args.examples // 2),
                     "coverage,fuzzing", MINTS, records),
                    ("no-token", [], 5, "coverage,fuzzing", [], hashes),
                    ("wrong-token", ["Authorization: Bearer root.not-the-secret"], 5, "coverage,fuzzing", [], hashes)]
            for name, headers, examples, phases, exclude, unchanged in runs:
                before = unchanged() if unchanged else None
                run = run_schemathesis(node.url, work, f"{node.node_id}-{name}", headers, examples, phases, exclude)
                entry = {"node": node.node_id, "token": name, "cases": run["cases"], "seconds": run["seconds"],
                         "checks_held": run["rc"] == 0, "server_errors": five_hundreds(run["statuses"]),
                         "operations_answered": len(run["statuses"])}
                if run["rc"] != 0:
                    entry["failures"] = run["output"][-4000:]
                if unchanged:
                    entry["state_unchanged"] = unchanged() == before
                    entry["unchanged_means"] = "records" if unchanged is records else "state hash"
                result["schemathesis"].append(entry)
            print(f"hostile-input: node {i + 1} of 3 done", file=sys.stderr)
        before = cluster.wait_converged(30)
        connections = sum(attack(n.raft, SECRET, seed=15 + i) for i, n in enumerate(cluster.nodes))
        time.sleep(1.0)
        alive = all(n.alive() for n in cluster.nodes)
        after = cluster.wait_converged(30) if alive else {}
        key = lambda s: {k: (v["applied_index"], v["state_hash"], v["term"]) for k, v in s.items()}  # noqa: E731
        admin.put("hostile/after", True)
        result["raft"] = {"connections": connections, "every_node_up": alive,
                          "state_unchanged": alive and key(before) == key(after),
                          "writes_after": admin.get("hostile/after")["value"] is True}
    finally:
        cluster.close()
    runs = result["schemathesis"]
    result["summary"] = {
        "cases": sum(r["cases"] or 0 for r in runs),
        "server_errors": sum(len(r["server_errors"]) for r in runs),
        "runs_with_failed_checks": sum(not r["checks_held"] for r in runs),
        "refused_runs_that_changed_state": sum(r.get("state_unchanged") is False for r in runs),
        "raft_ok": bool(result["raft"].get("state_unchanged") and result["raft"].get("writes_after")),
        "seconds": round(time.monotonic() - started),
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    s = result["summary"]
    return 0 if (s["server_errors"], s["runs_with_failed_checks"], s["refused_runs_that_changed_state"]) == (0, 0, 0) \
        and s["raft_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
