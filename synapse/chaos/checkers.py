"""The checks a chaos run makes besides linearizability: no acknowledged write lost, and the
nodes converged after healing (same applied index and state hash).

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

from synapse.chaos.history import CAS, DELETE, OK, WRITE, Op


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
