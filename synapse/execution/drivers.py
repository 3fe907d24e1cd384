"""The drivers that run one task: `ProcessDriver` (a plain process under rlimits and a task
cgroup), `BwrapDriver` (the same inside a bubblewrap sandbox) and `ContainerDriver` (a
Docker container), and `choose_driver`. They share the supervisor (supervisor.py) and differ
in the command line the launcher executes and in what they check first; DESIGN.md says what
each one enforces and how."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from functools import lru_cache

from synapse.execution import entry as entry_runner
from synapse.execution.sandbox import (
    ENTRY_SPEC_FILE,
    STAGED_INIT_FILE,
    Driver,
    Job,
    REASONS,
    STAGED_RUNNER_FILE,
    SandboxUnavailable,
    Outcome,
    task_environment,
)
from synapse.execution.supervisor import LAUNCHER_ENV, NOBODY, Supervisor, unreachable_part, unsearchable

log = logging.getLogger(__name__)


class ProcessDriver(Supervisor):
    """The task as a plain process of this machine: its own session and process group, a
    fresh working directory, a scrubbed environment, rlimits, a task cgroup for processes
    and memory, and (when the worker is root) the unprivileged uid ``task_user``. It shares
    the file system, the network and the pid space with the worker: it confines resource
    use, it is not an isolation boundary (DESIGN.md)."""

    name = "process"

    def isolation(self) -> dict:
        return {
            "driver": self.name,
            "namespaces": [],
            "filesystem": "host file system with the task uid's permissions; fresh working directory",
            "network": "host network",
            "task_uid": self.task_uid(),
            "limits": self._limit_mechanisms(),
            "grants_enforced": {"network": False, "read_paths": False, "write_paths": False},
            "cgroups": self.cgroups.describe(),
            "entry_python": {"path": self.entry_python, "why": self.entry_python_note},
        }


# --unshare-all: user, ipc, pid, net, uts and cgroup namespaces (plus the mount namespace
# every bwrap sandbox has). Nothing of the host is writable but what is bound with --bind.
_BWRAP_BASE = [
    "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
    "--die-with-parent", "--new-session",
    "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
]


@lru_cache(maxsize=None)
def _bwrap_probe(bwrap: str, identity: tuple[int, int] | None) -> str | None:
    """Why bwrap cannot build its sandbox as the task uid here, or None when it can. Run once
    per worker: the answer depends on the kernel's user-namespace settings, not the job."""
    kwargs = {}
    if identity is not None:
        kwargs = {"user": identity[0], "group": identity[1], "extra_groups": []}
    try:
        done = subprocess.run(
            [bwrap, *_BWRAP_BASE, "--", "true"], capture_output=True, timeout=30,
            env=LAUNCHER_ENV, cwd="/", **kwargs,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if done.returncode != 0:
        return done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
    return None


def _hidden_by_tmpfs(uid: int, gid: int) -> list[str]:
    """Paths of the worker's Python (interpreter, stdlib, site-packages, this package) that
    live under /tmp, which the sandbox replaces with an empty tmpfs: they are bound back
    read-only so entry points can still start there — those the task uid can reach (bwrap
    runs as that uid and cannot bind the others; the task could not read them anyway)."""
    candidates = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)),
                  os.path.dirname(os.path.abspath(entry_runner.__file__)), *[p for p in sys.path if p]}
    return sorted(p for p in candidates if (p == "/tmp" or p.startswith("/tmp/")) and os.path.exists(p)
                  and unsearchable(p, uid, gid) is None)


