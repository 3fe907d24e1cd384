"""What a task is and what running it produced: `Job` (a command or a Python entry point, its
input files, `Limits` and `Grants`), `Outcome`, the `Driver` protocol the drivers in
``drivers.py`` implement, and the errors a caller can get. Nothing here starts a process.

Every `Job` is checked when it is built (``__post_init__``), so a bad job is refused where it
is written, with a `JobError` naming the field and the fix; `validate_job` runs the same
checks on demand (the drivers call it again, so a job built with ``object.__setattr__`` or
unpickled from elsewhere cannot slip past)."""

from __future__ import annotations

import json
import math
import posixpath
import re
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Protocol

# Names the drivers reserve in the working directory (entry.py spells the same names): the
# entry-point spec, its result and its error record. Input files may not start with the prefix.
RESERVED_PREFIX = ".synapse-"
ENTRY_SPEC_FILE = ".synapse-entry.json"
RESULT_FILE = ".synapse-result.json"
ERROR_FILE = ".synapse-error.json"
# Copies of the sandbox's own programs, placed in the working directory only when the task
# uid cannot reach the originals (a checkout under a private directory, mode 0700).
STAGED_RUNNER_FILE = ".synapse-runner.py"
STAGED_INIT_FILE = ".synapse-init"

# Upper bounds that catch unit mistakes (milliseconds passed as seconds, kB as bytes) rather
# than police policy; a worker's own policy is expected to be tighter.
MAX_SECONDS = 7 * 24 * 3600.0
MAX_MEMORY_BYTES = 1 << 40  # 1 TiB
# A Python interpreter needs about 20 MiB of address space to start; less cannot run anything
# the entry runner or a shell would start, so it is a mistake rather than a limit.
MIN_MEMORY_BYTES = 32 << 20
# Captured output is held in the worker's memory, once per stream.
MAX_OUTPUT_BYTES = 1 << 30
MAX_PROCESSES = 1 << 22  # the kernel's own pid_max ceiling
MAX_FILE_BYTES = 1 << 50

_ENTRY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Outcome.status values.
SUCCEEDED, FAILED, TIMED_OUT, CANCELLED = "succeeded", "failed", "timed-out", "cancelled"

# Outcome.reason values, with the status each goes with (DESIGN.md, "Outcomes").
REASONS = {
    "ok": SUCCEEDED,
    "exit_code": FAILED,  # the task exited non-zero (nothing more specific is known)
    "signal": FAILED,  # the task was killed by a signal not attributable to a limit
    "cpu_limit": FAILED,  # RLIMIT_CPU: SIGXCPU at cpu_s, SIGKILL one second later
    "memory_limit": FAILED,  # memory cgroup OOM kill, or MemoryError under memory_bytes
    "file_limit": FAILED,  # RLIMIT_FSIZE: SIGXFSZ, or EFBIG raised in an entry point
    "process_limit": FAILED,  # failed after a fork/clone was refused by the pids cgroup
    "output_limit": FAILED,  # stdout or stderr exceeded output_bytes: the task was killed
    "result_limit": FAILED,  # an entry point's JSON result exceeded result_bytes
    "result_not_json": FAILED,  # an entry point returned something json.dumps refuses
    "exception": FAILED,  # an entry point raised (traceback on stderr)
    "no_result": FAILED,  # an entry point's process exited 0 without writing its result
    "spawn_error": FAILED,  # the command could not be started (not found, not executable)
    "wall_time": TIMED_OUT,  # wall_s passed: the whole task was SIGKILLed
    "cancelled": CANCELLED,  # the cancel event was set: the whole task was SIGKILLed
}


