"""Building blocks of command validation, shared by the command schema (commands.py) and the
task ops (tasks.py): the error types and the field checks. Pure functions of their input."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MAX_UINT64 = (1 << 64) - 1  # msgpack's integer range; versions and indexes stay inside it


class CommandError(ValueError):
    """A command is malformed.

    ``field`` is the path of the offending field (``key``, ``then[2].value``, ``if[0]``);
    ``message`` is the whole human-readable text, which starts with that path and says how to
    fix it. ``str(error) == error.message``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class LimitError(CommandError):
    """A command is well formed but over a size or count limit (HTTP 413, not 400)."""


def check_fields(
    item: dict[Any, Any], prefix: str, what: str, required: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    allowed = (*required, *optional)
    for name in item:  # a dict iterates in insertion order: the first unknown field is reported
        if name not in allowed:
            label = prefix + (name if isinstance(name, str) and len(name) <= 60 else short(name))
            raise CommandError(
                label, f'{label}: unknown field for "{what}"; allowed fields are {join_names(allowed)}'
            )
    for name in required:
        if name not in item:
            raise CommandError(
                f"{prefix}{name}", f'{prefix}{name}: missing; "{what}" requires {join_names(required)}'
            )


def check_uint(number: Any, field: str, fix: str) -> None:
    if not is_int(number) or not 0 <= number <= MAX_UINT64:
        raise CommandError(field, f"{field}: expected an integer >= 0, got {short(number)}; {fix}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_KINDS = {
    dict: "a map",
    list: "a list",
    str: "a string",
    bytes: "bytes",
    bool: "a boolean",
    int: "an integer",
}


def kind_of(value: Any) -> str:
    return _KINDS.get(type(value), "null" if value is None else type(value).__name__)


def short(value: Any) -> str:
    """A bounded repr: messages are returned to clients and must stay small."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def join_names(names: Iterable[str]) -> str:
    return ", ".join(names)
