"""A follower's side of PySyncObj's chunked AppendEntries, with the end of an entry found by
its content instead of by the leader's label.

The defect (PySyncObj 0.3.17, ``SyncObj.__sendAppendEntries``). A log entry whose command is at
least ``appendEntriesBatchSizeBytes`` (64 KiB) long leaves the leader alone, as
``pickle.dumps((command, index, term))`` cut into 64 KiB chunks labelled 'start', 'process'
… 'finish'. The chunk at offset ``pos`` is labelled 'finish' when ``pos + 64 KiB >=
len(command)`` — the *command's* length, not the pickle's. The pickle is longer: protocol 2
spells bytes as ``_codecs.encode(text, 'latin1')`` with the text in UTF-8, so every command
byte >= 0x80 takes two bytes, plus ~50 bytes of framing. Whenever some multiple of 64 KiB
(k >= 2) lies in ``[len(command), len(pickle))``, a chunk before the last one is labelled
'finish' too. Our commands (``apply_entry(payload)``: a msgpack payload in a protocol-2 pickle)
carry ~60-70 bytes >= 0x80 for a plain ASCII value (request hash, msgpack headers), so the
pickle is ~110-130 bytes longer: a PUT of a string of 130,731 to 130,855 ASCII characters (key
``big/k``) hits it at k = 2 — 117 to 119 of those 125 sizes, depending on the request's hash
and clock — and so does the band below every higher multiple of 64 KiB. A value of mostly
non-ASCII text doubles in each of the two encodings, so *every* such write whose command
reaches 64 KiB hits it (17,000 × "é", a 34 KB body, already does), with several premature
'finish' chunks once the command is past 128 KiB.

What a premature 'finish' does (measured on a real 3-node cluster; tests/test_large_entries.py
keeps it covered): the follower ``pickle.loads`` the incomplete buffer, which raises (EOFError,
UnpicklingError, UnicodeDecodeError…) out of the transport callback. PySyncObj's buffer is
*not* reset (the raise comes before that line, so no ``'' + bytes`` TypeError follows), and
the real last chunk still completes the entry — but the exception aborts the tick ("failed
_onTick in _autoTickThread", a traceback each time), the tick thread sleeps 50 ms, and messages
already received on that connection wait for the next bytes to arrive. The late answers that
follow move the leader's nextIndex for that follower back (PySyncObj takes any success reply
above matchIndex as the new nextIndex), the leader sends the large entries again, and chunked
messages are not checked by ``_cut_only_on_conflict`` (raft.py): PySyncObj deletes the
follower's log after ``prevLogIdx`` — "truncating already-applied log entries from index 145
(last applied: 173)", 60 times in one run of 200 consecutive sizes around 128 KiB (~120 of them
in the band). The follower's commit index then moves backwards and it falls behind: 46 entries
behind and not caught up 30 s after the writes ended in that run, 83 behind and ~25 s to catch
up in another; writes took 60-300 ms instead of ~7 ms. With both followers in that state the
leader would have no quorum.

The fix: ``receive_chunk`` sees every chunk before PySyncObj does. A 'finish' whose data does
not complete the pickle is handed on as 'process' (PySyncObj appends it and answers as for any
middle chunk); the chunk that completes it is handed on as an ordinary AppendEntries carrying
the one entry, so ``_cut_only_on_conflict`` checks it like any other batch. Whether the data is
complete is decided by its content: a complete pickle ends with the STOP opcode and loads
without error; a prefix (it lacks at least the final STOP) raises. The partial buffer is
PySyncObj's own (``_SyncObj__recvTransmission``: 'start' sets it, 'process' extends it), so
'start' and 'process' are left to PySyncObj unchanged, and a correctly labelled entry is
appended exactly as before — except that one the follower already holds no longer cuts the
entries after it.
"""

from __future__ import annotations

import logging

from synapse.cluster.entries import EntryDecodeError, decode_log_entry

log = logging.getLogger("synapse.cluster")

_STOP = b"."  # the opcode that ends every pickle (pickle.STOP)


def receive_chunk(voter, message: dict) -> dict | None:
    """An ``append_entries`` message carrying ``transmission``, as PySyncObj should see it:
    unchanged ('start', 'process', a message PySyncObj ignores), a premature 'finish' turned
    into 'process', or the completing chunk turned into an ordinary AppendEntries with the
    entry in ``entries``. None: drop it (a chunk with no transmission open, which PySyncObj
    would fail on with a TypeError; the leader's next heartbeat finds the follower without
    the entry and resends it from 'start'). Call it on the tick thread, before PySyncObj's
    handler."""
    kind = message.get("transmission")
    if kind not in ("process", "finish") or "prevLogIdx" not in message:
        return message
    if message.get("term", -1) < voter.raftCurrentTerm:
        return message  # a deposed leader's: PySyncObj ignores it
    held = voter._SyncObj__recvTransmission  # '' (a str) when no transmission is open
    if not isinstance(held, bytes):
        log.warning("a %r chunk of a large log entry arrived with no transmission open; dropped "
                    "(the leader sends the entry again)", kind)
        return None
    if kind == "process":
        return message
    data = held + message["data"]
    entry = complete_entry(data)
    if entry is None:
        return dict(message, transmission="process")
    voter._SyncObj__recvTransmission = ""  # as PySyncObj leaves it after a 'finish'
    whole = {k: v for k, v in message.items() if k not in ("transmission", "data")}
    whole["entries"] = [entry]
    return whole


def complete_entry(data: bytes) -> tuple | None:
    """The log entry ``(command, index, term)`` if ``data`` is all of its pickle, else None."""
    if data[-1:] != _STOP:
        return None  # cheap: a prefix cut inside the command's text rarely ends in STOP
    try:
        # Data only (entries.py): a global in the bytes is refused, never called (PySyncObj's
        # own pickle.loads would call it).
        return decode_log_entry(data)
    except EntryDecodeError:  # a prefix, or not an entry: PySyncObj gets it as 'process'
        return None
