"""The replicated task state machine and the placement rule, on the pure command processor
(no cluster): leases fence stale results, nothing is assigned twice, retries and lost
workers, cancel, idempotency, bounded retention, and bad specs refused by field."""

from __future__ import annotations

import pytest

from synapse import _core
from synapse.orchestrator.scheduler import place
from synapse.state import processor as processor_module
from synapse.state.commands import CommandError, encode_entry, validate_command
from synapse.state.processor import CommandProcessor


class Log:
    """A processor fed one entry at a time, as Raft would."""

    def __init__(self) -> None:
        self.p = CommandProcessor(_core.StateStore())
        self.index = 0

    def apply(self, *commands: dict) -> list[dict]:
        self.index += 1
        return self.p.apply_entry(self.index, encode_entry(commands)).results

    def one(self, command: dict) -> dict:
        (result,) = self.apply(command)
        return result

    def task(self, task_id: str) -> dict:
        return self.p.task(task_id)


def _submit(log: Log, task_id: str, now: int = 1, **spec) -> dict:
    return log.one({"op": "task_submit", "task_id": task_id, "now_ms": now, "spec": {"command": ["true"], **spec}})


def _register(log: Log, worker: str, slots: int = 2, instance: str = "i1", **extra) -> dict:
    return log.one({"op": "worker_register", "worker_id": worker, "instance": instance, "slots": slots, "now_ms": 1, **extra})


def _assign(log: Log, task: str, worker: str, now: int = 2) -> dict:
    return log.one({"op": "task_assign", "task_id": task, "worker_id": worker, "now_ms": now})


def _finish(log: Log, task: str, lease: int, status: str = "succeeded", now: int = 3) -> dict:
    return log.one({"op": "task_finish", "task_id": task, "lease": lease, "now_ms": now, "outcome": {"status": status}})


def test_a_task_goes_pending_assigned_running_succeeded():
    log = Log()
    _register(log, "w1")
    assert _submit(log, "t1")["ok"]
    assert log.p.pending_tasks(10) == ["t1"]
    lease = _assign(log, "t1", "w1")["lease"]
    assert log.task("t1")["state"] == "assigned" and log.p.pending_tasks(10) == []
    assert log.one({"op": "task_start", "task_id": "t1", "lease": lease, "now_ms": 3})["state"] == "running"
    assert _finish(log, "t1", lease)["state"] == "succeeded"
    task = log.task("t1")
    assert task["state"] == "succeeded" and task["result"]["worker"] == "w1" and task["attempts"] == 1
    assert [h[0] for h in task["history"]] == ["pending", "assigned", "running", "succeeded"]
    assert log.p.worker_leases("w1") == {}


def test_a_task_is_never_assigned_twice():
    log = Log()
    _register(log, "w1")
    _register(log, "w2")
    _submit(log, "t1")
    # Two schedulers (an old and a new leader) both place it: the first assignment stands.
    first, second = log.apply({"op": "task_assign", "task_id": "t1", "worker_id": "w1", "now_ms": 2},
                              {"op": "task_assign", "task_id": "t1", "worker_id": "w2", "now_ms": 2})
    assert first["ok"] and second["error"] == "not_pending"
    assert log.task("t1")["worker"] == "w1" and log.p.worker_leases("w2") == {}


def test_a_result_under_a_revoked_lease_is_refused():
    log = Log()
    _register(log, "w1")
    _register(log, "w2")
    _submit(log, "t1", retries=1)
    old = _assign(log, "t1", "w1")["lease"]
    down = log.one({"op": "worker_down", "worker_id": "w1", "now_ms": 5})
    assert down["requeued"] == ["t1"] and log.task("t1")["state"] == "pending"
    new = _assign(log, "t1", "w2", now=6)["lease"]
    assert new != old
    late = _finish(log, "t1", old, "failed")
    assert late["error"] == "lease_revoked"
    assert log.task("t1")["state"] == "assigned"  # the stale result changed nothing
    assert _finish(log, "t1", new)["state"] == "succeeded"
    assert log.task("t1")["attempts"] == 2


def test_a_lost_worker_without_retry_budget_loses_the_task():
    log = Log()
    _register(log, "w1")
    _submit(log, "t1")  # retries 0
    _assign(log, "t1", "w1")
    assert log.one({"op": "worker_down", "worker_id": "w1", "now_ms": 5})["lost"] == ["t1"]
    assert log.task("t1")["state"] == "lost"


