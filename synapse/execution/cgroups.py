"""Per-task control groups: the one reliable place to count, cap and kill every process of a
task, whatever it does to its process group or session.

``CgroupSupport.probe()`` finds, once per worker process, where this worker may create task
cgroups for the ``pids`` and ``memory`` controllers: under its own cgroup, in a ``synapse``
child, in the cgroup v1 hierarchy the controller is bound to, or else in the unified (v2)
hierarchy when the controller is enabled there. A `TaskCgroup` is one directory per
hierarchy (v1: one for pids, one for memory; v2: one for both), created before the task is
spawned; the task's launcher writes its own pid into each ``cgroup.procs`` before it execs,
so nothing the task runs is ever outside. ``kill()`` stops forks and SIGKILLs every member;
``remove()`` then deletes the directories.

Why nested under the worker's own cgroup rather than at the root: the task stays inside any
limit the worker itself runs under (a container's memory limit, a systemd slice), and a
worker without write access to the root can still work in a delegated subtree."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PARENT_NAME = "synapse"
_TASK_PREFIX = "task-"
# How long kill()/remove() keep trying: members need a moment to exit after SIGKILL (a
# process in uninterruptible I/O dies when the I/O ends).
_SETTLE_S = 5.0


@dataclass(frozen=True)
class _Mount:
    path: Path
    root: str  # the mount's root inside the hierarchy (not "/" inside some containers)
    version: int
    controllers: frozenset[str]  # v1 only: the controllers bound to this hierarchy


def _mounts() -> list[_Mount]:
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            fstype, options = tail[0], tail[2] if len(tail) > 2 else ""
            if fstype == "cgroup":
                mounts.append(_Mount(Path(_unescape(fields[4])), fields[3], 1, frozenset(options.split(","))))
            elif fstype == "cgroup2":
                mounts.append(_Mount(Path(_unescape(fields[4])), fields[3], 2, frozenset()))
    return mounts


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _own_cgroups() -> dict[str, str]:
    """controller name (or "" for the unified hierarchy) -> this process's cgroup path."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0" and controllers == "":
                own[""] = path
            for controller in controllers.split(","):
                if controller:
                    own[controller] = path
    return own


def _inside(mount: _Mount, path: str) -> Path:
    relative = path
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        relative = path[len(mount.root):]
    return mount.path / relative.lstrip("/")


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read_counter(path: Path, key: str) -> int:
    """A "key value" line of a flat-keyed cgroup file (memory.events, pids.events, ...)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _members(directory: Path) -> set[int]:
    try:
        return {int(pid) for pid in (directory / "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()


def _kill_members(directory: Path) -> None:
    """SIGKILLs every member without ever signalling a recycled pid: each pid is pinned by a
    pidfd first, and signalled only if it is still a member after pinning."""
    pinned = {}
    try:
        for pid in _members(directory):
            try:
                pinned[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
        if not pinned:
            return
        still = _members(directory)
        for pid, fd in pinned.items():
            if pid in still:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        for fd in pinned.values():
            os.close(fd)


@dataclass
class TaskCgroup:
    name: str
    pids_dir: Path | None
    memory_dir: Path | None
    memory_version: int = 1
    # Set once kill() has seen no member left: with pids.max at 0 nothing can join again, so a
    # later kill() (the run's cleanup after the watch already killed) has nothing to do.
    emptied: bool = False

    @property
    def directories(self) -> list[Path]:
        unique = []
        for d in (self.pids_dir, self.memory_dir):
            if d is not None and d not in unique:
                unique.append(d)
        return unique

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.directories]

    def members(self) -> set[int]:
        found: set[int] = set()
        for d in self.directories:
            found |= _members(d)
        return found

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this cgroup for exceeding its limit."""
        if self.memory_dir is None:
            return 0
        if self.memory_version == 1:
            return _read_counter(self.memory_dir / "memory.oom_control", "oom_kill")
        return _read_counter(self.memory_dir / "memory.events", "oom_kill")

    def fork_refusals(self) -> int:
        """Forks/clones the pids controller refused because pids.max was reached."""
        if self.pids_dir is None:
            return 0
        return _read_counter(self.pids_dir / "pids.events", "max")

    def kill(self) -> None:
        """SIGKILLs every process of the task, including ones that left its process group."""
        if self.emptied:
            return
        deadline = time.monotonic() + _SETTLE_S
        frozen = False
        if self.pids_dir is not None:
            # No new members from here on: a fork bomb cannot outrun the kill loop.
            try:
                _write(self.pids_dir / "pids.max", "0")
                frozen = True
            except OSError:
                pass
        for d in self.directories:
            kill_file = d / "cgroup.kill"  # v2, Linux 5.14+: atomic, no pid races at all
            if kill_file.exists():
                try:
                    _write(kill_file, "1")
                except OSError:
                    pass
        while True:
            for d in self.directories:
                _kill_members(d)
            if not self.members():
                self.emptied = frozen
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)

    def remove(self) -> None:
        """Deletes the task's cgroup directories (after kill(); members must have exited)."""
        deadline = time.monotonic() + _SETTLE_S
        for d in self.directories:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY: a killed member has not finished exiting yet.
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.warning("cannot remove task cgroup %s: %s (members: %s)", d, e, sorted(_members(d)))
                        break
                    _kill_members(d)
                    time.sleep(0.01)


