"""Linearizability of a history of register operations, checked key by key.

The search is Wing & Gong's, with Lowe's memoization (as in Porcupine): walk the history's
call and return events in time order; at a call, try to linearize that operation now (the
model must accept its recorded output) and go on; at a return of an operation not yet
linearized, backtrack. A (set of linearized operations, model state) pair already explored
is never explored again. Keys are independent registers, so each key's history is checked
alone (P-compositionality) — the difference between seconds and never finishing.

Unknown outcomes are left open: such an operation's return is at infinity and its output is
unconstrained, so it may take effect at any moment after its invocation — or, placed after
everything else, effectively never. Operations that surely failed are dropped.

A failing key comes with a minimal counter-example: operations are removed one at a time
while the rest still fails and still explains itself (every value a kept read saw was
written by a kept operation), so what is left is a history in which every operation matters.
Versions are absolute, so a subset can also fail because a write's recorded version no
longer follows: the counter-example is then the smallest such subset — still a real
contradiction among recorded answers.

The model is a versioned register: state ``(value, version)``, ``(None, 0)`` when absent; a
write (or successful cas) sets ``version + 1``; a delete resets to ``(None, 0)`` — the
semantics of Synapse's kv (synapse/state/DESIGN.md).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from synapse.chaos.history import CAS, DELETE, FAIL, OK, READ, WRITE, Op

State = tuple  # (value, version)
ABSENT: State = (None, 0)
_INF = float("inf")


def step(state: State, op: Op) -> list[State]:
    """The states the model can be in after ``op`` from ``state``, given what was recorded
    (an empty list: impossible from this state)."""
    value, version = state
    known = op.outcome == OK
    if op.kind == READ:
        return [state] if not known or tuple(op.output) == state else []
    if op.kind == WRITE:
        if known and op.output is not None and op.output != version + 1:
            return []
        return [(op.value, version + 1)]
    if op.kind == DELETE:
        if known and op.output is not None and op.output != (version > 0):
            return []
        return [ABSENT]
    if op.kind == CAS:
        applies = version == op.expect
        if known and op.output:  # applied
            return [(op.value, version + 1)] if applies else []
        if known:  # refused: it saw another version
            return [] if applies else [state]
        return [(op.value, version + 1)] if applies else [state]  # unknown: whatever it could
    raise ValueError(f"unknown operation kind {op.kind!r}")


@dataclass
class KeyResult:
    key: str
    ok: bool | None  # None: undecided (the search passed its budget)
    ops: int
    explored: int
    # On failure: a minimal set of operations that cannot be linearized, and the furthest the
    # search got (the operations it could order, and the state after them).
    counterexample: list[Op] = field(default_factory=list)
    furthest: list[Op] = field(default_factory=list)
    furthest_state: State | None = None

    def explain(self) -> str:
        if self.ok:
            return f"key {self.key!r}: linearizable ({self.ops} operations)"
        if self.ok is None:
            return f"key {self.key!r}: UNDECIDED: {self.ops} operations, search stopped after {self.explored} states"
        lines = [f"key {self.key!r}: NOT linearizable; a minimal history that shows it:"]
        lines += ["  " + op.describe() for op in sorted(self.counterexample, key=lambda o: o.invoke)]
        return "\n".join(lines)


class _Event:
    __slots__ = ("op", "is_call", "match", "prev", "next")

    def __init__(self, op: int, is_call: bool) -> None:
        self.op, self.is_call = op, is_call
        self.match: _Event | None = None  # a call's return
        self.prev: _Event | None = None
        self.next: _Event | None = None


def _lift(call: _Event) -> None:
    for e in (call, call.match):
        e.prev.next = e.next
        if e.next is not None:
            e.next.prev = e.prev


def _unlift(call: _Event) -> None:
    for e in (call.match, call):
        e.prev.next = e
        if e.next is not None:
            e.next.prev = e


class SearchTooLarge(Exception):
    pass


def _search(ops: list[Op], initial: State = ABSENT, budget: int | None = None) -> tuple[bool, int, list[Op], State]:
    """(linearizable?, states explored, the longest order found, the state after it).
    SearchTooLarge once more than ``budget`` states were explored."""
    timed = []
    for i, op in enumerate(ops):
        call, ret = _Event(i, True), _Event(i, False)
        call.match = ret
        # Calls sort before returns at the same instant: touching operations are concurrent.
        timed.append((op.invoke, 0, i, call))
        timed.append((_INF if op.complete is None else op.complete, 1, i, ret))
    timed.sort(key=lambda t: t[:3])
    head = _Event(-1, True)
    last = head
    for *_, e in timed:
        last.next, e.prev, last = e, last, e

    state, linearized, explored = initial, 0, 0
    cache: set[tuple[int, State]] = set()
    stack: list[tuple[_Event, State, list[State]]] = []
    best: list[int] = []
    best_state = state

    def take(call: _Event, before: State, candidates: list[State]) -> bool:
        """Linearizes ``call`` with the first untried candidate state; False if none."""
        nonlocal state, linearized, explored, best, best_state
        bit = 1 << call.op
        while candidates:
            candidate = candidates.pop(0)
            if (linearized | bit, candidate) in cache:
                continue
            cache.add((linearized | bit, candidate))
            explored += 1
            if budget is not None and explored > budget:
                raise SearchTooLarge
            stack.append((call, before, candidates))
            state, linearized = candidate, linearized | bit
            _lift(call)
            if len(stack) > len(best):
                best, best_state = [c.op for c, _, _ in stack], candidate
            return True
        return False

    entry = head.next
    while head.next is not None:
        if entry.is_call:
            if take(entry, state, step(state, ops[entry.op])):
                entry = head.next
            else:
                entry = entry.next
            continue
        # An operation returned before anything placed it: undo the latest choice and try
        # that operation's other outcomes, or the next operation in its place.
        if not stack:
            return False, explored, [ops[i] for i in best], best_state
        call, before, candidates = stack.pop()
        linearized &= ~(1 << call.op)
        state = before
        _unlift(call)
        entry = head.next if take(call, before, candidates) else call.next
    return True, explored, [ops[c.op] for c, _, _ in stack], state


def check_key(
    key: str, ops: Iterable[Op], initial: State = ABSENT, minimize: bool = True, budget: int | None = 2_000_000
) -> KeyResult:
    """``budget``: states to explore at most; beyond it the key is reported undecided
    (``ok`` None) rather than searched for ever."""
    history = _close_observed([op for op in ops if op.outcome != FAIL])  # FAIL: surely no effect
    try:
        ok, explored, furthest, furthest_state = _search(history, initial, budget)
    except SearchTooLarge:
        return KeyResult(key, None, len(history), budget)
    result = KeyResult(key, ok, len(history), explored)
    if not ok:
        result.furthest, result.furthest_state = furthest, furthest_state
        result.counterexample = _minimize(history, initial) if minimize else history
    return result


def _close_observed(history: list[Op]) -> list[Op]:
    """An unknown write whose (unique) value a read returned took effect before that read
    completed: it ends there instead of at infinity. Equivalent, and it keeps the number of
    operations open at once — what the search grows with — small."""
    seen_by: dict[object, float] = {}
    for op in history:
        if op.kind == READ and op.outcome == OK and op.output[0] is not None and op.complete is not None:
            v = op.output[0]
            seen_by[v] = min(seen_by.get(v, _INF), op.complete)
    out = []
    for op in history:
        if op.outcome != OK and op.kind in (WRITE, CAS) and op.complete is None and op.value in seen_by:
            op = Op(op.id, op.client, op.key, op.kind, op.invoke, max(op.invoke, seen_by[op.value]), op.outcome,
                    op.value, op.expect, op.output, op.notes)
        out.append(op)
    return out


def _minimize(history: list[Op], initial: State) -> list[Op]:
    """Drops operations one at a time while the rest is still not linearizable and still
    explains itself: every value a kept read saw was written by a kept operation (otherwise
    "a read of a value never written" would be the trivial, uninformative minimum)."""
    current = list(history)
    changed = True
    while changed:
        changed = False
        for op in list(current):
            trial = [o for o in current if o is not op]
            if trial and _self_contained(trial, initial) and not _search(trial, initial)[0]:
                current = trial
                changed = True
    return current


def _self_contained(history: list[Op], initial: State) -> bool:
    written = {initial[0], None} | {o.value for o in history if o.kind in (WRITE, CAS)}
    return all(o.output[0] in written for o in history if o.kind == READ and o.outcome == OK)


@dataclass
class Verdict:
    ok: bool
    keys: int
    results: list[KeyResult]

    @property
    def failures(self) -> list[KeyResult]:
        return [r for r in self.results if r.ok is False]

    @property
    def undecided(self) -> list[KeyResult]:
        return [r for r in self.results if r.ok is None]

    def explain(self) -> str:
        undecided = "".join("\n" + r.explain() for r in self.undecided)
        if self.ok:
            return f"linearizable: {self.keys} keys, {sum(r.ops for r in self.results)} operations" + undecided
        return "\n".join(r.explain() for r in self.failures) + undecided


def check(history: Iterable[Op], minimize: bool = True) -> Verdict:
    """Checks every key's sub-history; the history is linearizable iff every key's is."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    results = [check_key(key, ops, minimize=minimize) for key, ops in sorted(by_key.items())]
    return Verdict(not any(r.ok is False for r in results), len(results), results)