class BwrapDriver(Supervisor):
    """The process driver's confinement, inside a bubblewrap sandbox: new user, pid, network,
    ipc, uts, cgroup and mount namespaces; the root file system read-only, a private /tmp,
    /dev and /proc; only the working directory and grants.write_paths writable; no network
    unless grants.network; no capabilities and no further user namespaces."""

    name = "bwrap"
    # bwrap's monitor process and the pid namespace's init (the launcher binary's init) are in the
    # task's cgroup too: pids.max is limits.processes + 2 so the task gets what it asked for.
    pid_overhead = 2
    wraps_command = True
    passes_report = True

    def __init__(self, *, bwrap: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        found = bwrap or shutil.which("bwrap")
        if found is None or not os.access(found, os.X_OK):
            raise SandboxUnavailable(self.name, "bubblewrap is not installed; install bubblewrap: apt-get install bubblewrap")
        self.bwrap = found
        # The sandbox's init is the launcher binary, run inside as the task uid: from where it
        # was built when that uid can reach it, else from a copy in each working directory.
        task_ids = self.identity or (os.geteuid(), os.getegid())
        self.stage_init = unreachable_part(self.launcher, *task_ids) is not None
        # Once per driver, not per task (realpath and permission walks: ~5% of a worker's
        # time per trivial task): the worker's Python does not move while it runs.
        self.python_binds = _hidden_by_tmpfs(*task_ids)
        problem = _bwrap_probe(self.bwrap, self.identity)
        if problem is not None:
            raise SandboxUnavailable(
                self.name,
                f"bwrap cannot create its sandbox as uid {self.task_uid()}: {problem}. It needs unprivileged "
                "user namespaces: sysctl user.max_user_namespaces=10000 (and, where they exist, "
                "kernel.unprivileged_userns_clone=1, kernel.apparmor_restrict_unprivileged_userns=0); "
                "or use the process driver",
            )

    def isolation(self) -> dict:
        return {
            "driver": self.name,
            "namespaces": ["user", "mount", "pid", "net", "ipc", "uts", "cgroup"],
            "filesystem": "root read-only; private /tmp, /dev, /proc; writable: working directory, grants.write_paths",
            "network": "none (loopback only) unless grants.network",
            "task_uid": self.task_uid(),
            "capabilities": "none; no nested user namespaces",
            "limits": self._limit_mechanisms(),
            "grants_enforced": {"network": True, "read_paths": False, "write_paths": True},
            "cgroups": self.cgroups.describe(),
            "entry_python": {"path": self.entry_python, "why": self.entry_python_note},
        }

    def _task_argv(self, job: Job, workdir: str, task_name: str, report_fd: int) -> list[str]:
        argv = [self.bwrap, *_BWRAP_BASE, "--as-pid-1"]
        if job.grants.network:
            argv.append("--share-net")
        for path in self.python_binds:
            argv += ["--ro-bind", path, path]
        # After --tmpfs /tmp, so grants under /tmp are visible; read before write, so a
        # writable grant inside a readable one stays writable.
        for path in job.grants.read_paths:
            argv += ["--ro-bind", path, path]
        for path in job.grants.write_paths:
            argv += ["--bind", path, path]
        argv += ["--bind", workdir, workdir, "--chdir", workdir, "--"]
        init = [os.path.join(workdir, STAGED_INIT_FILE) if self.stage_init else self.launcher, "init", str(report_fd)]
        return argv + init + super()._task_argv(job, workdir, task_name, report_fd)

    def _staged(self, job: Job) -> list[tuple[str, str]]:
        return super()._staged(job) + ([(self.launcher, STAGED_INIT_FILE)] if self.stage_init else [])

    def _decode_exit(self, exit_code, sig, stderr):
        # Only used when the sandbox's init never reported the command's status: bwrap could
        # not build the sandbox (exit 1, its message last on stderr), or init itself was
        # killed (exit 128 + n, as bwrap reports a child's death by signal n).
        if sig is not None or exit_code is None:
            return exit_code, sig, None
        lines = stderr.rstrip().splitlines()
        if exit_code == 1 and lines and lines[-1].startswith(b"bwrap: "):
            return None, None, lines[-1].decode(errors="replace")
        if 128 < exit_code <= 128 + 64:
            return None, exit_code - 128, None
        return exit_code, sig, None


# The task image when none is given: SYNAPSE_TASK_IMAGE (docker mode's worker sets it to the
# synapse image it runs from), else the synapse image scripts/docker-build makes.
TASK_IMAGE_ENV = "SYNAPSE_TASK_IMAGE"
DEFAULT_TASK_IMAGE = "synapse:latest"


class ContainerDriver(Supervisor):
    """The task in a Docker container (``docker run``): its own namespaces and cgroup from
    the engine, a read-only image file system with the working directory mounted at /work,
    no network unless granted, memory/pids/CPU-time limits by the engine. Needs a reachable
    Docker engine and the task image present in it (never pulled); entry points need a
    Python in the image (the synapse image has one)."""

    name = "container"
    limits_processes_elsewhere = True  # docker --pids-limit
    wraps_command = True
    workdir_in_container = "/work"

    def __init__(self, *, image: str | None = None, docker: str = "docker", **kwargs) -> None:
        # The docker client is the supervised process; the engine's cgroups confine the task.
        super().__init__(use_cgroups=False, **kwargs)
        image = image or os.environ.get(TASK_IMAGE_ENV) or DEFAULT_TASK_IMAGE
        self.entry_python, self.entry_python_note = "python3", f"python3 in the image {image}"
        # The runner goes into each working directory: its path in the worker means nothing
        # to the engine, which resolves bind mounts on its own host (a worker in a container).
        self.stage_runner = True
        # The launcher must not drop the docker client to the task uid (it could not reach the
        # engine's socket): the container runs as NOBODY by --user; the working directory is
        # given to NOBODY in _populate and write grants are checked for NOBODY in _check.
        self.task_owner, self.identity = self.identity, None
        self._ended = threading.local()
        found = shutil.which(docker)
        if found is None:
            raise SandboxUnavailable(self.name, f"the docker client {docker!r} is not installed; install docker.io (apt-get install docker.io) or use the bwrap driver")
        self.docker, self.image = found, image
        try:
            done = subprocess.run([found, "version", "--format", "{{.Server.Version}}"], capture_output=True, timeout=15)
            problem = None if done.returncode == 0 else done.stderr.decode(errors="replace").strip()
        except subprocess.TimeoutExpired:
            problem = "`docker version` did not answer within 15 s"
        if problem is not None:
            raise SandboxUnavailable(
                self.name,
                f"no Docker engine is reachable ({problem}); start one (systemctl start docker), point "
                "DOCKER_HOST at one, or use the bwrap or process driver",
            )
        # `docker run` pulls a missing image; an engine with no registry (or none reachable)
        # then fails every task only after the pull times out. An image the engine lacks is a
        # driver that cannot run here, so "auto" goes on to the next one.
        try:
            found_image = subprocess.run([found, "image", "inspect", "--format", "{{.Id}}", image],
                                         capture_output=True, timeout=15).returncode == 0
        except subprocess.TimeoutExpired:
            found_image = False
        if not found_image:
            raise SandboxUnavailable(
                self.name,
                f"the Docker engine has no image {image!r} (tasks are never run from an image pulled "
                f"at run time); build it (./scripts/docker-build) or load it (docker load), name another "
                f"with {TASK_IMAGE_ENV}, or use the bwrap or process driver",
            )

    def isolation(self) -> dict:
        return {
            "driver": self.name,
            "image": self.image,
            "namespaces": ["mount", "pid", "net", "ipc", "uts"],
            "filesystem": f"image read-only; writable: {self.workdir_in_container} (the working directory), grants.write_paths, a /tmp tmpfs",
            "network": "none unless grants.network (then the default bridge)",
            "task_uid": NOBODY,
            "capabilities": "none (--cap-drop ALL, no-new-privileges)",
            "limits": {
                "cpu_s": "docker --ulimit cpu", "memory_bytes": "docker --memory (engine cgroup, swap included) + RLIMIT_AS (sh ulimit -v)",
                "processes": "docker --pids-limit", "file_bytes": "docker --ulimit fsize",
                "wall_s": "supervisor: docker kill", "output_bytes": "supervisor: bounded capture, docker kill",
                "result_bytes": "supervisor: bounded read of the entry point's result",
            },
            "usage": "the docker client's, not the task's",
            "grants_enforced": {"network": True, "read_paths": True, "write_paths": True},
        }

    def task_ids(self) -> tuple[int, int]:
        return NOBODY, NOBODY  # --user, whatever the worker's own uid

    def _task_env(self, job: Job, workdir: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

    def _rlimits(self, job: Job) -> list[tuple[str, int, int]]:
        return []  # the limits go to the container (_task_argv), not to the docker client

    def _task_argv(self, job: Job, workdir: str, task_name: str, report_fd: int) -> list[str]:
        limits, grants = job.limits, job.grants
        # No --rm: the container is inspected (was it OOM-killed?) and removed in _stop.
        argv = [
            self.docker, "run", "--name", task_name, "--init", "--label", "org.synapse.task=1",
            "--network", "bridge" if grants.network else "none",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--user", f"{NOBODY}:{NOBODY}", "--ulimit", "core=0:0",
            # docker's --init is pid 1, not the image's own entrypoint (a second tini).
            "--entrypoint", "",
            "-v", f"{workdir}:{self.workdir_in_container}", "-w", self.workdir_in_container,
        ]
        for key, value in task_environment(job, self.workdir_in_container).items():
            argv += ["-e", f"{key}={value}"]
        if limits.memory_bytes is not None:
            argv += ["--memory", str(limits.memory_bytes), "--memory-swap", str(limits.memory_bytes)]
        if limits.processes is not None:
            argv += ["--pids-limit", str(limits.processes + 1)]  # + docker's --init
        if limits.cpu_s is not None:
            soft = max(1, math.ceil(limits.cpu_s))
            argv += ["--ulimit", f"cpu={soft}:{soft + 1}"]
        if limits.file_bytes is not None:
            argv += ["--ulimit", f"fsize={limits.file_bytes}:{limits.file_bytes}"]
        for path in grants.read_paths:
            argv += ["-v", f"{path}:{path}:ro"]
        for path in grants.write_paths:
            argv += ["-v", f"{path}:{path}"]
        command = list(job.argv) if job.argv is not None else \
            ["python3", "-I", f"{self.workdir_in_container}/{STAGED_RUNNER_FILE}", ENTRY_SPEC_FILE]
        if limits.memory_bytes is not None:
            # RLIMIT_AS per process, as the other drivers set it (a Python task gets MemoryError
            # rather than the OOM killer), set by the image's sh just before the command: docker
            # has no --ulimit as, and a --ulimit data applies to runc's own init in the
            # container too, which then cannot start under small limits (64 MiB).
            command = ["sh", "-c", f'ulimit -v {limits.memory_bytes // 1024} && exec "$@"', "sh", *command]
        return argv + [self.image, *command]

    def _import_path(self) -> list[str]:
        return []  # the worker's paths do not exist in the image

    def _populate(self, job: Job, workdir: str) -> None:
        super()._populate(job, workdir)
        # The container runs as NOBODY whatever the worker's uid; without root the working
        # directory cannot be given to it, only opened to everyone.
        if self.task_owner is not None:
            for root, dirs, files in os.walk(workdir):
                for path in [root, *(os.path.join(root, n) for n in dirs + files)]:
                    os.lchown(path, *self.task_owner)
        else:
            os.chmod(workdir, 0o777)

    def _stop(self, task_name: str) -> None:
        # Killing the client does not stop the container: ask the engine; then note whether
        # the kernel's OOM killer ended it (the engine's memory cgroup, which the worker does
        # not see) and remove it.
        subprocess.run([self.docker, "kill", task_name], capture_output=True, timeout=30)
        done = subprocess.run([self.docker, "inspect", "--format", "{{.State.OOMKilled}}", task_name],
                              capture_output=True, timeout=30)
        self._ended.oom_killed = done.stdout.strip() == b"true"
        subprocess.run([self.docker, "rm", "--force", task_name], capture_output=True, timeout=60)

    def _watch(self, job: Job, *args, **kwargs) -> Outcome:
        self._ended.oom_killed = False
        outcome = super()._watch(job, *args, **kwargs)
        # As the memory cgroup's OOM count does for the other drivers: whatever the task made of
        # losing a process (a shell's `wait` still exits 0), the limit is what ended it.
        if self._ended.oom_killed and outcome.reason not in ("cancelled", "wall_time", "output_limit", "spawn_error"):
            outcome.status, outcome.reason = REASONS["memory_limit"], "memory_limit"
            outcome.detail = f"the task used more than limits.memory_bytes={job.limits.memory_bytes}; the kernel killed it"
        return outcome

    def _decode_exit(self, exit_code, sig, stderr):
        # `docker run` exits 125 when the engine could not create the container, 126/127 when
        # the command could not be run in it, and 128 + n when the command died of signal n.
        if exit_code == 125:
            lines = stderr.decode(errors="replace").strip().splitlines()
            return None, None, lines[-1] if lines else "docker run could not create the container"
        if exit_code in (126, 127):
            said = [line for line in stderr.decode(errors="replace").splitlines() if line.startswith("docker: ")]
            # docker-init (tini, --init) says so when it cannot exec the command; so does sh
            # when it runs the command (under a memory limit).
            said += [line for line in stderr.decode(errors="replace").splitlines()[-1:]
                     if line.startswith("[FATAL tini") or re.match(r"sh: \d+: exec: .*: (not found|Permission denied)$", line)]
            if said:
                return None, None, f"{said[-1]} (the task's PATH is /usr/local/bin:/usr/bin:/bin in the image {self.image})"
        if exit_code is not None and 128 < exit_code <= 128 + 64:
            return None, exit_code - 128, None
        return exit_code, sig, None


_DRIVERS = {"process": ProcessDriver, "bwrap": BwrapDriver, "container": ContainerDriver}


def choose_driver(name: str = "auto", **options) -> Driver:
    """The driver called ``name``: "process", "bwrap", "container", or "auto" (containers when
    SYNAPSE_TASK_IMAGE names an image a reachable Docker engine has, else bwrap when it works
    here, else process). Raises
    SandboxUnavailable, naming the fix, when the named driver cannot run on this machine;
    ``options`` go to the driver's constructor."""
    if name == "auto":
        # Containers only where a task image is named (docker mode sets SYNAPSE_TASK_IMAGE):
        # a machine that merely has an engine keeps local mode's bubblewrap sandbox, and its
        # entry points keep importing the worker's packages.
        for driver in ((ContainerDriver, BwrapDriver) if os.environ.get(TASK_IMAGE_ENV) else (BwrapDriver,)):
            try:
                return driver(**options)
            except SandboxUnavailable as e:
                log.info("sandbox: %s unavailable (%s)", driver.name, e)
        log.info("sandbox: using the process driver")
        return ProcessDriver(**options)
    if name not in _DRIVERS:
        raise ValueError(f"unknown sandbox driver {name!r}; choose one of auto, {', '.join(_DRIVERS)}")
    return _DRIVERS[name](**options)
