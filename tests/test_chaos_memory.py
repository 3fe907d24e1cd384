"""Agent memory in chaos runs: the memory checks on hand-built histories (each must catch what
it is there to catch), and short real runs — a 3-node cluster under kills (and, as root,
partitions) with remember, batches, forget and linearizable recall in the workload — that
must pass every check (synapse/chaos/DESIGN.md, "Memory operations")."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from synapse.chaos.checkers import duplicate_memories, index_mismatches, lost_memories, recall_violations
from synapse.chaos.history import FAIL, FORGET, OK, RECALL, REMEMBER, UNKNOWN, Op
from synapse.chaos.netns import unavailable_reason
from synapse.chaos.runner import MEMORY_DIM, Run, RunConfig, memory_vector, write_report

NS = "chaos/mem0"
_ids = itertools.count(1)


def remember(t0, t1, *records, outcome=OK, answers=None, ns=NS):
    """``records``: (id, text) pairs; answered as stored unless ``answers`` says otherwise."""
    output = None
    if outcome == OK:
        output = answers or [[i, i, False] for i, _ in records]
    return Op(next(_ids), 0, ns, REMEMBER, t0, t1, outcome, [list(r) for r in records], output=output)


def forget(t0, t1, record_id, deleted=True, outcome=OK, ns=NS):
    return Op(next(_ids), 0, ns, FORGET, t0, t1, outcome, record_id, output=deleted if outcome == OK else None,
              notes={"node": 2})


def recall(t0, t1, record_id, results, ns=NS):
    return Op(next(_ids), 0, ns, RECALL, t0, t1, OK, record_id, output=results)


def held(*records, ns=NS) -> dict:
    return {ns: list(records)}


# --- lost ---


def test_an_acknowledged_memory_missing_from_one_node_is_reported_lost():
    w = remember(0, 1, ("a", "text a"), ("b", "text b"))
    memories = {"n1": held(("a", "text a"), ("b", "text b")), "n2": held(("b", "text b"))}
    (lost,) = lost_memories([w], memories)
    assert lost.check == "lost" and lost.node == "n2" and lost.op is w
    assert "'a'" in lost.explain() and lost.explain().startswith("LOST on n2")
    assert lost_memories([w], {"n1": held(("a", "text a"), ("b", "text b"))}) == []


def test_an_acknowledged_memory_with_another_text_is_reported():
    w = remember(0, 1, ("a", "text a"))
    (bad,) = lost_memories([w], {"n1": held(("a", "something else"))})
    assert bad.check == "wrong-text" and bad.node == "n1"


def test_forgotten_and_unknown_memories_are_not_claimed_lost():
    h = [remember(0, 1, ("a", "text a")), forget(2, 3, "a"),  # forgotten
         remember(0, 1, ("b", "text b")), forget(2, None, "b", outcome=UNKNOWN),  # maybe forgotten
         remember(0, 1, ("c", "text c")), forget(0.5, 0.9, "c", deleted=False),  # forgotten, concurrently
         remember(4, None, ("d", "text d"), outcome=UNKNOWN),  # may or may not have happened
         remember(4, 5, ("e", "text e"), outcome=FAIL)]  # surely did not
    assert lost_memories(h, {"n1": held(), "n2": held(("d", "text d"))}) == []


def test_a_forget_failed_before_proposing_does_not_excuse_a_missing_memory():
    h = [remember(0, 1, ("a", "text a")), forget(2, 3, "a", outcome=FAIL)]
    assert [v.check for v in lost_memories(h, {"n1": held()})] == ["lost"]


def test_a_forget_that_finds_no_acknowledged_memory_reports_it_lost():
    h = [remember(0, 1, ("a", "text a")), forget(2, 3, "a", deleted=False)]
    (lost,) = lost_memories(h, {"n1": held()})
    assert lost.check == "lost" and lost.node == "n2" and "did not exist" in lost.explain()


# --- duplicates ---


def test_one_text_held_by_two_records_is_reported():
    h = [remember(0, 1, ("a", "same")), remember(2, None, ("b", "same"), outcome=UNKNOWN)]
    (dup,) = duplicate_memories(h, {"n1": held(("a", "same"), ("b", "same"))})
    assert dup.check == "stored-twice" and dup.node == "n1" and "['a', 'b']" in dup.explain()


def test_a_duplicate_stored_although_dedup_saw_the_first_is_reported():
    first = remember(0, 1, ("a", "same"))
    again = remember(2, 3, ("b", "same"))  # answered as stored while "a" held the text
    assert [v.op for v in duplicate_memories([first, again], {"n1": held(("a", "same"))})] == [again]
    # Answered as a duplicate of "a": right. After "a" was forgotten: stored, right too.
    right = remember(2, 3, ("b", "same"), answers=[["b", "a", True]])
    assert duplicate_memories([first, right], {"n1": held(("a", "same"))}) == []
    assert duplicate_memories([first, forget(1.5, 1.8, "a"), again], {"n1": held(("b", "same"))}) == []


def test_a_duplicate_answer_naming_a_record_never_written_with_that_text_is_reported():
    h = [remember(0, 1, ("a", "text a")), remember(2, 3, ("b", "text b"), answers=[["b", "a", True]])]
    assert [v.check for v in duplicate_memories(h, {"n1": held(("a", "text a"))})] == ["stored-twice"]


def test_a_record_no_remember_may_have_written_is_reported():
    h = [remember(0, 1, ("a", "text a")), remember(2, 3, ("b", "text b"), outcome=FAIL),
         remember(4, 5, ("c", "text a"), answers=[["c", "a", True]])]
    found = duplicate_memories(h, {"n1": held(("a", "text a"), ("b", "text b"), ("z", "never sent"))})
    assert sorted(v.check for v in found) == ["phantom", "phantom"]
    # "c" was answered a duplicate: it must not exist either.
    assert "phantom" in {v.check for v in duplicate_memories(h, {"n1": held(("a", "text a"), ("c", "text a"))})}


# --- recalls ---


def test_recalls_see_acknowledged_memories_and_never_forgotten_ones():
    a, b = remember(0, 1, ("a", "text a")), remember(0, 1, ("b", "text b"))
    gone = forget(2, 3, "b")
    good = recall(4, 5, "a", [["a", 1.0], ["c", 0.3]])
    assert recall_violations([a, b, gone, good]) == []
    shows_forgotten = recall(4, 5, "a", [["a", 1.0], ["b", 0.2]])
    (v,) = recall_violations([a, b, gone, shows_forgotten])
    assert v.check == "recalled-forgotten" and "'b'" in v.explain()
    # Forgotten while the recall ran: it may still see it.
    assert recall_violations([a, b, forget(4.5, 6, "b"), shows_forgotten]) == []


def test_a_recall_that_misses_an_acknowledged_memory_is_reported():
    a = remember(0, 1, ("a", "text a"))
    for results in ([], [["c", 0.9], ["a", 1.0]], [["a", 0.8]]):
        (v,) = recall_violations([a, recall(2, 3, "a", results)])
        assert v.check == "missed-recall"
    # Remembered while the recall ran, or forgotten before it answered: either way is right.
    assert recall_violations([remember(2.5, 3.5, ("a", "text a")), recall(2, 3, "a", [])]) == []
    assert recall_violations([a, forget(2.5, 4, "a"), recall(2, 3, "a", [])]) == []


def test_index_mismatches():
    good = {"n1": {(NS, "a"): [["a", 0.99999], ["b", 0.4]]}}
    assert index_mismatches(good) == []
    bad = {"n1": {(NS, "a"): [["b", 0.99], ["a", 0.98]]}, "n2": {(NS, "a"): "HTTP 503 unavailable"},
           "n3": {(NS, "a"): []}}
    assert [(v.check, v.node) for v in index_mismatches(bad)] == [("index", "n1"), ("index", "n2"), ("index", "n3")]


def test_memory_vectors_are_deterministic_and_distinct():
    a = memory_vector("c1-7")
    assert a == memory_vector("c1-7") and len(a) == MEMORY_DIM and any(a)
    assert all(-1 <= x < 1 for x in a) and a != memory_vector("c1-8")


# --- real runs ---


def _run(tmp_path: Path, **kw) -> dict:
    result = Run(RunConfig(**kw), tmp_path / "run").execute()
    result_json, report = write_report(result, tmp_path / "run")
    assert "<svg" in report.read_text()
    return json.loads(result_json.read_text())


MEMORY_CHECKS = ("memory_no_lost", "memory_no_duplicates", "memory_recall", "memory_index")


# Each kind of operation acknowledged this many times at least: the load goes on past the
# duration until it is (RunConfig.min_acknowledged), so a slow machine still yields a history
# worth judging instead of a failure counting what fitted in six seconds.
ENOUGH = 6


def _assert_memory_passed(result: dict) -> None:
    """Every check passed, the memory ones included, on records every node held; and every
    kind of memory operation was acknowledged: batches, duplicates, forgets, recalls."""
    failed = {k: v for k, v in result["checks"].items() if not v["ok"]}
    assert not failed, json.dumps(failed, indent=1)[:4000]
    checks = result["checks"]
    assert set(MEMORY_CHECKS) | {"enough_acknowledged"} <= set(checks)
    assert checks["memory_no_lost"]["acknowledged"] >= 3 * ENOUGH and checks["memory_recall"]["recalls"] >= ENOUGH
    assert checks["memory_index"]["sampled"] > 0 and checks["memory_index"]["nodes"] == 3
    history = [o for o in result["history"] if o["outcome"] == OK]
    assert sum(o["kind"] == REMEMBER and len(o["value"]) > 1 for o in history) >= ENOUGH, "too few batches"
    assert sum(o["kind"] == REMEMBER and o["output"][0][2] for o in history) >= ENOUGH, "too few duplicates"
    assert sum(o["kind"] == FORGET and o["output"] for o in history) >= ENOUGH, "too little forgotten"
    assert sum(o["kind"] in ("read", "write", "cas") for o in history) >= 3 * ENOUGH, "the kv workload stopped"


def test_loopback_run_with_memory_operations_under_kills(tmp_path):
    result = _run(tmp_path, duration=6.0, clients=6, keys=4, nemeses=("kill", "kill-leader"), mode="loopback",
                  seed=11, fault_every=(0.5, 1.0), fault_for=(0.5, 1.5), memory_ops=0.5, min_acknowledged=ENOUGH)
    _assert_memory_passed(result)
    assert any(f["kind"].startswith("kill") for f in result["faults"]), "the nemesis made no fault"


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"needs network namespaces: {unavailable_reason()}")
def test_netns_run_with_memory_operations_under_partitions(tmp_path):
    result = _run(tmp_path, duration=6.0, clients=6, keys=4, nemeses=("partition-halves", "isolate-leader"),
                  mode="netns", seed=12, fault_every=(0.5, 1.0), fault_for=(1.0, 2.0), memory_ops=0.5,
                  min_acknowledged=ENOUGH)
    _assert_memory_passed(result)
    assert any(f["kind"] in ("partition-halves", "isolate-leader") for f in result["faults"])


def test_the_command_runs_memory_operations(tmp_path):
    r = subprocess.run([sys.executable, "-m", "synapse.cli.main", "chaos", "run", "--mode", "loopback", "--nemesis",
                        "kill", "--duration", "3", "--clients", "4", "--memory-ops", "0.5", "--seed", "4",
                        "--min-acknowledged", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "memory_no_lost ok" in r.stdout and "memory_index ok" in r.stdout and "enough_acknowledged ok" in r.stdout
    result = json.loads((tmp_path / "run-4" / "result.json").read_text())
    assert result["config"]["memory_ops"] == 0.5 and result["config"]["min_acknowledged"] == 2
    assert set(result["acknowledged"]) == {"read", "write", "cas", "remember", "remember-batch", "remember-duplicate",
                                           "forget", "recall"} and min(result["acknowledged"].values()) >= 2
    refused = subprocess.run([sys.executable, "-m", "synapse.cli.main", "chaos", "run", "--memory-ops", "2"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--memory-ops" in refused.stderr