def test_failures_retry_with_doubling_backoff_then_fail():
    log = Log()
    _register(log, "w1")
    _submit(log, "t1", retries=2, backoff_ms=100)
    lease = _assign(log, "t1", "w1", now=10)["lease"]
    assert _finish(log, "t1", lease, "failed", now=20) == {"ok": True, "task_id": "t1", "state": "pending", "retry": True, "index": log.index}
    assert log.task("t1")["not_before_ms"] == 120
    assert _assign(log, "t1", "w1", now=119)["error"] == "not_due"
    lease = _assign(log, "t1", "w1", now=120)["lease"]
    _finish(log, "t1", lease, "timed-out", now=130)
    assert log.task("t1")["not_before_ms"] == 330  # 100 * 2
    lease = _assign(log, "t1", "w1", now=330)["lease"]
    assert _finish(log, "t1", lease, "failed", now=340)["state"] == "failed"  # budget spent
    assert log.task("t1")["attempts"] == 3


def test_cancel_revokes_a_running_task_and_refuses_its_result():
    log = Log()
    _register(log, "w1")
    _submit(log, "t1")
    lease = _assign(log, "t1", "w1")["lease"]
    answer = log.one({"op": "task_cancel", "task_id": "t1", "now_ms": 4})
    assert answer["state"] == "cancelled" and answer["worker_id"] == "w1"
    assert log.p.worker_leases("w1") == {}
    assert _finish(log, "t1", lease)["error"] == "lease_revoked"
    again = log.one({"op": "task_cancel", "task_id": "t1", "now_ms": 5})
    assert again["error"] == "already_finished"
    _submit(log, "t2")
    assert log.one({"op": "task_cancel", "task_id": "t2", "now_ms": 5})["state"] == "cancelled"
    assert log.p.pending_tasks(10) == []


def test_an_idempotency_key_gives_back_the_first_task():
    log = Log()
    first = log.one({"op": "task_submit", "task_id": "a", "now_ms": 1, "spec": {"command": ["true"]}, "idempotency_key": "k"})
    second = log.one({"op": "task_submit", "task_id": "b", "now_ms": 2, "spec": {"command": ["false"]}, "idempotency_key": "k"})
    assert (first["task_id"], first["duplicate"]) == ("a", False)
    assert (second["task_id"], second["duplicate"]) == ("a", True)
    assert log.task("b") is None


def test_registering_again_releases_what_the_earlier_life_held():
    log = Log()
    _register(log, "w1")
    _submit(log, "t1", retries=1)
    lease = _assign(log, "t1", "w1")["lease"]
    again = _register(log, "w1", instance="i2")
    assert again["epoch"] == 2 and again["requeued"] == ["t1"]
    assert _finish(log, "t1", lease)["error"] == "lease_revoked"
    # A down judgement about the earlier epoch does not hit the new life.
    assert log.one({"op": "worker_down", "worker_id": "w1", "epoch": 1, "now_ms": 9})["error"] == "stale_epoch"


def test_ended_tasks_are_evicted_oldest_first(monkeypatch):
    monkeypatch.setattr(processor_module, "TASK_RETENTION", 3)
    log = Log()
    _register(log, "w1", slots=10)
    for i in range(5):
        log.one({"op": "task_submit", "task_id": f"t{i}", "now_ms": 1, "spec": {"command": ["true"]}, "idempotency_key": f"k{i}"})
        lease = _assign(log, f"t{i}", "w1")["lease"]
        _finish(log, f"t{i}", lease)
    assert [t for t, _ in log.p.tasks()] == ["t2", "t3", "t4"]
    # An evicted task's idempotency key is free again.
    assert log.one({"op": "task_submit", "task_id": "x", "now_ms": 1, "spec": {"command": ["true"]}, "idempotency_key": "k0"})["duplicate"] is False


def test_the_same_entries_give_the_same_state_hash():
    logs = [Log(), Log()]
    for log in logs:
        _register(log, "w1")
        _submit(log, "t1", retries=1)
        lease = _assign(log, "t1", "w1")["lease"]
        log.one({"op": "worker_down", "worker_id": "w1", "now_ms": 7})
        _finish(log, "t1", lease)
    assert logs[0].p.store.digest() == logs[1].p.store.digest()


@pytest.mark.parametrize("spec, field", [
    ({}, "spec.command"),
    ({"command": ["a"], "entry": "m:f"}, "spec.command"),
    ({"command": []}, "spec.command"),
    ({"entry": "not an entry"}, "spec.entry"),
    ({"command": ["a"], "args": b"[]"}, "spec.args"),
    ({"command": ["a"], "limits": {"cpu_s": -1}}, "spec.limits.cpu_s"),
    ({"command": ["a"], "limits": {"memory_mb": 1}}, "spec.limits.memory_mb"),
    ({"command": ["a"], "limits": {"bogus": 1}}, "spec.limits.bogus"),
    ({"command": ["a"], "files": {"../escape": b""}}, "spec.files"),
    ({"command": ["a"], "files": {"/abs": b""}}, "spec.files"),
    ({"command": ["a"], "capabilities": {"write_paths": ["relative"]}}, "spec.capabilities.write_paths"),
    ({"command": ["a"], "capabilities": {"network": "yes"}}, "spec.capabilities.network"),
    ({"command": ["a"], "env": {"1BAD": "x"}}, "spec.env"),
    ({"command": ["a"], "priority": 5000}, "spec.priority"),
    ({"command": ["a"], "retries": -1}, "spec.retries"),
    ({"command": ["a"], "surprise": 1}, "spec.surprise"),
])
def test_bad_specs_are_refused_naming_the_field(spec, field):
    command = {"op": "task_submit", "task_id": "t", "now_ms": 1, "spec": spec}
    log = Log()
    result = log.one(command)
    assert result["ok"] is False and result["message"].startswith(field), result
    assert log.task("t") is None
    with pytest.raises(CommandError) as err:
        from synapse.state.tasks import check_spec

        check_spec(spec)
    assert err.value.field == field