class JobError(ValueError):
    """A job a caller built wrong; ``field`` names the offending field (``limits.cpu_s``,
    ``files['../x']``, ...) and the message says what to do instead."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SandboxUnavailable(RuntimeError):
    """The asked-for driver, or a limit a job asks for, cannot be enforced on this machine.
    The message names the driver and the fix; nothing ran."""

    def __init__(self, driver: str, message: str) -> None:
        super().__init__(f"sandbox driver {driver!r}: {message}")
        self.driver = driver


def _check_number(
    name: str, value: object, *, low: float, high: float, integer: bool, unit: str
) -> None:
    # bool is an int subclass; True as a memory limit is a bug, not one byte.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobError(name, f"must be a number of {unit}, got {value!r}")
    if integer and not isinstance(value, int):
        raise JobError(name, f"must be a whole number of {unit}, got {value!r}")
    if not math.isfinite(value) or value < low or value > high:
        raise JobError(name, f"{value!r} is outside {low:g}..{high:g} {unit}; check the unit")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one task. None means "no limit of this kind" (the worker's own
    limits still apply); DESIGN.md says which mechanism enforces each in each driver."""

    cpu_s: float | None = None  # RLIMIT_CPU, rounded up to whole seconds (the kernel's unit)
    memory_bytes: int | None = None  # RLIMIT_AS per process, and the memory cgroup's limit
    wall_s: float = 60.0  # wall-clock kill of the whole task
    output_bytes: int = 1 << 20  # per stream captured; exceeding it kills the task
    processes: int | None = None  # max processes+threads of the task (pids cgroup)
    file_bytes: int | None = None  # RLIMIT_FSIZE: largest file the task may write
    result_bytes: int = 1 << 20  # largest JSON result an entry point may return

    def __post_init__(self) -> None:
        if self.cpu_s is not None:
            _check_number("limits.cpu_s", self.cpu_s, low=1e-3, high=MAX_SECONDS, integer=False, unit="seconds")
        if self.memory_bytes is not None:
            _check_number(
                "limits.memory_bytes", self.memory_bytes,
                low=MIN_MEMORY_BYTES, high=MAX_MEMORY_BYTES, integer=True, unit="bytes",
            )
        _check_number("limits.wall_s", self.wall_s, low=1e-3, high=MAX_SECONDS, integer=False, unit="seconds")
        _check_number("limits.output_bytes", self.output_bytes, low=0, high=MAX_OUTPUT_BYTES, integer=True, unit="bytes")
        if self.processes is not None:
            _check_number("limits.processes", self.processes, low=1, high=MAX_PROCESSES, integer=True, unit="processes")
        if self.file_bytes is not None:
            _check_number("limits.file_bytes", self.file_bytes, low=0, high=MAX_FILE_BYTES, integer=True, unit="bytes")
        _check_number("limits.result_bytes", self.result_bytes, low=0, high=MAX_OUTPUT_BYTES, integer=True, unit="bytes")


def _check_absolute_paths(name: str, paths: object) -> tuple[str, ...]:
    if isinstance(paths, (str, bytes)) or not isinstance(paths, (tuple, list)):
        raise JobError(name, f"must be a tuple of absolute paths, got {paths!r}")
    checked = []
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise JobError(f"{name}[{path!r}]", "must be an absolute path (starting with '/')")
        normal = posixpath.normpath(path)
        if normal == "/":
            raise JobError(f"{name}[{path!r}]", "granting the whole file system is not a grant; name the directories the task needs")
        checked.append(normal)
    return tuple(checked)


@dataclass(frozen=True)
class Grants:
    """What a task may reach beyond its fresh working directory. Only the bwrap driver
    enforces these (DESIGN.md); paths must exist when the task starts."""

    network: bool = False
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.network, bool):
            raise JobError("grants.network", f"must be True or False, got {self.network!r}")
        object.__setattr__(self, "read_paths", _check_absolute_paths("grants.read_paths", self.read_paths))
        object.__setattr__(self, "write_paths", _check_absolute_paths("grants.write_paths", self.write_paths))


def _check_files(files: object) -> Mapping[str, bytes]:
    if not isinstance(files, Mapping):
        raise JobError("files", f"must map relative paths to bytes, got {type(files).__name__}")
    checked: dict[str, bytes] = {}
    for path, content in files.items():
        name = f"files[{path!r}]"
        if not isinstance(path, str) or not path or "\0" in path:
            raise JobError(name, "must be a non-empty relative path")
        if path.startswith("/"):
            raise JobError(name, "is absolute; input files live in the task's working directory, give a relative path")
        parts = path.split("/")
        if ".." in parts:
            raise JobError(name, "contains '..'; input files cannot leave the working directory")
        normal = posixpath.normpath(path)
        if normal == "." or normal.endswith("/"):
            raise JobError(name, "names the working directory itself, not a file")
        if normal.startswith(RESERVED_PREFIX):
            raise JobError(name, f"starts with {RESERVED_PREFIX!r}, which the entry runner reserves; rename it")
        if normal in checked:
            raise JobError(name, f"names the same file as another entry ({normal!r})")
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise JobError(name, f"content must be bytes, got {type(content).__name__} (encode text first)")
        checked[normal] = bytes(content)
    # A file and a directory of the same name cannot both be written.
    for normal in checked:
        parent = posixpath.dirname(normal)
        while parent:
            if parent in checked:
                raise JobError(f"files[{normal!r}]", f"needs {parent!r} to be a directory, but it is also given as a file")
            parent = posixpath.dirname(parent)
    return MappingProxyType(checked)


