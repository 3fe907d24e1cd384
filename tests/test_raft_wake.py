"""A proposal wakes the Raft tick thread without the event loop letting go of the GIL
(rust/python/src/wake.rs, raft.py's Voter)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from synapse import _core
from synapse.cluster.raft import ReplicatedLog
from synapse.state.commands import encode_entry
from synapse.state.processor import CommandProcessor


def test_wake_pipe_writes_a_byte_and_reports_a_full_pipe():
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        assert _core.wake_pipe(w) is True and os.read(r, 16) == b"o"
        while _core.wake_pipe(w):  # fill it: a full pipe's reader wakes anyway
            pass
        assert _core.wake_pipe(w) is False
    finally:
        os.close(r)
    with pytest.raises(BrokenPipeError):  # no reader left
        _core.wake_pipe(w)
    os.close(w)
    with pytest.raises(ValueError, match="not a file descriptor"):
        _core.wake_pipe(-1)


class _Listener:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_voter_wakes_its_tick_thread_through_wake_pipe(tmp_path):
    built: list[ReplicatedLog] = []
    # PySyncObj's tick thread lives as long as the thread that made the voter: a thread that
    # stays until the end of the test.
    done = threading.Event()

    def make() -> None:
        built.append(ReplicatedLog(f"127.0.0.1:{_free_port()}", [], tmp_path, CommandProcessor, _Listener(), None))
        done.wait()

    maker = threading.Thread(target=make)
    maker.start()
    try:
        while not built:
            threading.Event().wait(0.01)
        replica = built[0]
        notify = replica._raft._SyncObj__pipeNotifier.notify
        assert notify.func is _core.wake_pipe
        for _ in range(3000):  # a lone voter elects itself
            if replica.is_leader():
                break
            threading.Event().wait(0.01)
        applied = threading.Event()
        results = []
        replica.append(encode_entry([{"op": "noop"}]), lambda result, error: (results.append((result, error)), applied.set()))
        assert applied.wait(30), "the entry was not applied"
        assert results[0][1] is None
    finally:
        if built:
            built[0].close()
        done.set()
        maker.join()
