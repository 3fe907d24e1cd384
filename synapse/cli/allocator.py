"""The node daemon's settings of glibc's malloc (process-wide, so only `synapse node start`
sets them; a program that embeds a node keeps its own).

By default glibc gives the top of its heap back to the kernel as soon as more than 128 KiB is
free there, and serves each allocation of 128 KiB or more with an mmap of its own. A node's
heap rises and falls by more than that all the time (each batch of requests, log entry and Raft
message allocates, then frees): under 64 writing clients `perf` found 2.7% of
the three nodes' CPU in page faults, nearly all of it the kernel zeroing pages the heap had
just given back and taken again (synapse/cluster/DESIGN.md, "Writes sent to followers", where
the CPU goes). Keeping up to
``TRIM_THRESHOLD`` free at the top of each heap, and serving allocations below
``MMAP_THRESHOLD`` from the heap, removes that churn for a bounded amount of memory kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger("synapse.node")

# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 16 << 20
MMAP_THRESHOLD = 4 << 20


# An operator's own malloc settings win: with any of these set, nothing is changed.
_OPERATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Sets the two thresholds above; True if glibc took both. Nothing changes under another
    C library, or when the operator set malloc's thresholds in the environment."""
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in _OPERATOR_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if not taken:
        log.warning("glibc refused the node's malloc thresholds; running with its defaults")
    return taken
