"""The checks a chaos run makes besides linearizability: no acknowledged write lost, and the
nodes converged after healing (same applied index and state hash); with memory operations,
no acknowledged memory lost, none stored twice, recalls that see what they must and never
what was forgotten, and every node's index agreeing with its state.

Lost writes are judged from the final values every node holds after healing, read per key:
if the value a key ends with was written by an operation that completed before an
acknowledged write to that key was even invoked, that acknowledged write was lost — nothing
could have been ordered after it and still left the older value. (The linearizability check
sees the same thing when the final reads are in the history; this check names the write.)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from synapse.chaos.history import CAS, DELETE, FAIL, FORGET, OK, RECALL, REMEMBER, WRITE, Op


@dataclass(frozen=True)
class LostWrite:
    write: Op
    final_value: object
    final_writer: Op | None  # None: the key ended absent (or at a value no operation wrote)
    node: str

    def explain(self) -> str:
        by = self.final_writer.describe() if self.final_writer else "no write after it"
        return (f"LOST WRITE on {self.node}: {self.write.describe()} was acknowledged, but the key ends "
                f"at {self.final_value!r}, written by {by}, which completed before it was invoked")


def _writes(history: Iterable[Op]) -> dict[str, list[Op]]:
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        if op.kind in (WRITE, CAS, DELETE):
            by_key[op.key].append(op)
    return by_key


def lost_writes(history: Iterable[Op], finals: dict[str, dict[str, object]]) -> list[LostWrite]:
    """``finals``: node -> {key: final value (None when absent)}, read after healing."""
    by_key = _writes(history)
    lost: list[LostWrite] = []
    for node, values in finals.items():
        for key, ops in by_key.items():
            final = values.get(key)
            writers = [o for o in ops if o.kind != DELETE and o.value == final] if final is not None else []
            writer = writers[0] if writers else None
            # Every acknowledged write invoked after the final value's writer had completed.
            for w in ops:
                if w.outcome != OK or w.kind == DELETE or w is writer:
                    continue
                if w.kind == CAS and not w.output:
                    continue  # refused: wrote nothing
                if final is None:
                    # Ended absent: fine if a delete (acknowledged or not) may have followed it.
                    if not any(d.kind == DELETE and (d.complete is None or d.complete >= w.invoke) for d in ops):
                        lost.append(LostWrite(w, final, None, node))
                    continue
                if writer is None:
                    continue  # a value no operation wrote: the linearizability check reports it
                if writer.complete is not None and writer.complete < w.invoke:
                    # Unless something written after w explains the final value (a delete then
                    # a re-write of the same value cannot happen: values are unique).
                    lost.append(LostWrite(w, final, writer, node))
    return lost


@dataclass(frozen=True)
class Convergence:
    ok: bool
    applied: dict[str, int]
    hashes: dict[str, str]

    def explain(self) -> str:
        if self.ok:
            return f"converged: {len(self.applied)} nodes at index {next(iter(self.applied.values()))}"
        rows = ", ".join(f"{n}: {self.applied.get(n)} {str(self.hashes.get(n))[:12]}" for n in sorted(self.applied))
        return f"NOT CONVERGED: {rows}"


def convergence(statuses: dict[str, dict | None]) -> Convergence:
    """Every node answered, at the same applied index with the same state hash."""
    applied = {n: s["applied_index"] for n, s in statuses.items() if s}
    hashes = {n: s["state_hash"] for n, s in statuses.items() if s}
    ok = len(applied) == len(statuses) and len(set(applied.values())) == 1 and len(set(hashes.values())) == 1
    return Convergence(ok, applied, hashes)


# --- agent memory (synapse/memory/DESIGN.md) ---------------------------------------------------
#
# Memory operations carry unique record ids and unique texts, so each record names the
# operation that wrote it. ``memories``: node -> {namespace: [(id, text), ...]}, every record a
# node lists (consistency=stale) after the cluster converged. An operation whose outcome is
# unknown may have taken effect at any moment after it was invoked, or never: it is never
# counted lost, and it excuses what it could explain.

SAME_VECTOR = 0.999  # a recall by a record's own vector scores it ~1 (float32 cosine)


@dataclass(frozen=True)
class MemoryViolation:
    check: str  # lost, wrong-text, stored-twice, phantom, recalled-forgotten, missed-recall, index
    message: str
    node: str | None = None
    op: Op | None = None

    def explain(self) -> str:
        where = f" on {self.node}" if self.node else ""
        return f"{self.check.upper()}{where}: {self.message}"


@dataclass
class _Records:
    """Per (namespace, id): the remembers that may have written it and the forgets that may
    have removed it (failed operations surely did neither)."""

    created: dict[tuple[str, str], list[Op]]  # acknowledged: answered stored under this id
    maybe: dict[tuple[str, str], list[Op]]  # acknowledged or unknown (not answered duplicate)
    texts: dict[tuple[str, str], dict[int, str]]  # op id -> text sent for this record
    forgets: dict[tuple[str, str], list[Op]]  # acknowledged or unknown


def _records(history: Iterable[Op]) -> _Records:
    r = _Records(defaultdict(list), defaultdict(list), defaultdict(dict), defaultdict(list))
    for op in history:
        if op.outcome == FAIL:
            continue
        if op.kind == REMEMBER:
            answers = {sent: (answered, dup) for sent, answered, dup in op.output or []}
            for record_id, text in op.value:
                k = (op.key, record_id)
                answered, dup = answers.get(record_id, (None, None))
                if op.outcome == OK and not dup and answered == record_id:
                    r.created[k].append(op)
                if op.outcome != OK or not dup:
                    r.maybe[k].append(op)
                    r.texts[k][op.id] = text
        elif op.kind == FORGET:
            r.forgets[(op.key, op.value)].append(op)
    return r


def _after(op: Op, t: float) -> bool:
    """``op`` may have taken effect after time ``t`` (it had not surely completed by then)."""
    return op.complete is None or op.complete > t


def lost_memories(history: Iterable[Op], memories: dict[str, dict[str, list[tuple[str, str]]]]) -> list[MemoryViolation]:
    """Every acknowledged remember whose record no forget may have removed since must be on
    every node with the text it was given; a forget of an acknowledged record must not answer
    that the record did not exist."""
    history = list(history)
    r = _records(history)
    out: list[MemoryViolation] = []
    for (ns, record_id), writes in sorted(r.created.items()):
        for w in writes:
            if any(_after(f, w.invoke) for f in r.forgets.get((ns, record_id), [])):
                continue  # a forget may have followed it
            # The texts it may hold: this write's, or a rewrite's that may have come after.
            texts = {r.texts[(ns, record_id)][w.id]} | {
                r.texts[(ns, record_id)][o.id] for o in r.maybe[(ns, record_id)] if o is not w and _after(o, w.invoke)}
            for node, spaces in sorted(memories.items()):
                held = [t for i, t in spaces.get(ns, []) if i == record_id]
                if not held:
                    out.append(MemoryViolation("lost", f"{w.describe()} was acknowledged and never forgotten, but "
                                               f"{record_id!r} is not in namespace {ns!r}", node, w))
                elif held[0] not in texts:
                    out.append(MemoryViolation("wrong-text", f"{w.describe()}: {record_id!r} holds {held[0]!r}, "
                                               f"not {sorted(texts)}", node, w))
    for op in history:
        if op.kind != FORGET or op.outcome != OK or op.output:
            continue
        k = (op.key, op.value)
        before = [w for w in r.created.get(k, []) if w.complete is not None and w.complete < op.invoke]
        others = [f for f in r.forgets.get(k, []) if f is not op and f.invoke < (op.complete or float("inf"))]
        if before and not others:
            out.append(MemoryViolation("lost", f"{op.describe()} answered that the record did not exist, but "
                                       f"{before[0].describe()} had stored it and nothing forgot it before",
                                       op.notes.get("node") and f"n{op.notes['node']}", op))
    return out


def duplicate_memories(history: Iterable[Op], memories: dict[str, dict[str, list[tuple[str, str]]]]) -> list[MemoryViolation]:
    """No record stored twice: no id listed twice, no text held by two records of a namespace
    (dedup is on), no record no remember may have written, no remember answered as stored
    while an acknowledged record that no forget may have removed already held its text, and a
    duplicate answer names a record that was written with that text."""
    history = list(history)
    r = _records(history)
    out: list[MemoryViolation] = []
    for node, spaces in sorted(memories.items()):
        for ns, items in sorted(spaces.items()):
            ids: dict[str, int] = defaultdict(int)
            by_text: dict[str, list[str]] = defaultdict(list)
            for record_id, text in items:
                ids[record_id] += 1
                by_text[text].append(record_id)
                if (ns, record_id) not in r.maybe:
                    out.append(MemoryViolation("phantom", f"{record_id!r} in {ns!r} holds {text!r}, but no remember "
                                               "that may have taken effect stored it", node))
            for record_id, n in ids.items():
                if n > 1:
                    out.append(MemoryViolation("stored-twice", f"{record_id!r} is listed {n} times in {ns!r}", node))
            for text, holders in by_text.items():
                if len(set(holders)) > 1:
                    out.append(MemoryViolation("stored-twice", f"the text {text!r} is held by {sorted(set(holders))} "
                                               f"in {ns!r} (dedup is on)", node))
    written_with: dict[tuple[str, str], set[str]] = defaultdict(set)  # (ns, text) -> ids sent with it
    for (ns, record_id), texts in r.texts.items():
        for text in texts.values():
            written_with[(ns, text)].add(record_id)
    held_by: dict[tuple[str, str], list[tuple[str, Op]]] = defaultdict(list)  # (ns, text) -> created records
    for (ns, record_id), writes in r.created.items():
        for w in writes:
            held_by[(ns, r.texts[(ns, record_id)][w.id])].append((record_id, w))
    for op in history:
        if op.kind != REMEMBER or op.outcome != OK:
            continue
        answers = {sent: (answered, dup) for sent, answered, dup in op.output or []}
        for record_id, text in op.value:
            answered, dup = answers.get(record_id, (None, None))
            if dup:
                if answered not in written_with[(op.key, text)]:
                    out.append(MemoryViolation("stored-twice", f"{op.describe()} answered that {answered!r} holds "
                                               f"{text!r}, but no remember wrote that text there", None, op))
                continue
            for other, w in held_by[(op.key, text)]:
                if other != record_id and w.complete is not None and w.complete < op.invoke and not any(
                        f.invoke < (op.complete or float("inf")) for f in r.forgets.get((op.key, other), [])):
                    out.append(MemoryViolation("stored-twice", f"{op.describe()} stored {text!r} as {record_id!r}, "
                                               f"though {w.describe()} held it as {other!r} and nothing forgot it",
                                               None, op))
    return out


def recall_violations(history: Iterable[Op]) -> list[MemoryViolation]:
    """Each linearizable recall by a record's own vector: it returns that record first (score
    ~1) if its remember was acknowledged before the recall began and no forget of it had been
    invoked by the time the recall answered; and it never returns a record whose forget was
    acknowledged before the recall began (unless a remember of it may have come after)."""
    history = list(history)
    r = _records(history)
    out: list[MemoryViolation] = []
    for q in history:
        if q.kind != RECALL or q.outcome != OK:
            continue
        results = q.output or []
        for record_id, _ in results:
            k = (q.key, record_id)
            gone = [f for f in r.forgets.get(k, []) if f.outcome == OK and f.output and f.complete < q.invoke]
            if any(not any(_after(w, f.invoke) for w in r.maybe.get(k, [])) for f in gone):
                out.append(MemoryViolation("recalled-forgotten", f"{q.describe()} returned {record_id!r}, which "
                                           f"{gone[0].describe()} had removed before it began", None, q))
        k = (q.key, q.value)
        stored = [w for w in r.created.get(k, []) if w.complete < q.invoke]
        forgotten = [f for f in r.forgets.get(k, []) if f.invoke < q.complete]
        if stored and not forgotten and (not results or results[0][0] != q.value or results[0][1] < SAME_VECTOR):
            out.append(MemoryViolation("missed-recall", f"{q.describe()}: {stored[0].describe()} had stored "
                                       f"{q.value!r} before it began; a recall by its own vector must return it "
                                       f"first with a score of ~1", None, q))
    return out


def index_mismatches(answers: dict[str, dict[tuple[str, str], list | str]]) -> list[MemoryViolation]:
    """``answers``: node -> {(namespace, id): the results of a linearizable recall on that
    node by the record's own vector ([[id, score], ...]), or why there are none}. Each node's
    index must hold what its state holds: the record comes first, with a score of ~1."""
    out: list[MemoryViolation] = []
    for node, found in sorted(answers.items()):
        for (ns, record_id), results in sorted(found.items()):
            if isinstance(results, str):
                out.append(MemoryViolation("index", f"a recall by the vector of {record_id!r} in {ns!r} failed: "
                                           f"{results}", node))
            elif not results or results[0][0] != record_id or results[0][1] < SAME_VECTOR:
                out.append(MemoryViolation("index", f"a recall by the vector of {record_id!r} in {ns!r} returned "
                                           f"{results} instead of that record first with a score of ~1", node))
    return out
