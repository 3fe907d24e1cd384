"""The node daemon's malloc settings (synapse/cli/allocator.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from synapse.cli import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_thresholds():
    # In a child: the settings are process-wide, and this process is pytest's.
    code = "from synapse.cli.allocator import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"])
def test_an_operators_own_malloc_settings_win(monkeypatch, name):
    monkeypatch.setenv(name, "1048576" if name != "GLIBC_TUNABLES" else "glibc.malloc.trim_threshold=1048576")
    assert allocator.keep_freed_memory() is False

