"""What a chaos run records: one ``Op`` per client operation, with its invoke and complete
times and its outcome.

Outcomes: ``ok`` (the cluster answered and the answer is known), ``fail`` (it surely had no
effect — refused before it was proposed, or a condition that failed), ``unknown`` (a timeout,
a lost connection, a 503 that says the outcome is unknown: it may or may not have taken effect,
at any moment after it was invoked).

Memory operations (``remember``, ``forget``, ``recall``) are recorded in the same history, their
``key`` the namespace; the linearizability check reads only the kv kinds, the memory checks
(``checkers.py``) the memory kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
READ, WRITE, CAS, DELETE = "read", "write", "cas", "delete"
REMEMBER, FORGET, RECALL = "remember", "forget", "recall"
KV_KINDS = (READ, WRITE, CAS, DELETE)
MEMORY_KINDS = (REMEMBER, FORGET, RECALL)


@dataclass(frozen=True)
class Op:
    """One client operation on one key (memory operations: on one namespace).

    - read: ``output`` is ``(value, version)`` read (``(None, 0)``: absent).
    - write: ``value`` written; ``output`` the new version (None if unknown).
    - cas: write ``value`` if the key's version is ``expect`` (0: absent); with outcome ok,
      ``output`` True means applied and False that it saw another version (a definite answer).
    - delete: ``output`` True if the key existed.
    - remember: ``value`` the records sent, ``[[id, text], ...]`` (one, or a batch in one log
      entry); with outcome ok, ``output`` the answer per record, ``[[id sent, id answered,
      duplicate], ...]`` (a duplicate answers the id that already holds the text).
    - forget: ``value`` the record id; with outcome ok, ``output`` True if it existed.
    - recall: ``value`` the record id whose vector was the query; with outcome ok, ``output``
      the results, best first, ``[[id, score], ...]``.
    """

    id: int
    client: int
    key: str
    kind: str
    invoke: float
    complete: float | None  # None while unknown: it may still take effect, any time later
    outcome: str
    value: Any = None
    expect: int | None = None
    output: Any = None
    notes: dict = field(default_factory=dict, compare=False, hash=False)

    def describe(self) -> str:
        end = "…" if self.complete is None else f"{self.complete:.3f}"
        what = {
            READ: lambda: f"read → {self.output!r}" if self.outcome == OK else "read → ?",
            WRITE: lambda: f"write {self.value!r}" + (f" → v{self.output}" if self.output is not None else ""),
            CAS: lambda: f"cas v{self.expect} → {self.value!r}" + (
                {True: " applied", False: " refused"}.get(self.output, "") if self.outcome == OK else ""),
            DELETE: lambda: "delete",
            REMEMBER: lambda: f"remember {', '.join(i for i, _ in self.value)} in {self.key!r}" + (
                f" → {self.output}" if self.output is not None else ""),
            FORGET: lambda: f"forget {self.value!r} in {self.key!r}" + (
                f" → {'deleted' if self.output else 'absent'}" if self.outcome == OK else ""),
            RECALL: lambda: f"recall near {self.value!r} in {self.key!r}" + (
                f" → {[i for i, _ in self.output]}" if self.outcome == OK and self.output is not None else ""),
        }[self.kind]()
        return f"#{self.id} client {self.client} [{self.invoke:.3f}, {end}] {what} ({self.outcome})"
