"""How the CLI (and the bench scripts) show progress on long operations: rich bars on stderr,
for a person at a terminal, and nothing otherwise.

- On stderr, so stdout stays what scripts read (``--output json``, piped output).
- Only when stderr is a terminal (rich's ``Console(stderr=True).is_terminal``, which also
  honours ``FORCE_COLOR`` and ``TTY_COMPATIBLE``). Piped or captured by a log or CI, a bar is
  escape codes and one-line updates would bury the errors that matter there, so nothing at all
  is printed then: the command's own result line says what was done.
- ``SYNAPSE_PROGRESS=never`` silences them at a terminal too, ``always`` draws them even when
  stderr is not one; a command given ``--output json`` passes ``show=False`` (its reader is a
  program).
- Library code (``synapse/integrity``, ``synapse/chaos``, the client) never imports rich: it
  takes an optional ``progress(done, total)`` callback, and a ``Bar`` is one.
- Bars are transient: they are gone when the work ends, leaving the command's output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich import filesize
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

ENV = "SYNAPSE_PROGRESS"  # auto (the default), always or never


class Bar:
    """One bar. ``bar(done, total)`` is the callback library code takes (``total`` None: not
    changed); ``step``, ``advance`` and ``describe`` are for a caller counting its own steps.
    A bar that is not shown does nothing, so callers never ask whether it is."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None) -> None:
        self._progress, self._task = progress, task
        self._stepping = False

    def __call__(self, done: float, total: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)

    def advance(self, steps: float = 1, description: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, description=description)

    def step(self, description: str) -> None:
        """The next of the bar's steps begins (a phase of a bench script): the one before it,
        if any, is done."""
        self.advance(1 if self._stepping else 0, description)
        self._stepping = True

    def describe(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def restart(self, total: float | None, description: str | None = None) -> None:
        """From zero again (the next run of a series), its clock too."""
        if self._progress is not None:
            self._progress.reset(self._task, total=total, description=description)


class Bars:
    """The bars of one command, stacked on stderr."""

    def __init__(self, progress: Progress | None = None) -> None:
        self._progress = progress

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def bar(self, description: str, total: float | None = None, unit: str = "") -> Bar:
        """A new bar. ``unit``: ``"bytes"`` (sizes and speed), ``"s"`` (seconds), or a word
        for what is counted (``"entries"``); ``total`` None: unknown yet."""
        if self._progress is None:
            return Bar()
        return Bar(self._progress, self._progress.add_task(description, total=total, unit=unit))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The bars taken off the screen while the caller prints to stdout (a line written
        under a live bar on the same terminal would be drawn over)."""
        if self._progress is None:
            yield
            return
        self._progress.stop()
        try:
            yield
        finally:
            self._progress.start()


def wanted(console: Console, show: bool | None = None) -> bool:
    """Whether to draw bars on ``console``: ``show`` if given, else ``SYNAPSE_PROGRESS``, else
    whether it is a terminal."""
    if show is not None:
        return show
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting in ("always", "never"):
        return setting == "always"
    return console.is_terminal


@contextmanager
def bars(show: bool | None = None, console: Console | None = None) -> Iterator[Bars]:
    """Bars on stderr (or ``console``) for the duration of the block, if ``wanted``; else
    ``Bars`` whose bars do nothing."""
    console = console or Console(stderr=True)
    if not wanted(console, show):
        yield Bars()
        return
    if not console.is_terminal:  # forced: draw as on a terminal (rich would print nothing live)
        console = Console(file=console.file, force_terminal=True)
    # Lines the code prints to stderr meanwhile (the bench scripts' logs, warnings) go above
    # the bars; stdout is never redirected — it must stay the command's output, on its fd.
    progress = Progress(TextColumn("{task.description}"), BarColumn(), _Amount(), TimeElapsedColumn(),
                        console=console, transient=True, redirect_stdout=False, redirect_stderr=True)
    with progress:
        yield Bars(progress)


@contextmanager
def bar(description: str, total: float | None = None, unit: str = "", show: bool | None = None) -> Iterator[Bar]:
    """One bar for the duration of the block (``bars`` with a single bar)."""
    with bars(show) as shown:
        yield shown.bar(description, total, unit)


class _Amount(ProgressColumn):
    """Done out of total in the bar's unit: sizes and speed, seconds, or a count."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        if unit == "bytes":
            total = "?" if task.total is None else filesize.decimal(int(task.total))
            speed = f" {filesize.decimal(int(task.speed))}/s" if task.speed else ""
            return Text(f"{filesize.decimal(int(task.completed))}/{total}{speed}")
        total = "?" if task.total is None else f"{task.total:,.0f}"
        return Text(f"{task.completed:,.0f}/{total}" + (f" {unit}" if unit else ""))