@dataclass
class CgroupSupport:
    """Where this worker can create task cgroups, per controller; None when it cannot, with
    the reason in ``problems``."""

    pids_parent: Path | None = None
    pids_version: int = 0
    memory_parent: Path | None = None
    memory_version: int = 0
    problems: dict[str, str] = field(default_factory=dict)

    @classmethod
    def probe(cls) -> CgroupSupport:
        support = cls()
        try:
            mounts, own = _mounts(), _own_cgroups()
        except OSError as e:
            support.problems["pids"] = support.problems["memory"] = f"cannot read /proc/self cgroup data: {e}"
            return support
        for controller in ("pids", "memory"):
            try:
                parent, version = _prepare(controller, mounts, own)
            except _NoCgroup as e:
                support.problems[controller] = str(e)
                continue
            setattr(support, f"{controller}_parent", parent)
            setattr(support, f"{controller}_version", version)
            _sweep_orphans(parent)
        return support

    def describe(self) -> dict:
        return {
            "pids": f"cgroup v{self.pids_version} {self.pids_parent}" if self.pids_parent else None,
            "memory": f"cgroup v{self.memory_version} {self.memory_parent}" if self.memory_parent else None,
            "problems": dict(self.problems),
        }

    def create(self, *, processes: int | None, memory_bytes: int | None) -> TaskCgroup | None:
        """A fresh task cgroup with its limits set, or None when this worker has no pids
        cgroup to track tasks with (the caller decides whether that is acceptable)."""
        if self.pids_parent is None:
            return None
        name = f"{_TASK_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        pids_dir = self.pids_parent / name
        memory_dir = None
        if memory_bytes is not None and self.memory_parent is not None:
            memory_dir = self.memory_parent / name
        task = TaskCgroup(name, pids_dir, memory_dir, self.memory_version)
        try:
            for d in task.directories:
                d.mkdir()
            _write(pids_dir / "pids.max", str(processes) if processes is not None else "max")
            if memory_dir is not None:
                if self.memory_version == 1:
                    _write(memory_dir / "memory.limit_in_bytes", str(memory_bytes))
                    # Without this a task could page out to swap past its limit (the file
                    # exists only when the kernel accounts swap).
                    if (memory_dir / "memory.memsw.limit_in_bytes").exists():
                        _write(memory_dir / "memory.memsw.limit_in_bytes", str(memory_bytes))
                else:
                    _write(memory_dir / "memory.max", str(memory_bytes))
                    if (memory_dir / "memory.swap.max").exists():
                        _write(memory_dir / "memory.swap.max", "0")
        except OSError:
            task.remove()
            raise
        return task


class _NoCgroup(Exception):
    pass


def _prepare(controller: str, mounts: list[_Mount], own: dict[str, str]) -> tuple[Path, int]:
    """The directory task cgroups for ``controller`` go in (created if needed), and the
    hierarchy's version. A controller bound to a v1 hierarchy is not available in v2."""
    for mount in mounts:
        if mount.version == 1 and controller in mount.controllers:
            if controller not in own:
                raise _NoCgroup(f"{controller}: this process has no cgroup in {mount.path}")
            parent = _inside(mount, own[controller]) / PARENT_NAME
            try:
                parent.mkdir(exist_ok=True)
            except OSError as e:
                raise _NoCgroup(f"{controller}: cannot create {parent}: {e.strerror}; run the worker as root or give it a delegated cgroup") from None
            return parent, 1
    unified = [m for m in mounts if m.version == 2]
    if not unified or "" not in own:
        raise _NoCgroup(f"{controller}: no cgroup hierarchy offers the {controller} controller")
    mount = unified[0]
    base = _inside(mount, own[""])
    try:
        available = (base / "cgroup.controllers").read_text().split()
    except OSError as e:
        raise _NoCgroup(f"{controller}: cannot read {base}/cgroup.controllers: {e.strerror}") from None
    if controller not in available:
        raise _NoCgroup(f"{controller}: the controller is not enabled for {base} (cgroup v2)")
    parent = base / PARENT_NAME
    try:
        # cgroup v2 lets a cgroup hand controllers to its children only while it has no
        # processes of its own (except the root): a worker sitting in its own cgroup gets
        # EBUSY here and needs a delegated, empty subtree (systemd: Delegate=yes).
        _write(base / "cgroup.subtree_control", f"+{controller}")
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", f"+{controller}")
    except OSError as e:
        raise _NoCgroup(
            f"{controller}: cannot enable the controller below {base} (cgroup v2): {e.strerror}; "
            "run the worker in a delegated cgroup whose own processes live in a leaf child "
            "(systemd: Delegate=yes)"
        ) from None
    return parent, 2


def _sweep_orphans(parent: Path) -> None:
    """Kills and removes task cgroups left by a worker that died without cleaning up (its pid
    is in the name): their processes would otherwise run on unsupervised."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.is_dir() or not entry.name.startswith(_TASK_PREFIX):
            continue
        try:
            owner = int(entry.name[len(_TASK_PREFIX):].split("-", 1)[0])
            os.kill(owner, 0)
            continue  # its worker is alive
        except ValueError:
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        stale = TaskCgroup(entry.name, entry, None)
        log.warning("removing task cgroup %s left by worker process %s, which is gone", entry, owner)
        stale.kill()
        stale.remove()
