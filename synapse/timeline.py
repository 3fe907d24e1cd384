"""What happened to this node that an operator looks for first, newest kept: leader changes,
its integrity state going diverged → repairing → proving → serving, repairs, rollbacks and
catch-ups. The dashboard's Cluster page (``/ui``) merges every node's timeline;
``GET /v1/cluster/events`` serves this node's.

In memory only: a restarted node starts a new timeline (its log says what happened before).
Any thread records (the tick thread for leader changes and divergences, the event loop for
repairs); a record is one append under a lock, so it never holds up the apply path.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any

KEPT = 500  # events kept per node: hours of a troubled cluster, a few hundred KB at most


class Timeline:
    def __init__(self, node_id: str, kept: int = KEPT) -> None:
        self.node_id = node_id
        self._events: deque[dict[str, Any]] = deque(maxlen=kept)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def record(self, kind: str, message: str, **fields: Any) -> None:
        """``kind``: started, leader, service, repaired, repair_failed, rollback or caught_up;
        ``message``: one line an operator reads as is; ``fields``: the figures behind it."""
        with self._lock:
            self._events.append({"seq": next(self._seq), "at": round(time.time(), 3), "node": self.node_id,
                                 "kind": kind, "message": message, **fields})

    def since(self, seq: int = 0, limit: int = KEPT) -> list[dict[str, Any]]:
        """The events after ``seq``, oldest first, at most the newest ``limit`` of them."""
        with self._lock:
            newer = [e for e in self._events if e["seq"] > seq]
        return newer[-limit:]
