"""Thread helpers."""

from __future__ import annotations

import os
import threading

# Linux gives a nice-10 thread about a tenth of the CPU a nice-0 one gets when they compete.
BACKGROUND_NICE = 10


def run_in_background_priority() -> None:
    """Lowers the calling thread's CPU priority (Linux schedules threads one by one): dump and
    snapshot writers then use the CPU the request path leaves, instead of taking a share of
    it on a busy machine. Best effort: elsewhere, or without permission, it does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass
