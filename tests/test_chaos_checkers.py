"""The lost-write and convergence checks on hand-built histories."""

from __future__ import annotations

import itertools

from synapse.chaos.checkers import convergence, lost_writes
from synapse.chaos.history import CAS, DELETE, OK, UNKNOWN, WRITE, Op

_ids = itertools.count(1)


def op(kind, t0, t1, value=None, outcome=OK, key="k", output=None, expect=None):
    return Op(next(_ids), 0, key, kind, t0, t1, outcome, value, expect, output)


def test_an_overwritten_write_is_not_lost():
    h = [op(WRITE, 0, 1, "a", output=1), op(WRITE, 2, 3, "b", output=2)]
    assert lost_writes(h, {"n1": {"k": "b"}}) == []


def test_a_write_acknowledged_after_the_final_values_writer_is_lost():
    first, second = op(WRITE, 0, 1, "a", output=1), op(WRITE, 2, 3, "b", output=2)
    (lost,) = lost_writes([first, second], {"n2": {"k": "a"}})
    assert lost.write is second and lost.final_writer is first and lost.node == "n2"
    assert "LOST WRITE on n2" in lost.explain()


def test_concurrent_writes_may_end_either_way():
    h = [op(WRITE, 0, 5, "a", output=1), op(WRITE, 1, 4, "b", output=2)]
    assert lost_writes(h, {"n1": {"k": "a"}}) == [] and lost_writes(h, {"n1": {"k": "b"}}) == []


def test_an_absent_key_needs_a_delete_after_the_write():
    w = op(WRITE, 0, 1, "a", output=1)
    assert lost_writes([w], {"n1": {"k": None}})[0].write is w
    assert lost_writes([w, op(DELETE, 2, None, outcome=UNKNOWN)], {"n1": {"k": None}}) == []


def test_refused_and_unknown_operations_are_not_claimed_lost():
    h = [op(WRITE, 0, 1, "a", output=1), op(CAS, 2, 3, "x", output=False, expect=5), op(WRITE, 4, None, "z", outcome=UNKNOWN)]
    assert lost_writes(h, {"n1": {"k": "a"}}) == []


def test_convergence():
    same = {"n1": {"applied_index": 9, "state_hash": "ab"}, "n2": {"applied_index": 9, "state_hash": "ab"}}
    assert convergence(same).ok
    assert not convergence(dict(same, n3={"applied_index": 9, "state_hash": "cd"})).ok
    assert not convergence(dict(same, n3=None)).ok
    assert "NOT CONVERGED" in convergence(dict(same, n3={"applied_index": 8, "state_hash": "ab"})).explain()