def test_bad_ids_are_refused():
    with pytest.raises(CommandError, match="task_id"):
        validate_command({"op": "task_submit", "task_id": "has space", "now_ms": 1, "spec": {"command": ["a"]}})
    with pytest.raises(CommandError, match="slots"):
        validate_command({"op": "worker_register", "worker_id": "w", "instance": "i", "slots": 0, "now_ms": 1})


def _pending(task_id, labels=None, memory=None, prio=100, not_before=0):
    spec = {"command": ["true"], "labels": labels or {}, "priority": prio}
    if memory:
        spec["limits"] = {"memory_mb": memory}
    return task_id, {"state": "pending", "not_before_ms": not_before, "spec": spec}


def test_placement_spreads_by_free_slots_and_respects_labels_and_memory():
    workers = {
        "a": {"state": "up", "slots": 2, "labels": {"gpu": "yes"}, "memory_mb": 1000},
        "b": {"state": "up", "slots": 4, "labels": {}, "memory_mb": None},
        "c": {"state": "down", "slots": 8, "labels": {}},
    }
    pending = [_pending("gpu1", {"gpu": "yes"}), _pending("big", memory=2000), _pending("p1"), _pending("p2"),
               _pending("later", not_before=99)]
    placed = {p.task_id: p.worker_id for p in place(pending, workers, {"b": (2, 0)}, now=10)}
    assert placed["gpu1"] == "a"  # only a has the label
    assert placed["big"] == "b"  # a offers 1000 MiB; b does not count memory
    assert "later" not in placed  # backoff not over
    assert "c" not in placed.values()  # down
    assert sum(1 for w in placed.values() if w == "b") <= 2  # b had 2 of 4 slots free


def test_placement_leaves_a_task_that_fits_nowhere_and_places_the_ones_behind_it():
    workers = {"a": {"state": "up", "slots": 1, "labels": {}}}
    placed = place([_pending("needs-gpu", {"gpu": "yes"}), _pending("plain")], workers, {}, now=0)
    assert [(p.task_id, p.worker_id) for p in placed] == [("plain", "a")]


def test_a_rollback_keeps_the_tasks_and_workers_it_met():
    """Rolling the state back undoes writes, not executions: tasks that ran (or were queued)
    after the checkpoint keep their records, so nothing runs a second time."""
    log = Log()
    _register(log, "w1")
    _submit(log, "before")
    checkpoint = log.p.store.clone()  # the state the checkpoint would restore
    lease = _assign(log, "before", "w1")["lease"]
    _finish(log, "before", lease)
    _submit(log, "after")
    met = log.p.store
    restored = CommandProcessor(checkpoint)
    restored.finish_rollback(log.index + 1, b"z" * 32, 1, [b"d" * 32, b"c" * 32], met)
    assert restored.task("before")["state"] == "succeeded"  # not pending again: it ran
    assert restored.task("after")["state"] == "pending"
    assert restored.pending_tasks(10) == ["after"]
    assert restored.workers()["w1"]["state"] == "up"
    assert restored.worker_leases("w1") == {}
    nxt = restored.apply_entry(log.index + 2, encode_entry([{"op": "task_assign", "task_id": "after", "worker_id": "w1", "now_ms": 9}]))
    assert nxt.results[0]["lease"] == lease + 1  # the lease counter did not go back either


def test_a_worker_that_leaves_hands_its_tasks_back_without_spending_their_budget():
    log = Log()
    _register(log, "w1")
    _submit(log, "t1")  # no retries
    _assign(log, "t1", "w1")
    answer = log.one({"op": "worker_down", "worker_id": "w1", "now_ms": 5, "reason": "left", "leaving": True, "epoch": 1})
    assert answer["requeued"] == ["t1"] and answer["lost"] == []
    task = log.task("t1")
    assert task["state"] == "pending" and task["attempts"] == 0


def test_the_queue_serves_higher_priority_first_then_submission_order():
    log = Log()
    _submit(log, "low", priority=10)
    _submit(log, "high", priority=900)
    _submit(log, "mid-1")
    _submit(log, "mid-2")
    assert log.p.pending_tasks(10) == ["high", "mid-1", "mid-2", "low"]
