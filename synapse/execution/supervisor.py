"""The supervisor every driver shares: it runs one task from start to end.

``Supervisor.run``: check the job, make a fresh working directory and the task's cgroup,
start the task through the native launcher (rust/launch), capture stdout/stderr within their bounds
while watching the wall clock and the cancel event, make sure nothing the task started
outlives it, read its resource usage, classify how it ended (`_Verdict`), clean up. The
drivers (drivers.py) only say what command line the launcher executes and what they check
before starting."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from synapse.execution import entry as entry_runner
from synapse.execution.cgroups import CgroupSupport, TaskCgroup
from synapse.execution.sandbox import (
    ENTRY_SPEC_FILE,
    ERROR_FILE,
    FAILED,
    REASONS,
    RESULT_FILE,
    STAGED_RUNNER_FILE,
    Job,
    JobError,
    Outcome,
    SandboxUnavailable,
    task_environment,
    validate_job,
)

log = logging.getLogger(__name__)

# The uid/gid a task runs as when the worker is root: a task never keeps root's uid (it could
# kill the worker, read its secrets, write anywhere and move itself out of its cgroup).
NOBODY = 65534
# Once the task has ended and the rest of it has been SIGKILLed, how long to wait for its
# pipes to reach end-of-file. Only a process that escaped both the process group and the
# cgroup (possible only without cgroups) can hold them open longer.
_DRAIN_S = 1.0
# How long the launcher gets to report and exit once told to stop (it reaps the task, which
# is dead unless stuck in uninterruptible I/O); then it is SIGKILLed.
_LAUNCHER_GRACE_S = 5.0
# How often the supervisor looks at the cancel event (threading.Event has no file
# descriptor to wait on); this is the worst-case delay of a cancellation.
_CANCEL_POLL_S = 0.05
_READ_CHUNK = 1 << 16
# Working directories are WORKDIR_PREFIX + the worker's pid + a random suffix.
WORKDIR_PREFIX = "synapse-task-"
# The launcher's own environment: job.env (LD_PRELOAD, say) must reach only the task, after
# the privilege drop, never the launcher, which runs as the worker's uid.
LAUNCHER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class _Report:
    """What the launcher (and bwrap's init) said on the report pipe (rust/launch/src/main.rs)."""

    spawn_error: str = ""
    exit_status: int | None = None  # the launched program's wait status (the launcher's child)
    usage: tuple[float, float, int] | None = None  # user s, sys s, max RSS KiB of the task
    command_status: int | None = None  # the command's own wait status, from bwrap's init

    @classmethod
    def parse(cls, text: str) -> _Report:
        fields: dict = {}
        for line in text.splitlines():
            kind, _, rest = line.partition(" ")
            try:
                if kind == "spawn_error":
                    fields["spawn_error"] = rest
                elif kind == "exit":
                    status, user, system, rss = rest.split()
                    fields["exit_status"] = int(status)
                    fields["usage"] = (float(user), float(system), int(rss))
                elif kind == "status":
                    fields["command_status"] = int(rest)
            except ValueError:
                log.warning("unreadable line from a task's launcher: %r", line)
        return cls(**fields)


class _Capture:
    """One output stream: every byte read goes into the hash, the first ``limit`` are kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.size = 0
        self.digest = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.digest.update(data)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]
        self.size += len(data)

    @property
    def exceeded(self) -> bool:
        return self.size > self.limit


def output_hash(stdout_digest: bytes, stderr_digest: bytes) -> str:
    """sha256(sha256(stdout) || sha256(stderr)), hex: both streams, unambiguously (a byte
    moved from the end of stdout to the start of stderr changes it)."""
    return hashlib.sha256(stdout_digest + stderr_digest).hexdigest()


@lru_cache(maxsize=1)
def cgroup_support() -> CgroupSupport:
    """Probed once per worker process (and orphaned task cgroups of dead workers swept)."""
    return CgroupSupport.probe()


def _task_identity(driver: str, task_user: str) -> tuple[int, int] | None:
    """The (uid, gid) to switch the task to, or None when the worker is not root (the task
    then runs as the worker's own uid: nothing else is possible without privileges)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(task_user)
    except KeyError:
        if task_user != "nobody":
            raise SandboxUnavailable(driver, f"task_user {task_user!r} does not exist; create it or use 'nobody'") from None
        return NOBODY, NOBODY
    if entry.pw_uid == 0:
        raise SandboxUnavailable(driver, f"task_user {task_user!r} is root; tasks never run as root, use 'nobody'")
    return entry.pw_uid, entry.pw_gid


def _permits(st: os.stat_result, uid: int, gid: int, need: int) -> bool:
    """Whether the mode bits of ``st`` grant ``need`` (an rwx mask, 0o1..0o7) to uid/gid,
    with no supplementary groups (a task has none). ACLs are not consulted."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return (st.st_mode >> 6) & need == need
    if st.st_gid == gid:
        return (st.st_mode >> 3) & need == need
    return st.st_mode & need == need


def _may_write(path: str, uid: int, gid: int) -> bool:
    """Whether uid/gid may write the file ``path``, or create files in it if a directory."""
    return _permits(os.stat(path), uid, gid, 0o3 if os.path.isdir(path) else 0o2)


def unsearchable(directory: str, uid: int, gid: int) -> str | None:
    """The first directory on the way to ``directory`` (itself included, through symlinks
    too) that uid/gid may not search, or None."""
    for target in (os.path.abspath(directory), os.path.realpath(directory)):
        parts = target.rstrip("/").split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[: i + 1])
            if not _permits(os.stat(prefix), uid, gid, 0o1):
                return prefix
    return None


# The native launcher (rust/launch): built by the scripts' build step next to this module
# (scripts/lib/setup.sh, build_core); in a development tree, cargo's output works too.
_LAUNCHER_NAME = "synapse-launch"


def launcher_path(driver: str) -> str:
    """The native task launcher, or SandboxUnavailable saying how to build it."""
    here = Path(__file__).resolve().parent
    for candidate in (here / _LAUNCHER_NAME, here.parent.parent / "target" / "release" / _LAUNCHER_NAME):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise SandboxUnavailable(driver, f"the native task launcher {_LAUNCHER_NAME} is not built; run ./scripts/test "
                                     f"(or `cargo build --release -p synapse-launch` and copy target/release/"
                                     f"{_LAUNCHER_NAME} to {here}/)")


def unreachable_part(program: str, uid: int, gid: int) -> str | None:
    """What keeps uid/gid from running ``program``: an unsearchable directory on the way,
    or the program itself; None when it can run it."""
    for target in (os.path.abspath(program), os.path.realpath(program)):
        blocked = unsearchable(os.path.dirname(target), uid, gid)
        if blocked is not None:
            return blocked
    if not _permits(os.stat(os.path.realpath(program)), uid, gid, 0o5):
        return program
    return None


def _entry_python(configured: str | None, uid: int, gid: int) -> tuple[str | None, str]:
    """The interpreter entry points run with, and why. The worker's own by default; when the
    task uid cannot run it (a Python under a private home directory, as pyenv installs
    do), the system's python3 of the same version, which then gets the worker's import
    path appended (entry.py), so the same packages import."""
    if configured is not None:
        return configured, "configured"
    blocked = unreachable_part(sys.executable, uid, gid)
    if blocked is None:
        return sys.executable, "the worker's interpreter"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if (
            os.path.exists(candidate)
            and os.path.basename(os.path.realpath(candidate)) == version
            and unreachable_part(candidate, uid, gid) is None
        ):
            return candidate, f"the worker's interpreter {sys.executable} is not runnable by uid {uid} ({blocked})"
    return None, (
        f"uid {uid}, which tasks run as, cannot run the worker's interpreter {sys.executable} "
        f"({blocked} is not accessible to it) and there is no system {version}; pass python= an "
        f"interpreter every user can run (apt-get install python3), or `chmod o+x {blocked}`"
    )


@lru_cache(maxsize=None)
def _sweep_workdirs(root: str) -> None:
    """Removes working directories left in ``root`` by workers that died (SIGKILL) during a
    task; the worker's pid is in the name. Once per root and worker process."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        match = re.fullmatch(re.escape(WORKDIR_PREFIX) + r"(\d+)-\w+", name)
        if match is None or int(match[1]) == os.getpid():
            continue
        try:
            os.kill(int(match[1]), 0)
            continue  # its worker is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        log.warning("removing %s, left by worker process %s, which is gone", os.path.join(root, name), match[1])
        _remove_tree(os.path.join(root, name))


def _remove_tree(path: str) -> None:
    root = os.path.abspath(path)

    def make_writable_and_retry(func, target, exc_info):
        if isinstance(exc_info[1], FileNotFoundError):
            return  # removed meanwhile (another worker's sweep): nothing to do
        # A task running as the worker's own uid can chmod its directories to 000. Only ever
        # inside the tree: the tree's parent is the shared temp dir (a chmod of it to 0700 once
        # locked every other user out of /tmp).
        # Never through a symlink (it would chmod whatever it points at; links are only
        # unlinked), and the task's processes are all gone by now, so nothing swaps one in.
        for p in (os.path.dirname(target), target):
            inside = os.path.abspath(p) == root or os.path.abspath(p).startswith(root + os.sep)
            if inside and not os.path.islink(p):
                try:
                    os.chmod(p, 0o700)
                except OSError:
                    pass
        try:
            func(target)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s from a task's working directory: %s", target, e)

    shutil.rmtree(path, onerror=make_writable_and_retry)


def _read_task_file(workdir: str, name: str, limit: int) -> bytes | None:
    """A file the task wrote, read without trusting it: never through a symlink (the task
    could point it at a secret the worker can read), never blocking on a FIFO, at most
    ``limit + 1`` bytes (so the caller can tell it was over)."""
    try:
        fd = os.open(os.path.join(workdir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(_READ_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _not_started(driver: str, reason: str, detail: str) -> Outcome:
    """The outcome of a task that never ran; ``detail`` is also its stderr, so a caller that
    only shows stderr still says why."""
    stderr = detail.encode() + b"\n"
    return Outcome(
        status=REASONS[reason], reason=reason, exit_code=None, signal=None, stdout=b"", stderr=stderr,
        stdout_truncated=False, stderr_truncated=False,
        output_hash=output_hash(hashlib.sha256().digest(), hashlib.sha256(stderr).digest()),
        result=None, usage={"cpu_user_s": 0.0, "cpu_sys_s": 0.0, "max_rss_kb": 0, "wall_s": 0.0},
        started_at=time.time(), driver=driver, detail=detail,
    )


@dataclass(frozen=True)
class _Evidence:
    """What the supervisor knows about a task's end besides its wait status and output."""

    stopped: str | None  # "cancelled" | "wall_time" | "output_limit" when the supervisor killed it
    spawn_error: str  # the launcher's or init's report: why the program could not be started
    status_exact: bool  # the wait status is the command's own (else decode_exit interprets it)
    oom_kills: int  # memory cgroup OOM kills
    fork_refusals: int  # forks the pids cgroup refused while the task ran


class _Verdict:
    """Turns how a task ended into Outcome.status/reason/detail (and the entry point's
    result), most specific cause first; DESIGN.md, "Outcomes", lists the order."""

    def __init__(self, outcome: Outcome, job: Job, workdir: str, evidence: _Evidence) -> None:
        self.o, self.job, self.workdir, self.e = outcome, job, workdir, evidence
        self.limits = job.limits

    def _set(self, reason: str, detail: str = "") -> None:
        self.o.reason, self.o.status, self.o.detail = reason, REASONS[reason], detail

    def conclude(self, decode_exit: Callable) -> None:
        o, e, limits = self.o, self.e, self.limits
        if e.stopped == "cancelled":
            return self._set("cancelled", "the cancel event was set; the task was killed")
        if e.stopped == "wall_time":
            return self._set("wall_time", f"still running after limits.wall_s={limits.wall_s}; the task was killed")
        if e.stopped == "output_limit":
            which = " and ".join(n for n, t in (("stdout", o.stdout_truncated), ("stderr", o.stderr_truncated)) if t)
            return self._set("output_limit", f"{which} exceeded limits.output_bytes={limits.output_bytes}; the task was killed")
        if e.spawn_error:
            o.exit_code = o.signal = None
            return self._set("spawn_error", e.spawn_error)
        if not e.status_exact:
            o.exit_code, o.signal, spawn_error = decode_exit(o.exit_code, o.signal, o.stderr)
            if spawn_error:
                return self._set("spawn_error", spawn_error)
        if e.oom_kills > 0:
            return self._set("memory_limit", f"the task used more than limits.memory_bytes={limits.memory_bytes}; the kernel killed it")
        cpu_used = o.usage["cpu_user_s"] + o.usage["cpu_sys_s"]
        # SIGXCPU comes at the soft limit; a task that ignores it gets SIGKILL at the hard limit
        # one second later. The kernel checks RLIMIT_CPU against tick-sampled CPU time, while
        # rusage reports the scheduler's precise time, which can be lower when other processes
        # share the CPU (a task stopped at the 1 s limit reported 0.88 s with both cores
        # loaded): a SIGKILL is the hard limit's when the task used at least its soft limit.
        if limits.cpu_s is not None and (
            o.signal == signal.SIGXCPU or (o.signal == signal.SIGKILL and cpu_used >= max(1, math.ceil(limits.cpu_s)))
        ):
            return self._set("cpu_limit", f"used {cpu_used:.2f} s of CPU; limits.cpu_s={limits.cpu_s}")
        if limits.file_bytes is not None and o.signal == signal.SIGXFSZ:
            return self._set("file_limit", f"wrote past limits.file_bytes={limits.file_bytes}")
        if o.signal is not None:
            try:
                name = signal.Signals(o.signal).name
            except ValueError:
                name = f"signal {o.signal}"
            return self._set("signal", f"killed by {name}")
        if self.job.entry is not None:
            return self._entry()
        if o.exit_code == 0:
            return self._set("ok")
        return self._failure()

    def _failure(self) -> None:
        o, limits = self.o, self.limits
        if limits.processes is not None and self.e.fork_refusals > 0:
            return self._set("process_limit", f"exited {o.exit_code} after a fork was refused at limits.processes={limits.processes}")
        # A command has no channel to say "out of memory" but its exit code and stderr. A
        # Python program that hits RLIMIT_AS ends with a MemoryError traceback, and that
        # last line is taken as the cause: a heuristic (DESIGN.md); other programs that run
        # out of address space stay "exit_code".
        if limits.memory_bytes is not None and not o.stderr_truncated:
            lines = o.stderr.rstrip().splitlines()
            if lines and re.match(rb"MemoryError\b", lines[-1]):
                return self._set("memory_limit", f"MemoryError under limits.memory_bytes={limits.memory_bytes}")
        return self._set("exit_code", f"exited {o.exit_code}")

    def _entry(self) -> None:
        o, limits, entry = self.o, self.limits, self.job.entry
        record = _read_task_file(self.workdir, ERROR_FILE, 1 << 16) if o.exit_code != 0 else None
        if record is not None:
            try:
                error = json.loads(record)
                kind, exc_type, errno_ = error["error"], error["type"], error["errno"]
                message = str(error["message"])
            except (ValueError, KeyError, TypeError):
                kind, exc_type, errno_, message = "exception", None, None, "the entry runner's error record is unreadable"
            if exc_type == "MemoryError" and limits.memory_bytes is not None:
                return self._set("memory_limit", f"MemoryError under limits.memory_bytes={limits.memory_bytes}")
            if errno_ == errno.EFBIG and limits.file_bytes is not None:  # Python ignores SIGXFSZ
                return self._set("file_limit", f"wrote past limits.file_bytes={limits.file_bytes}")
            if kind in ("result_not_json", "result_limit"):
                return self._set(kind, message)
            if limits.processes is not None and self.e.fork_refusals > 0:
                return self._set("process_limit", f"{message} (a fork or thread was refused at limits.processes={limits.processes})")
            return self._set("exception", message)
        if o.exit_code != 0:
            return self._failure()
        text = _read_task_file(self.workdir, RESULT_FILE, limits.result_bytes)
        if text is None:
            return self._set("no_result", f"{entry} exited 0 without writing a result (os._exit in the task?)")
        if len(text) > limits.result_bytes:
            return self._set("result_limit", f"the result is over limits.result_bytes={limits.result_bytes}")
        try:
            o.result = json.loads(text)
        except ValueError as exc:
            return self._set("result_not_json", f"the result file is not JSON: {exc}")
        self._set("ok")


class Supervisor:
    """What every driver shares; subclasses say how the task's command line is built."""

    name = "?"
    # Processes the driver itself adds to the task's cgroup (bwrap's monitor and init).
    pid_overhead = 0
    # Whether limits.processes is enforced by something other than this worker's pids cgroup.
    limits_processes_elsewhere = False
    # Whether the launched program wraps the command (bwrap, docker), so that its exit
    # status is not the command's own unless an init inside reports that (bwrap's does).
    wraps_command = False
    # Whether the report pipe is passed on to the launched program (bwrap's init uses it).
    passes_report = False

    def __init__(
        self,
        *,
        workdir_root: str | None = None,
        task_user: str = "nobody",
        python: str | None = None,
        use_cgroups: bool = True,
    ) -> None:
        """``workdir_root``: where working directories are made (default: the temp dir);
        ``task_user``: the account tasks run as when the worker is root; ``python``: the
        interpreter for entry points (default: the worker's own, DESIGN.md)."""
        self.workdir_root = workdir_root or tempfile.gettempdir()
        if not os.path.isdir(self.workdir_root):
            raise SandboxUnavailable(self.name, f"workdir_root {self.workdir_root!r} is not a directory; create it or pass another")
        self.identity = _task_identity(self.name, task_user)
        uid, gid = self.identity or (os.geteuid(), os.getegid())
        # The task's HOME and TMPDIR are absolute paths in here: the task uid must be able
        # to walk to them.
        blocked = unsearchable(self.workdir_root, uid, gid)
        if blocked is not None:
            raise SandboxUnavailable(
                self.name, f"workdir_root {self.workdir_root!r} is not reachable by uid {uid}, which tasks run as "
                f"({blocked} is not searchable by it); `chmod o+x {blocked}` or pass another workdir_root",
            )
        self.launcher = launcher_path(self.name)
        # The entry runner runs as the task uid: from the package when that uid can read it,
        # else from a copy in each entry task's working directory.
        self.runner = os.path.abspath(entry_runner.__file__)
        self.stage_runner = unreachable_part(self.runner, uid, gid) is not None
        self.entry_python, self.entry_python_note = _entry_python(python, uid, gid)
        _sweep_workdirs(os.path.realpath(self.workdir_root))
        self.cgroups = cgroup_support() if use_cgroups else CgroupSupport(problems={"pids": "disabled by the driver", "memory": "disabled by the driver"})

    # -- what a driver says about itself ---------------------------------------------------

    def task_ids(self) -> tuple[int, int]:
        """The uid and gid the task runs as (what its write grants are checked for)."""
        return self.identity or (os.geteuid(), os.getegid())

    def task_uid(self) -> int:
        return self.task_ids()[0]

    def _limit_mechanisms(self) -> dict:
        c = self.cgroups
        pids = f"pids cgroup v{c.pids_version} (pids.max)" if c.pids_parent else None
        memory = "RLIMIT_AS per process" + (f" + memory cgroup v{c.memory_version} for the whole task" if c.memory_parent else "")
        return {
            "cpu_s": "RLIMIT_CPU (SIGXCPU, SIGKILL 1 s later)",
            "memory_bytes": memory,
            "processes": pids,
            "file_bytes": "RLIMIT_FSIZE",
            "wall_s": "supervisor: SIGKILL of the process group" + (" and every cgroup member" if c.pids_parent else ""),
            "output_bytes": "supervisor: bounded capture; the task is killed past the bound",
            "result_bytes": "supervisor: bounded read of the entry point's result",
        }

    # -- pre-flight ---------------------------------------------------------------------------

    def _check(self, job: Job) -> None:
        """Refuses, before anything runs, a job this driver cannot run as asked."""
        if job.limits.processes is not None and self.cgroups.pids_parent is None and not self.limits_processes_elsewhere:
            raise SandboxUnavailable(
                self.name,
                f"limits.processes={job.limits.processes} needs a pids cgroup, and this worker has none "
                f"({self.cgroups.problems.get('pids')}); run the worker as root or in a delegated cgroup, "
                "or drop limits.processes",
            )
        if job.entry is not None and self.entry_python is None:
            raise SandboxUnavailable(self.name, f"cannot run entry points: {self.entry_python_note}")
        uid, gid = self.task_ids()
        for path in job.grants.read_paths:
            if not os.path.exists(path):
                raise JobError(f"grants.read_paths[{path!r}]", "does not exist; create it before the task starts or drop the grant")
        for path in job.grants.write_paths:
            if not os.path.exists(path):
                raise JobError(f"grants.write_paths[{path!r}]", "does not exist; create it before the task starts or drop the grant")
            if not _may_write(path, uid, gid):
                raise JobError(
                    f"grants.write_paths[{path!r}]",
                    f"is not writable by uid {uid}, which the task runs as; `chown {uid} {path}` "
                    "(or make it group/world-writable) or drop the grant",
                )

    # -- hooks ---------------------------------------------------------------------------------

    def _task_argv(self, job: Job, workdir: str, task_name: str, report_fd: int) -> list[str]:
        """The command line the launcher executes (``report_fd``: the report pipe)."""
        return list(job.argv) if job.argv is not None else self._entry_argv(workdir)

    def _entry_argv(self, workdir: str) -> list[str]:
        runner = os.path.join(workdir, STAGED_RUNNER_FILE) if self.stage_runner else self.runner
        return [self.entry_python, "-I", runner, ENTRY_SPEC_FILE]

    def _staged(self, job: Job) -> list[tuple[str, str]]:
        """(original, name in the working directory) of the programs to copy there."""
        return [(self.runner, STAGED_RUNNER_FILE)] if job.entry is not None and self.stage_runner else []

    def _import_path(self) -> list[str]:
        """The worker's import path, appended to the entry point's own (entry.py)."""
        return [p for p in sys.path if os.path.isabs(p)]

    def _task_env(self, job: Job, workdir: str) -> dict[str, str]:
        return task_environment(job, workdir)

    def _rlimits(self, job: Job) -> list[tuple[str, int, int]]:
        limits = job.limits
        # A SIGXCPU or SIGSEGV would otherwise leave a core file of up to memory_bytes in the
        # working directory (or in the worker's core pattern).
        rlimits = [("RLIMIT_CORE", 0, 0)]
        if limits.cpu_s is not None:
            soft = max(1, math.ceil(limits.cpu_s))
            rlimits.append(("RLIMIT_CPU", soft, soft + 1))
        if limits.memory_bytes is not None:
            rlimits.append(("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes))
        if limits.file_bytes is not None:
            rlimits.append(("RLIMIT_FSIZE", limits.file_bytes, limits.file_bytes))
        return rlimits

    def _decode_exit(self, exit_code: int | None, sig: int | None, stderr: bytes) -> tuple[int | None, int | None, str | None]:
        """(exit code, signal, spawn error) of the command, from the wrapping program's own
        exit status (wraps_command drivers only)."""
        return exit_code, sig, None

    def _stop(self, task_name: str) -> None:
        """Extra step to kill a task beyond its process group and cgroup (containers)."""

    # -- the run ----------------------------------------------------------------------------

    def run(
        self,
        job: Job,
        cancel: threading.Event | None = None,
        on_start: Callable[[float], None] | None = None,
    ) -> Outcome:
        """Runs ``job`` to its end and returns what happened. Blocks the calling thread.
        Raises JobError for a job that cannot run as written and SandboxUnavailable for one
        this driver cannot confine as asked; anything that goes wrong with the task itself
        is in the Outcome."""
        validate_job(job)
        self._check(job)
        if cancel is not None and cancel.is_set():
            return _not_started(self.name, "cancelled", "cancelled before it started")
        task_name = f"synapse-{uuid.uuid4().hex[:16]}"
        workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=self.workdir_root)
        cgroup: TaskCgroup | None = None
        try:
            self._populate(job, workdir)
            if self.cgroups.pids_parent is not None:
                try:
                    cgroup = self.cgroups.create(
                        processes=None if job.limits.processes is None else job.limits.processes + self.pid_overhead,
                        memory_bytes=job.limits.memory_bytes,
                    )
                except OSError as e:
                    raise SandboxUnavailable(self.name, f"cannot create the task's cgroup under {self.cgroups.pids_parent}: {e}") from e
            return self._supervise(job, workdir, task_name, cgroup, cancel, on_start)
        finally:
            if cgroup is not None:
                cgroup.kill()
                cgroup.remove()
            _remove_tree(workdir)

    def _populate(self, job: Job, workdir: str) -> None:
        created = [workdir]
        for relative, content in job.files.items():
            path = os.path.join(workdir, relative)
            parent = os.path.dirname(path)
            while parent != workdir and parent not in created:
                created.append(parent)
                parent = os.path.dirname(parent)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
            created.append(path)
        if job.entry is not None:
            spec = {"entry": job.entry, "args": job.args, "result_bytes": job.limits.result_bytes, "path": self._import_path()}
            path = os.path.join(workdir, ENTRY_SPEC_FILE)
            with open(path, "w") as f:
                json.dump(spec, f)
            created.append(path)
        for original, name in self._staged(job):
            path = os.path.join(workdir, name)
            shutil.copy2(original, path)  # keeps the mode: the init binary stays executable
            created.append(path)
        if self.identity is not None:
            uid, gid = self.identity
            for path in created:
                os.lchown(path, uid, gid)

    def _supervise(
        self,
        job: Job,
        workdir: str,
        task_name: str,
        cgroup: TaskCgroup | None,
        cancel: threading.Event | None,
        on_start: Callable[[float], None] | None,
    ) -> Outcome:
        env = self._task_env(job, workdir)
        report_r, report_w = os.pipe()
        spec_fd = os.memfd_create("synapse-launch-spec")
        try:
            spec = {
                "supervisor": os.getpid(),
                "cgroups": cgroup.procs_files if cgroup is not None else [],
                "rlimits": self._rlimits(job),
                "uid": self.identity[0] if self.identity else None,
                "gid": self.identity[1] if self.identity else None,
                # pass_fds keeps descriptor numbers: report_w is the same number in the task.
                "argv": self._task_argv(job, workdir, task_name, report_w),
                "env": env,
                "pass_report": self.passes_report,
            }
            # On a memfd rather than in argv: argv and env may be large.
            os.write(spec_fd, json.dumps(spec).encode())
            os.lseek(spec_fd, 0, os.SEEK_SET)
            proc = subprocess.Popen(
                [self.launcher, "launch", str(spec_fd), str(report_w)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=workdir, env=LAUNCHER_ENV, close_fds=True, pass_fds=(spec_fd, report_w),
                start_new_session=True,
            )
        except OSError as e:
            os.close(report_r)
            return _not_started(self.name, "spawn_error", f"cannot start the task's launcher ({self.launcher}): {e}")
        finally:
            os.close(spec_fd)
            os.close(report_w)
        started_at = time.time()
        started = time.monotonic()
        pidfd = os.pidfd_open(proc.pid)
        try:
            return self._watch(job, workdir, task_name, cgroup, proc, pidfd, report_r, started_at, started, cancel, on_start)
        finally:
            os.close(report_r)
            if proc.returncode is None:  # _watch raised before reaping: never leave the task running
                self._kill(proc, cgroup, task_name)
                self._reap(proc, pidfd)
            os.close(pidfd)
            proc.stdout.close()
            proc.stderr.close()

    def _kill(self, proc: subprocess.Popen, cgroup: TaskCgroup | None, task_name: str) -> None:
        """Ends the whole task: the launcher SIGKILLs the task's process group (it is its
        child, not yet reaped, so the group id cannot have been reused), the cgroup kill
        gets the processes that left the group."""
        try:
            os.kill(proc.pid, signal.SIGTERM)  # the launcher is not reaped yet either
        except ProcessLookupError:
            pass
        if cgroup is not None:
            cgroup.kill()
        self._stop(task_name)

    @staticmethod
    def _reap(proc: subprocess.Popen, pidfd: int) -> tuple[int, "os.struct_rusage"]:
        """Waits for the launcher (bounded: SIGKILL after _LAUNCHER_GRACE_S) and reaps it."""
        with selectors.DefaultSelector() as waiting:
            waiting.register(pidfd, selectors.EVENT_READ)
            if not waiting.select(_LAUNCHER_GRACE_S):
                log.warning("task launcher %d did not exit %.0f s after the task ended; killing it", proc.pid, _LAUNCHER_GRACE_S)
                os.kill(proc.pid, signal.SIGKILL)
        _, status, rusage = os.wait4(proc.pid, 0)
        # Popen must never wait for this pid again: it could by then be another process.
        proc.returncode = os.waitstatus_to_exitcode(status)
        return status, rusage

    def _watch(
        self,
        job: Job,
        workdir: str,
        task_name: str,
        cgroup: TaskCgroup | None,
        proc: subprocess.Popen,
        pidfd: int,
        report_r: int,
        started_at: float,
        started: float,
        cancel: threading.Event | None,
        on_start: Callable[[float], None] | None,
    ) -> Outcome:
        limits = job.limits
        out, err = _Capture(limits.output_bytes), _Capture(limits.output_bytes)
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        with selectors.DefaultSelector() as selector:
            selector.register(pidfd, selectors.EVENT_READ)  # readable once the launcher exits
            for fd in streams:
                selector.register(fd, selectors.EVENT_READ)
            if on_start is not None:
                on_start(started_at)
            deadline = started + limits.wall_s
            stopped: str | None = None  # why the supervisor ended the task, if it did
            exited = False
            while not exited and stopped is None:
                timeout = deadline - time.monotonic()
                if cancel is not None:
                    timeout = min(timeout, _CANCEL_POLL_S)
                for key, _ in selector.select(max(timeout, 0)):
                    if key.fd == pidfd:
                        exited = True
                    else:
                        self._read(selector, key.fd, streams)
                if out.exceeded or err.exceeded:
                    stopped = "output_limit"
                elif exited:
                    break
                elif cancel is not None and cancel.is_set():
                    stopped = "cancelled"
                elif time.monotonic() >= deadline:
                    stopped = "wall_time"
            # Read before our own kill below, which sets pids.max to 0: forks refused then
            # are ours, not the task's.
            fork_refusals = cgroup.fork_refusals() if cgroup is not None else 0
            # The task is over, by its own end or by our decision: nothing it started
            # outlives it (a background child of a command that exited is killed too).
            self._kill(proc, cgroup, task_name)
            status, rusage = self._reap(proc, pidfd)
            ended = time.monotonic()
            selector.unregister(pidfd)
            drain_until = ended + _DRAIN_S
            while selector.get_map() and time.monotonic() < drain_until:
                for key, _ in selector.select(max(drain_until - time.monotonic(), 0)):
                    self._read(selector, key.fd, streams)
        os.set_blocking(report_r, False)
        try:
            # A fork (without exec) by another thread of the worker at the wrong moment can
            # hold a copy of the write end: never wait for it.
            report = _Report.parse(os.read(report_r, 1 << 16).decode(errors="replace"))
        except BlockingIOError:
            report = _Report()
        if report.usage is not None:
            cpu_user, cpu_sys, max_rss = report.usage
        else:
            # The launcher died before reporting (it never does unless SIGKILLed): its own
            # rusage is all there is, and its peak RSS is the worker's (DESIGN.md, "Usage").
            cpu_user, cpu_sys, max_rss = rusage.ru_utime, rusage.ru_stime, rusage.ru_maxrss
        # The command's own status: from bwrap's init when there is one, else the launched
        # program's, else (the launcher was killed) the launcher's.
        if report.command_status is not None:
            status = report.command_status
        elif report.exit_status is not None:
            status = report.exit_status
        outcome = Outcome(
            status=FAILED, reason="exit_code",
            exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            stdout=bytes(out.kept), stderr=bytes(err.kept),
            stdout_truncated=out.exceeded, stderr_truncated=err.exceeded,
            output_hash=output_hash(out.digest.digest(), err.digest.digest()),
            result=None,
            usage={"cpu_user_s": cpu_user, "cpu_sys_s": cpu_sys, "max_rss_kb": max_rss, "wall_s": ended - started},
            started_at=started_at, driver=self.name,
        )
        evidence = _Evidence(
            stopped=stopped, spawn_error=report.spawn_error,
            status_exact=report.command_status is not None or not self.wraps_command,
            oom_kills=cgroup.oom_kills() if cgroup is not None else 0,
            fork_refusals=fork_refusals,
        )
        _Verdict(outcome, job, workdir, evidence).conclude(self._decode_exit)
        return outcome

    @staticmethod
    def _read(selector: selectors.BaseSelector, fd: int, streams: dict[int, _Capture]) -> None:
        data = os.read(fd, _READ_CHUNK)
        if data:
            streams[fd].feed(data)
        else:
            selector.unregister(fd)