def _check_env(env: object) -> Mapping[str, str]:
    if not isinstance(env, Mapping):
        raise JobError("env", f"must map names to strings, got {type(env).__name__}")
    checked = {}
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise JobError(f"env[{name!r}]", "is not a valid variable name (letters, digits, '_'; not starting with a digit)")
        if not isinstance(value, str) or "\0" in value:
            raise JobError(f"env[{name!r}]", f"value must be a string without NUL, got {value!r}")
        checked[name] = value
    return MappingProxyType(checked)


@dataclass(frozen=True)
class Job:
    """One task: exactly one of ``argv`` (a command, searched on the task's PATH) or
    ``entry`` ("package.module:function", called with ``args``: a list is spread as
    positional arguments, a dict as keyword arguments, None calls it with none, anything
    else is the one argument — so a single list argument is written ``[[1, 2]]``)."""

    argv: tuple[str, ...] | None = None
    entry: str | None = None
    args: object = None
    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, bytes] = field(default_factory=dict)
    limits: Limits = Limits()
    grants: Grants = Grants()

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.entry is None):
            raise JobError("argv", "give exactly one of argv (a command) or entry ('module:function')")
        if self.argv is not None:
            if isinstance(self.argv, (str, bytes)) or not isinstance(self.argv, (tuple, list)):
                raise JobError("argv", f"must be a tuple of strings like ('python3', '-c', 'print(1)'), got {self.argv!r}")
            if not self.argv:
                raise JobError("argv", "is empty; give the program to run first")
            for i, arg in enumerate(self.argv):
                if not isinstance(arg, str) or "\0" in arg:
                    raise JobError(f"argv[{i}]", f"must be a string without NUL, got {arg!r}")
            if not self.argv[0]:
                raise JobError("argv[0]", "is empty; give the program to run")
            object.__setattr__(self, "argv", tuple(self.argv))
            if self.args is not None:
                raise JobError("args", "belongs to entry points; pass a command's arguments in argv")
        else:
            if not isinstance(self.entry, str) or not _ENTRY.match(self.entry):
                raise JobError("entry", f"{self.entry!r} is not 'package.module:function' (dotted module, a colon, a function name)")
            try:
                json.dumps(self.args, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise JobError("args", f"must be JSON (lists, dicts, strings, numbers, bools, None): {e}") from None
        object.__setattr__(self, "env", _check_env(self.env))
        object.__setattr__(self, "files", _check_files(self.files))
        if not isinstance(self.limits, Limits):
            raise JobError("limits", f"must be a Limits, got {type(self.limits).__name__}")
        if not isinstance(self.grants, Grants):
            raise JobError("grants", f"must be a Grants, got {type(self.grants).__name__}")


def validate_job(job: Job) -> Job:
    """Checks a job again (construction already did) and returns it; raises JobError."""
    if not isinstance(job, Job):
        raise JobError("job", f"must be a Job, got {type(job).__name__}")
    job.__post_init__()
    job.limits.__post_init__()
    job.grants.__post_init__()
    return job


@dataclass
class Outcome:
    status: str  # succeeded | failed | timed-out | cancelled
    reason: str  # a key of REASONS
    exit_code: int | None  # the task's exit code when it exited, else None
    signal: int | None  # the signal that killed it, else None
    stdout: bytes  # the first limits.output_bytes bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    output_hash: str  # DESIGN.md, "Output hash"
    result: object  # an entry point's JSON return value; None for commands and failures
    usage: dict  # cpu_user_s, cpu_sys_s, max_rss_kb, wall_s
    started_at: float  # time.time() right after spawning; when nothing ran, when run() gave up
    driver: str
    detail: str = ""  # one line on why, for people: the spawn error, the exception type, ...

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED


class Driver(Protocol):
    name: str

    def isolation(self) -> dict: ...

    def run(
        self,
        job: Job,
        cancel: threading.Event | None = None,
        on_start: Callable[[float], None] | None = None,
    ) -> Outcome: ...


def task_environment(job: Job, workdir: str) -> dict[str, str]:
    """The whole environment a task sees: nothing of the worker's (which holds tokens and
    secrets), a fixed PATH, its working directory as HOME and TMPDIR, then job.env on top."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
    }
    env.update(job.env)
    return env
