"""The leader's merge: entries waiting in its queue leave as one log entry.

Every node's group committer makes entries of its own. A follower forwards its entry to the
leader (PySyncObj's ``apply_command``), and PySyncObj gives every command it finds in the
leader's queue a log index of its own, with an AppendEntries to each follower after each. With
clients on every node the log then carried ~1.5x the entries of the same load sent to the
leader, and each entry costs every node messages, an apply, a chain link and a digest
(DESIGN.md, "Writes sent to followers"). So at each tick the leader drains its queue and joins
consecutive entries into one: their commands, in queue order, in one entry of the same schema.

Each proposer gets back the results of its own commands only: a *slot*, (offset, count,
total) into the merged entry's results. A local proposer's callback is wrapped here; a
follower gets the slot in ``apply_command_response`` and wraps its own waiting callback the
same way (``sliced``), so the result it sees is exactly what its entry alone would have given.

Only entries that decode, and hold no rollback (which must be alone in its entry), join;
PySyncObj's own commands (membership changes, no-ops) are never merged and keep their place:
only *consecutive* entries join, so the log's order of commands is the queue's order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pysyncobj import pickle

from synapse.cluster.committer import MAX_ENTRY_BYTES, MAX_ENTRY_COMMANDS
from synapse.cluster.entries import REGULAR, EntryDecodeError, decode_command
from synapse.state.commands import encode_entry, shareable_commands

Slot = tuple[int, int, int]  # (offset, count, total) into the merged entry's results


@dataclass
class Outgoing:
    """One log entry to append: its command bytes and who waits for it, each with its slot
    (None: the entry is the proposer's own, unchanged)."""

    command: bytes
    members: list[tuple[object, Slot | None]] = field(default_factory=list)


def plan(waiting: list[tuple[bytes, object]], method_id: int) -> list[Outgoing]:
    """The log entries for the queue's ``(command, callback)`` pairs, in order. ``method_id``
    is PySyncObj's id of the replicated ``apply_entry``."""
    if len(waiting) < 2:  # the common case on a lightly loaded leader: nothing to decode
        return [Outgoing(command, [(callback, None)]) for command, callback in waiting]
    out: list[Outgoing] = []
    group: list[tuple[bytes, object, list]] = []  # mergeable commands not yet emitted
    size = count = 0

    def flush() -> None:
        nonlocal size, count
        if len(group) == 1:
            command, callback, _ = group[0]
            out.append(Outgoing(command, [(callback, None)]))
        elif group:
            merged, members, offset = [], [], 0
            for _, callback, commands in group:
                members.append((callback, (offset, len(commands), count)))
                merged.extend(commands)
                offset += len(commands)
            out.append(Outgoing(_call(method_id, encode_entry(merged)), members))
        group.clear()
        size = count = 0

    for command, callback in waiting:
        commands = _commands(command, method_id)
        if commands is None:
            flush()
            out.append(Outgoing(command, [(callback, None)]))
            continue
        if group and (count + len(commands) > MAX_ENTRY_COMMANDS or size + len(command) > MAX_ENTRY_BYTES):
            flush()
        group.append((command, callback, commands))
        size += len(command)
        count += len(commands)
    flush()
    return out


def slot_of(value: object) -> Slot | None:
    """The slot an ``apply_command_response`` carries, or None if it is not a valid one."""
    if (isinstance(value, (list, tuple)) and len(value) == 3 and all(type(x) is int and x >= 0 for x in value)
            and value[0] + value[1] <= value[2]):
        return (value[0], value[1], value[2])
    return None


def sliced(callback: Callable[[object, int], None], slot: Slot) -> Callable[[object, int], None]:
    """``callback`` as PySyncObj calls it (result, error), given only its slot of a merged
    entry's results. A result that is not one per command of the whole entry (the processor
    failed it as a whole) is passed on unchanged: the committer then reports the outcome as
    unknown rather than pair results with the wrong commands."""
    offset, count, total = slot

    def deliver(result, error) -> None:
        if isinstance(result, list) and len(result) == total:
            result = result[offset:offset + count]
        callback(result, error)

    return deliver


def _commands(command: bytes, method_id: int) -> list | None:
    """The commands of a queued ``apply_entry`` call that may share its entry, else None.
    Read with the data-only unpickler (entries.py): a queued command can come from a follower."""
    if not command or command[0] != REGULAR:
        return None
    try:
        call = decode_command(command)
    except EntryDecodeError:  # not ours to judge: PySyncObj appends it as it is
        return None
    if call.method != method_id:
        return None
    return shareable_commands(call.payload)


def _call(method_id: int, payload: bytes) -> bytes:
    """The command bytes of ``apply_entry(payload)``, as PySyncObj's ``@replicated`` makes them."""
    return bytes([REGULAR]) + pickle.dumps((method_id, (payload,)))
