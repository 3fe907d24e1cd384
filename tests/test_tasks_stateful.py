"""The task state machine under random sequences of ops (Hypothesis): whatever the order of
submits, assignments, reports (current or stale), cancels, worker losses and
re-registrations, the replicated indexes stay consistent with the task records and a task
never ends twice."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from synapse import _core
from synapse.state import keys
from synapse.state.commands import encode_entry
from synapse.state.processor import CommandProcessor
from synapse.state.tasks import LEASED, TERMINAL

TASKS = [f"t{i}" for i in range(6)]
WORKERS = ["w1", "w2"]


class TaskMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.p = CommandProcessor(_core.StateStore())
        self.index = 0
        self.now = 1000
        self.leases_seen: list[int] = []  # every lease ever handed out, in order
        self.ended: dict[str, int] = {}  # task -> how many times it entered a terminal state

    def apply(self, command: dict) -> dict:
        self.index += 1
        self.now += 7
        before = {t: (self.p.task(t) or {}).get("state") for t in TASKS}
        (result,) = self.p.apply_entry(self.index, encode_entry([dict(command, now_ms=self.now)])).results
        for t in TASKS:
            after = (self.p.task(t) or {}).get("state")
            if after in TERMINAL and before[t] != after:
                self.ended[t] = self.ended.get(t, 0) + 1
        if command["op"] == "task_assign" and result.get("ok"):
            self.leases_seen.append(result["lease"])
        return result

    @rule(task=st.sampled_from(TASKS), retries=st.integers(0, 2))
    def submit(self, task, retries):
        self.apply({"op": "task_submit", "task_id": task, "spec": {"command": ["true"], "retries": retries}})

    @rule(worker=st.sampled_from(WORKERS), instance=st.sampled_from(["a", "b"]))
    def register(self, worker, instance):
        self.apply({"op": "worker_register", "worker_id": worker, "instance": instance, "slots": 2})

    @rule(task=st.sampled_from(TASKS), worker=st.sampled_from(WORKERS))
    def assign(self, task, worker):
        self.apply({"op": "task_assign", "task_id": task, "worker_id": worker})

    @rule(task=st.sampled_from(TASKS), stale=st.booleans())
    def start(self, task, stale):
        self.apply({"op": "task_start", "task_id": task, "lease": self._lease(task, stale)})

    @rule(task=st.sampled_from(TASKS), stale=st.booleans(),
          status=st.sampled_from(["succeeded", "failed", "timed-out", "cancelled"]))
    def finish(self, task, stale, status):
        lease = self._lease(task, stale)
        result = self.apply({"op": "task_finish", "task_id": task, "lease": lease, "outcome": {"status": status}})
        if stale and lease not in (None, 0) and result.get("ok"):
            # Only the current lease may report: a stale one must have been refused.
            assert self.p.task(task)["result"]["lease"] == lease

    @rule(task=st.sampled_from(TASKS))
    def cancel(self, task):
        self.apply({"op": "task_cancel", "task_id": task})

    @rule(worker=st.sampled_from(WORKERS))
    def down(self, worker):
        self.apply({"op": "worker_down", "worker_id": worker})

    def _lease(self, task: str, stale: bool) -> int:
        record = self.p.task(task)
        current = record["lease"] if record and record["lease"] is not None else 0
        if stale:
            older = [lease for lease in self.leases_seen if lease != current]
            return older[-1] if older else current + 1000
        return current

    @invariant()
    def indexes_match_the_records(self):
        queued = set(self.p.pending_tasks(100))
        leased = {}
        for worker in WORKERS:
            for task, lease in self.p.worker_leases(worker).items():
                assert task not in leased, f"{task} leased to two workers"
                leased[task] = (worker, lease)
        for task in TASKS:
            record = self.p.task(task)
            if record is None:
                assert task not in queued and task not in leased
                continue
            assert (record["state"] == "pending") == (task in queued), (task, record["state"])
            if record["state"] in LEASED:
                assert leased[task] == (record["worker"], record["lease"])
                worker = self.p.workers()[record["worker"]]
                assert worker["state"] == "up"
            else:
                assert task not in leased and record["lease"] is None

    @invariant()
    def leases_only_grow_and_tasks_end_once(self):
        assert self.leases_seen == sorted(set(self.leases_seen))
        assert all(n == 1 for n in self.ended.values()), self.ended
        assert keys.decode_count(self.p.store.get(keys.LEASE_SEQ)) == (self.leases_seen[-1] if self.leases_seen else 0)


TestTaskMachine = TaskMachine.TestCase
TestTaskMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None, derandomize=True)
