"""The linearizability checker on its own: histories built by hand that are linearizable are
accepted, known violations — the stale read of a cut-off old leader, a lost write, a double
compare-and-set — are rejected with a minimal counter-example; random histories made by a
real sequential execution stretched into overlapping intervals are always accepted."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from synapse.chaos.history import CAS, DELETE, FAIL, OK, READ, UNKNOWN, WRITE, Op
from synapse.chaos.linearizability import check, check_key

_ids = itertools.count(1)


def op(kind, t0, t1, outcome=OK, key="k", value=None, expect=None, output=None, client=0):
    return Op(next(_ids), client, key, kind, t0, t1, outcome, value, expect, output)


def w(value, t0, t1, version=None, **kw):
    return op(WRITE, t0, t1, value=value, output=version, **kw)


def r(value, version, t0, t1, **kw):
    return op(READ, t0, t1, output=(value, version), **kw)


def test_a_sequential_history_is_linearizable():
    h = [w("a", 0, 1, 1), r("a", 1, 2, 3), w("b", 4, 5, 2), r("b", 2, 6, 7), op(DELETE, 8, 9, output=True), r(None, 0, 10, 11)]
    assert check(h).ok


def test_a_read_concurrent_with_a_write_may_see_either_value():
    base = [w("old", 0, 1, 1)]
    assert check(base + [w("new", 2, 6, 2), r("old", 1, 3, 4)]).ok
    assert check(base + [w("new", 2, 6, 2), r("new", 2, 3, 4)]).ok


def test_the_stale_read_of_a_cut_off_old_leader_is_rejected():
    """'new' was acknowledged by the majority's leader at t=5; the old leader, cut off, then
    answers a read with 'old' (t=6..7): no order of these operations explains that."""
    h = [w("old", 0, 1, 1, client=1), w("new", 4, 5, 2, client=2), r("old", 1, 6, 7, client=3)]
    verdict = check(h)
    assert not verdict.ok
    (failure,) = verdict.failures
    assert {o.kind for o in failure.counterexample} == {WRITE, READ}
    assert "NOT linearizable" in verdict.explain()


def test_a_lost_write_is_rejected():
    """Two acknowledged writes, one after the other; afterwards the key holds the first."""
    h = [w("first", 0, 1, 1), w("second", 2, 3, 2), r("first", 1, 10, 11)]
    assert not check(h).ok


def test_an_unknown_write_may_have_happened_or_not():
    pending = w("maybe", 1, None, outcome=UNKNOWN)  # timed out: no answer
    base = [w("a", 0, 0.5, 1)]
    assert check(base + [pending, r("maybe", 2, 5, 6)]).ok
    assert check(base + [pending, r("a", 1, 5, 6)]).ok
    # ...but not both, in that order: once seen, it cannot be undone.
    assert not check(base + [pending, r("maybe", 2, 5, 6), r("a", 1, 7, 8)]).ok


def test_surely_failed_operations_have_no_effect():
    h = [w("a", 0, 1, 1), w("never", 2, 3, outcome=FAIL), r("a", 1, 4, 5)]
    assert check(h).ok


def test_compare_and_set():
    base = [w("a", 0, 1, 1)]
    one = op(CAS, 2, 4, expect=1, value="x", output=True, client=1)
    other_applied = op(CAS, 2, 4, expect=1, value="y", output=True, client=2)
    other_refused = op(CAS, 2, 4, expect=1, value="y", output=False, client=2)
    assert check(base + [one, other_refused, r("x", 2, 5, 6)]).ok
    assert not check(base + [one, other_applied]).ok  # both won from the same version
    # A refusal is an observation: refused at version 1 with nothing else writing is wrong.
    assert not check(base + [op(CAS, 2, 3, expect=1, value="z", output=False)]).ok
    # An unknown cas did whatever the state allowed.
    maybe = op(CAS, 2, None, expect=1, value="z", outcome=UNKNOWN)
    assert check(base + [maybe, r("z", 2, 5, 6)]).ok and check(base + [maybe, r("a", 1, 5, 6)]).ok


def test_versions_are_part_of_the_model():
    assert not check([w("a", 0, 1, 1), w("b", 2, 3, 3)]).ok  # skipped a version
    assert not check([w("a", 0, 1, 1), r("a", 2, 2, 3)]).ok


def test_keys_are_checked_apart_and_the_counterexample_is_minimal():
    noise = [w(f"n{i}", 10 * i, 10 * i + 1, i + 1, key="k") for i in range(15)]
    noise += [r(f"n{i}", i + 1, 10 * i + 2, 10 * i + 3, key="k") for i in range(15)]
    extra = [r("x", 1, 1.5, 1.8, key="other"), r("y", 2, 3.5, 3.8, key="other"), r(None, 0, -2, -1, key="other")]
    bad = [w("x", 0, 1, 1, key="other"), w("y", 2, 3, 2, key="other"), r("x", 1, 4, 5, key="other")]
    verdict = check(noise + extra + bad)
    assert verdict.keys == 2 and [f.key for f in verdict.failures] == ["other"]
    # What is left: the write of x (so the read explains itself), the write of y, the stale read.
    assert sorted(o.describe().split("] ")[1] for o in verdict.failures[0].counterexample) == [
        "read → ('x', 1) (ok)", "write 'x' → v1 (ok)", "write 'y' → v2 (ok)"]


def _stretched_history(seed: int, clients: int, ops_per_client: int) -> list[Op]:
    """A real sequential execution of a register, each operation then given an interval that
    contains its linearization point: always linearizable."""
    rnd = random.Random(seed)
    state = (None, 0)
    history, t = [], 0.0
    busy_until = [0.0] * clients
    for n in range(clients * ops_per_client):
        client = rnd.randrange(clients)
        # Linearization points strictly in execution order, each inside its client's turn.
        t = point = max(t + rnd.random(), busy_until[client] + 0.001)
        start, end = point - rnd.random() * 3, point + rnd.random() * 3
        start = max(start, busy_until[client] + 0.0005)
        kind = rnd.choice([READ, WRITE, WRITE, CAS, DELETE])
        value = f"v{n}"
        if kind == READ:
            o = op(READ, start, end, output=state, client=client)
        elif kind == WRITE:
            state = (value, state[1] + 1)
            o = op(WRITE, start, end, value=value, output=state[1], client=client)
        elif kind == DELETE:
            o = op(DELETE, start, end, output=state[1] > 0, client=client)
            state = (None, 0)
        else:
            expect = rnd.choice([state[1], state[1] + 1])
            applied = expect == state[1]
            if applied:
                state = (value, state[1] + 1)
            o = op(CAS, start, end, value=value, expect=expect, output=applied, client=client)
        if rnd.random() < 0.1 and kind != READ:
            o = Op(o.id, o.client, o.key, o.kind, o.invoke, None, UNKNOWN, o.value, o.expect, None)
        busy_until[client] = end if o.complete is not None else busy_until[client]
        history.append(o)
    return history


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), clients=st.integers(1, 6))
def test_stretched_real_executions_are_accepted(seed, clients):
    assert check_key("k", _stretched_history(seed, clients, 8)).ok


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6))
def test_a_read_of_a_value_never_written_is_rejected(seed):
    history = _stretched_history(seed, 4, 8)
    reads = [i for i, o in enumerate(history) if o.kind == READ]
    if not reads:
        return
    i = reads[seed % len(reads)]
    o = history[i]
    history[i] = Op(o.id, o.client, o.key, READ, o.invoke, o.complete, OK, output=("never written", 1))
    assert not check_key("k", history, minimize=False).ok


def test_a_fifty_client_history_per_key_finishes():
    history = _stretched_history(7, 50, 6)
    assert check_key("k", history).ok
