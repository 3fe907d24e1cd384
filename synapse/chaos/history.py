"""What a chaos run records: one ``Op`` per client operation, with its invoke and complete
times and its outcome.

Outcomes: ``ok`` (the cluster answered and the answer is known), ``fail`` (it surely had no
effect — refused before it was proposed, or a condition that failed), ``unknown`` (a timeout,
a lost connection, a 503 that says the outcome is unknown: it may or may not have taken effect,
at any moment after it was invoked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
READ, WRITE, CAS, DELETE = "read", "write", "cas", "delete"


@dataclass(frozen=True)
class Op:
    """One client operation on one key.

    - read: ``output`` is ``(value, version)`` read (``(None, 0)``: absent).
    - write: ``value`` written; ``output`` the new version (None if unknown).
    - cas: write ``value`` if the key's version is ``expect`` (0: absent); with outcome ok,
      ``output`` True means applied and False that it saw another version (a definite answer).
    - delete: ``output`` True if the key existed.
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
        }[self.kind]()
        return f"#{self.id} client {self.client} [{self.invoke:.3f}, {end}] {what} ({self.outcome})"
