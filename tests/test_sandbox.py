"""The task sandbox (synapse/execution), with real processes: every test runs real commands
and entry points under each driver this machine can run (process, and bwrap when bubblewrap
works here), and checks what the task could and could not do, and that nothing of it is
left afterwards (processes, cgroups, working directories).

Limits are shown by tasks that hit them: a CPU loop, a memory hog, a bounded fork loop
(never an unbounded fork bomb: if the limit were not enforced, the test must not take the
machine down), an output flood, a command that ignores SIGTERM and leaves a detached
grandchild. The container driver needs a Docker engine: where none is reachable, a test
checks that it says so (tests/test_container_driver.py runs it against one). About 20 s."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from synapse.execution import (
    BwrapDriver,
    ContainerDriver,
    Grants,
    Job,
    JobError,
    Limits,
    ProcessDriver,
    SandboxUnavailable,
    choose_driver,
)
from synapse.execution.cgroups import CgroupSupport
import synapse
from synapse.execution.supervisor import NOBODY, cgroup_support, unsearchable

IS_ROOT = os.geteuid() == 0
MiB = 1 << 20


def _bwrap_unavailable() -> str | None:
    try:
        BwrapDriver()
    except SandboxUnavailable as e:
        return str(e)
    return None


BWRAP_PROBLEM = _bwrap_unavailable()
DRIVERS = [
    "process",
    pytest.param("bwrap", marks=pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=f"bubblewrap cannot run here: {BWRAP_PROBLEM}")),
]
CGROUPS = cgroup_support()
needs_pids_cgroup = pytest.mark.skipif(
    CGROUPS.pids_parent is None, reason=f"no pids cgroup for this worker: {CGROUPS.problems.get('pids')}"
)
# Entry points import the worker's packages only where the task uid can read them (not from a
# checkout under a private directory; the sandbox's own runner is copied in either way).
_PACKAGES_BLOCKED = unsearchable(os.path.dirname(synapse.__file__), NOBODY, NOBODY) if os.geteuid() == 0 else None
needs_readable_packages = pytest.mark.skipif(
    _PACKAGES_BLOCKED is not None, reason=f"uid {NOBODY} cannot read the worker's packages ({_PACKAGES_BLOCKED})"
)
needs_memory_cgroup = pytest.mark.skipif(
    CGROUPS.memory_parent is None, reason=f"no memory cgroup for this worker: {CGROUPS.problems.get('memory')}"
)


@pytest.fixture(scope="module")
def workdir_root():
    # Outside pytest's tmp dirs, which are private to root (0700): the task uid must be able
    # to reach its working directory by its absolute path ($HOME).
    root = tempfile.mkdtemp(prefix="synapse-sandbox-test-")
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root)


@pytest.fixture(params=DRIVERS)
def driver(request, workdir_root):
    d = choose_driver(request.param, workdir_root=workdir_root)
    yield d
    # Whatever the test did, the run left nothing behind.
    assert os.listdir(workdir_root) == [], "a task's working directory was not removed"
    assert _my_task_cgroups() == [], "a task cgroup was not removed"


def _my_task_cgroups() -> list[str]:
    found = []
    for parent in (CGROUPS.pids_parent, CGROUPS.memory_parent):
        if parent is not None:
            found += [p.name for p in parent.iterdir() if p.name.startswith(f"task-{os.getpid()}-")]
    return found


def _marker() -> str:
    """Digits no other process's command line contains (sleep accepts 300.<digits>)."""
    return str(random.randrange(10**11, 10**12))


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def python(code: str, **kwargs) -> Job:
    return Job(argv=("python3", "-c", code), **kwargs)


# -- commands -----------------------------------------------------------------------------


def test_command_reports_exit_output_hash_and_usage(driver):
    starts = []
    o = driver.run(Job(argv=("sh", "-c", "printf 'hello\\n'; printf 'warn' >&2")), on_start=starts.append)
    assert (o.status, o.reason, o.exit_code, o.signal) == ("succeeded", "ok", 0, None)
    assert (o.stdout, o.stderr) == (b"hello\n", b"warn")
    assert not o.stdout_truncated and not o.stderr_truncated
    expected = hashlib.sha256(hashlib.sha256(b"hello\n").digest() + hashlib.sha256(b"warn").digest()).hexdigest()
    assert o.output_hash == expected
    assert set(o.usage) == {"cpu_user_s", "cpu_sys_s", "max_rss_kb", "wall_s"}
    assert o.usage["max_rss_kb"] > 0 and o.usage["wall_s"] > 0
    assert starts == [o.started_at]
    assert o.driver == driver.name and o.result is None


def test_peak_memory_is_the_tasks_own_not_the_workers(driver):
    # Linux carries a process's peak RSS across exec: a task forked straight from a big
    # worker would report the worker's size.
    ballast = b"w" * (300 * MiB)
    o = driver.run(Job(argv=("true",)))
    assert o.ok and 0 < o.usage["max_rss_kb"] < 100 * 1024
    o = driver.run(python("x = b'y' * (150 << 20)"))
    assert o.ok and 150 * 1024 < o.usage["max_rss_kb"] < 250 * 1024
    del ballast


def test_same_output_same_hash_across_drivers_and_runs(driver, workdir_root):
    job = Job(argv=("sh", "-c", "seq 1 1000; echo done >&2"))
    other = ProcessDriver(workdir_root=workdir_root)
    assert driver.run(job).output_hash == driver.run(job).output_hash == other.run(job).output_hash


def test_nonzero_exit_fails(driver):
    o = driver.run(Job(argv=("sh", "-c", "echo oops >&2; exit 3")))
    assert (o.status, o.reason, o.exit_code) == ("failed", "exit_code", 3)
    assert o.stderr == b"oops\n"


def test_missing_command_is_a_spawn_error(driver):
    o = driver.run(Job(argv=("no-such-program-here",)))
    assert (o.status, o.reason, o.exit_code) == ("failed", "spawn_error", None)
    assert "no-such-program-here" in o.detail and "PATH" in o.detail


def test_task_runs_unprivileged_in_its_own_working_directory(driver):
    o = driver.run(Job(argv=("sh", "-c", "id -u; pwd; cat data/in.txt; touch made-here"), files={"data/in.txt": b"input"}))
    uid, cwd, content = o.stdout.decode().splitlines()
    assert o.ok
    assert int(uid) == (NOBODY if IS_ROOT else os.geteuid())
    assert os.path.basename(cwd).startswith("synapse-task-") and content == "input"


def test_environment_is_scrubbed(driver, monkeypatch):
    monkeypatch.setenv("SYNAPSE_WORKER_SECRET", "do-not-leak")
    o = driver.run(Job(argv=("env",), env={"GREETING": "hi"}))
    env = dict(line.split("=", 1) for line in o.stdout.decode().splitlines())
    assert "SYNAPSE_WORKER_SECRET" not in env
    assert env["GREETING"] == "hi" and env["LANG"] == "C.UTF-8"
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["HOME"] == env["TMPDIR"] and os.path.basename(env["HOME"]).startswith("synapse-task-")
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "GREETING", "PWD", "SHLVL", "_"}


# -- entry points -------------------------------------------------------------------------

MODULE = b"""

def add(a, b):
    return {"sum": a + b}

def greet(name, punctuation="!"):
    return "hello " + name + punctuation

def boom():
    raise ValueError("bad input 42")

def not_json():
    return {1, 2}

def uses_synapse():
    import synapse.execution.sandbox as sandbox
    return sandbox.RESULT_FILE

def hog():
    return len(bytearray(1 << 30))

def write_big(n):
    with open("big.bin", "wb") as f:
        f.write(b"x" * n)
"""


def entry(function: str, args=None, **kwargs) -> Job:
    return Job(entry=f"tasks.{function}", args=args, files={"tasks/__init__.py": b"", "tasks/work.py": MODULE}, **kwargs)


def test_entry_point_returns_json(driver):
    o = driver.run(Job(entry="tasks.work:add", args=[2, 3], files={"tasks/__init__.py": b"", "tasks/work.py": MODULE}))
    assert (o.status, o.reason, o.result) == ("succeeded", "ok", {"sum": 5})
    o = driver.run(Job(entry="tasks.work:greet", args={"name": "ada", "punctuation": "?"}, files={"tasks/__init__.py": b"", "tasks/work.py": MODULE}))
    assert o.result == "hello ada?"


def test_entry_point_in_a_top_level_input_file(driver):
    o = driver.run(Job(entry="mymod:f", args="x", files={"mymod.py": b"def f(v):\n    return [v, v]\n"}))
    assert (o.status, o.result) == ("succeeded", ["x", "x"])


@needs_readable_packages
def test_entry_point_can_import_the_worker_packages(driver):
    o = driver.run(entry("work:uses_synapse"))
    assert (o.status, o.result) == ("succeeded", ".synapse-result.json"), o.stderr


def test_entry_point_exception_fails_with_traceback(driver):
    o = driver.run(entry("work:boom"))
    assert (o.status, o.reason, o.result) == ("failed", "exception", None)
    assert b"Traceback" in o.stderr and b"ValueError: bad input 42" in o.stderr
    assert "ValueError" in o.detail


def test_entry_point_non_json_result_fails(driver):
    o = driver.run(entry("work:not_json"))
    assert (o.status, o.reason) == ("failed", "result_not_json")
    assert "set" in o.detail


def test_entry_point_result_limit_and_missing_result(driver):
    files = {"big.py": b"def f():\n    return 'x' * 5000\n",
             "quits.py": b"import os\ndef f():\n    os._exit(0)\n",
             "exits.py": b"import sys\ndef f():\n    sys.exit(4)\n"}
    o = driver.run(Job(entry="big:f", files=files, limits=Limits(result_bytes=1000)))
    assert (o.status, o.reason) == ("failed", "result_limit")
    o = driver.run(Job(entry="quits:f", files=files))
    assert (o.status, o.reason, o.exit_code) == ("failed", "no_result", 0)
    o = driver.run(Job(entry="exits:f", files=files))
    assert (o.status, o.reason, o.exit_code) == ("failed", "exit_code", 4)


def test_entry_point_cannot_make_the_worker_read_other_files(driver):
    # The task plants its result file as a symlink to a file only the worker may read.
    secret = tempfile.NamedTemporaryFile(prefix="synapse-sandbox-secret-", dir="/var/tmp")
    secret.write(b'"worker secret"')
    secret.flush()
    code = f"import os\ndef f():\n    os.symlink({secret.name!r}, '.synapse-result.json')\n    os._exit(0)\n"
    with secret:
        o = driver.run(Job(entry="planter:f", files={"planter.py": code.encode()}))
    assert (o.status, o.reason, o.result) == ("failed", "no_result", None)


def test_entry_point_missing_function_fails(driver):
    o = driver.run(entry("work:nope"))
    assert (o.status, o.reason) == ("failed", "exception")
    assert b"AttributeError" in o.stderr


# -- limits -------------------------------------------------------------------------------


def test_cpu_limit(driver):
    o = driver.run(python("while True: pass", limits=Limits(cpu_s=1, wall_s=30)))
    assert (o.status, o.reason) == ("failed", "cpu_limit"), (o, o.stderr)
    assert o.signal is not None
    # The CPU it used is reported, but not to the tick: the kernel stops it on tick-sampled
    # CPU time, rusage reports the scheduler's precise time — lower when other processes share
    # the CPU (0.88 s for this 1 s limit once, with both cores loaded by a chaos campaign).
    assert o.usage["cpu_user_s"] + o.usage["cpu_sys_s"] > 0


def test_memory_limit_python_command(driver):
    o = driver.run(python("x = bytearray(1 << 30)", limits=Limits(memory_bytes=256 * MiB)))
    assert (o.status, o.reason, o.exit_code) == ("failed", "memory_limit", 1)
    assert b"MemoryError" in o.stderr


def test_memory_limit_entry_point(driver):
    o = driver.run(entry("work:hog", limits=Limits(memory_bytes=256 * MiB)))
    assert (o.status, o.reason) == ("failed", "memory_limit")


@needs_memory_cgroup
def test_memory_limit_whole_task(driver):
    # Three processes of 100 MiB each: each is under RLIMIT_AS, together they are over the
    # task's 256 MiB, which only the memory cgroup sees.
    hog = "import time; x = b'x' * (100 << 20); time.sleep(3)"
    script = f"for i in 1 2 3; do python3 -c \"{hog}\" & done; wait"
    o = driver.run(Job(argv=("sh", "-c", script), limits=Limits(memory_bytes=256 * MiB, wall_s=30)))
    assert (o.status, o.reason) == ("failed", "memory_limit"), (o, o.stderr)


def test_file_size_limit(driver):
    o = driver.run(Job(argv=("sh", "-c", "exec head -c 3000000 /dev/zero > big.bin"), limits=Limits(file_bytes=MiB)))
    assert (o.status, o.reason) == ("failed", "file_limit"), o
    o = driver.run(entry("work:write_big", args=[3 * MiB], limits=Limits(file_bytes=MiB)))
    assert (o.status, o.reason) == ("failed", "file_limit"), o


@needs_pids_cgroup
def test_fork_loop_is_contained_and_cleaned_up(driver):
    marker = _marker()
    # Bounded on purpose: 200 forks at most, each child sleeps; were the limit not enforced
    # this would still leave the machine fine.
    code = f"""
import os, sys, time
made = refused = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        time.sleep(60)  # {marker}
        os._exit(0)
    made += 1
print(made, refused, flush=True)
sys.exit(1 if refused else 0)
"""
    o = driver.run(python(code, limits=Limits(processes=20, wall_s=30)))
    made, refused = map(int, o.stdout.split())
    assert made <= 19 and refused >= 181  # 20 processes: the python parent and 19 children
    assert (o.status, o.reason) == ("failed", "process_limit")
    assert _processes_with(marker) == []


def test_processes_limit_refused_without_a_pids_cgroup(workdir_root):
    d = ProcessDriver(workdir_root=workdir_root, use_cgroups=False)
    with pytest.raises(SandboxUnavailable, match="limits.processes=5 needs a pids cgroup"):
        d.run(Job(argv=("true",), limits=Limits(processes=5)))


def test_output_flood_is_bounded_and_killed(driver):
    o = driver.run(Job(argv=("yes", "flood"), limits=Limits(output_bytes=64 * 1024, wall_s=30)))
    assert (o.status, o.reason) == ("failed", "output_limit")
    assert len(o.stdout) == 64 * 1024 and o.stdout_truncated and not o.stderr_truncated
    assert o.stdout.startswith(b"flood\nflood\n")


def test_output_exactly_at_the_bound_is_kept_whole(driver):
    o = driver.run(Job(argv=("head", "-c", "4096", "/dev/zero"), limits=Limits(output_bytes=4096)))
    assert (o.status, len(o.stdout), o.stdout_truncated) == ("succeeded", 4096, False)


def test_wall_time_kills_the_whole_task(driver):
    marker = _marker()
    # The main process ignores SIGTERM; one child is a plain `sleep`, one left the process
    # group and session with setsid: all of them must be gone when run() returns.
    code = f"""
import signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen(["sleep", "300.{marker}"])
subprocess.Popen(["setsid", "sleep", "301.{marker}"])
print("started", flush=True)
time.sleep(300)  # {marker}
"""
    o = driver.run(python(code, limits=Limits(wall_s=1.5)))
    assert (o.status, o.reason) == ("timed-out", "wall_time")
    assert o.stdout == b"started\n"
    left = _processes_with(marker)
    if CGROUPS.pids_parent is None and driver.name == "process":
        # Without a cgroup only the process group is killed: the setsid child escapes.
        assert len(left) <= 1
    else:
        assert left == []


def test_background_children_end_with_the_task(driver):
    marker = _marker()
    o = driver.run(Job(argv=("sh", "-c", f"sleep 300.{marker} & echo started")))
    assert o.ok and o.stdout == b"started\n"
    assert _processes_with(marker) == []


def test_cancel(driver):
    cancel, started = threading.Event(), threading.Event()
    result = {}

    def worker():
        result["outcome"] = driver.run(Job(argv=("sleep", "300")), cancel=cancel, on_start=lambda t: started.set())

    thread = threading.Thread(target=worker)
    thread.start()
    assert started.wait(30)
    cancel.set()
    thread.join(30)
    o = result["outcome"]
    assert (o.status, o.reason) == ("cancelled", "cancelled")
    assert o.signal == 9


def test_cancelled_before_start_runs_nothing(driver):
    cancel = threading.Event()
    cancel.set()
    o = driver.run(Job(argv=("true",)), cancel=cancel)
    assert (o.status, o.reason, o.exit_code) == ("cancelled", "cancelled", None)


def test_concurrent_runs_from_worker_threads(driver):
    outcomes = [None] * 4

    def worker(i):
        outcomes[i] = driver.run(Job(argv=("sh", "-c", f"sleep 0.2; echo task-{i}")))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [o.stdout for o in outcomes] == [f"task-{i}\n".encode() for i in range(4)]


# -- isolation (bwrap) --------------------------------------------------------------------


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def _connect(port: int) -> Job:
    return python(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5); print('connected')")


@pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=f"bubblewrap cannot run here: {BWRAP_PROBLEM}")
def test_bwrap_has_no_network_unless_granted(workdir_root, listener):
    d = BwrapDriver(workdir_root=workdir_root)
    o = d.run(_connect(listener))
    assert (o.status, o.reason) == ("failed", "exit_code")
    assert b"ConnectionRefusedError" in o.stderr  # its own loopback: nobody listens there
    o = d.run(Job(argv=("cat", "/proc/net/dev")))
    interfaces = [line.split(":")[0].strip() for line in o.stdout.decode().splitlines()[2:]]
    assert interfaces == ["lo"]
    o = d.run(Job(argv=_connect(listener).argv, grants=Grants(network=True)))
    assert (o.status, o.stdout) == ("succeeded", b"connected\n"), o.stderr


def test_process_driver_says_it_does_not_isolate(workdir_root):
    iso = ProcessDriver(workdir_root=workdir_root).isolation()
    assert iso["grants_enforced"] == {"network": False, "read_paths": False, "write_paths": False}
    assert iso["namespaces"] == []


@pytest.fixture
def shared_dirs():
    # Under /var/tmp, which the sandbox sees read-only (its /tmp is private): the ungranted
    # directory is world-writable, so only the sandbox can be what stops the write.
    made = [tempfile.mkdtemp(prefix="synapse-sandbox-test-", dir="/var/tmp") for _ in range(2)]
    granted, ungranted = made
    if IS_ROOT:
        os.chown(granted, NOBODY, NOBODY)
    os.chmod(ungranted, 0o777)
    yield granted, ungranted
    for path in made:
        shutil.rmtree(path)


@pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=f"bubblewrap cannot run here: {BWRAP_PROBLEM}")
def test_bwrap_writes_only_where_granted(workdir_root, shared_dirs):
    granted, ungranted = shared_dirs
    d = BwrapDriver(workdir_root=workdir_root)
    o = d.run(Job(argv=("sh", "-c", f"echo x > {ungranted}/f"), grants=Grants(write_paths=(granted,))))
    assert (o.status, o.reason) == ("failed", "exit_code")
    assert b"Read-only file system" in o.stderr
    assert os.listdir(ungranted) == []
    o = d.run(Job(argv=("sh", "-c", f"echo granted > {granted}/f; echo private > /tmp/f"), grants=Grants(write_paths=(granted,))))
    assert o.ok, o.stderr
    assert Path(granted, "f").read_text() == "granted\n"
    assert not Path("/tmp/f").exists() or Path("/tmp/f").read_text() != "private\n"


@pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=f"bubblewrap cannot run here: {BWRAP_PROBLEM}")
def test_bwrap_task_sees_only_its_own_processes(workdir_root):
    o = BwrapDriver(workdir_root=workdir_root).run(Job(argv=("sh", "-c", "ls /proc | grep -c '^[0-9]'")))
    # bwrap's init, sh, ls, grep: nothing of the host.
    assert o.ok and int(o.stdout) <= 4


@pytest.mark.skipif(not IS_ROOT, reason="the grant check is about the uid a root worker switches tasks to")
def test_write_grant_must_be_writable_by_the_task_uid(driver):
    with tempfile.TemporaryDirectory(dir="/var/tmp") as private:
        with pytest.raises(JobError, match=f"not writable by uid {NOBODY}") as e:
            driver.run(Job(argv=("true",), grants=Grants(write_paths=(private,))))
        assert e.value.field == f"grants.write_paths[{private!r}]"


def test_missing_grant_paths_are_refused(driver):
    with pytest.raises(JobError) as e:
        driver.run(Job(argv=("true",), grants=Grants(read_paths=("/no/such/dir",))))
    assert e.value.field == "grants.read_paths['/no/such/dir']" and "does not exist" in str(e.value)


# -- what a dead worker leaves ------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@needs_pids_cgroup
def test_task_cgroups_of_dead_workers_are_swept():
    # As a SIGKILLed worker leaves it: a task cgroup named after it, a task still running.
    orphan = CGROUPS.pids_parent / f"task-{_dead_pid()}-left0ver"
    orphan.mkdir()
    straggler = subprocess.Popen(["sleep", "300"])
    try:
        (orphan / "cgroup.procs").write_text(str(straggler.pid))
        CgroupSupport.probe()
        assert straggler.wait(10) == -9
        assert not orphan.exists()
    finally:
        straggler.kill()
        straggler.wait()
        if orphan.exists():
            orphan.rmdir()


def test_working_directories_of_dead_workers_are_swept():
    root = tempfile.mkdtemp(prefix="synapse-sandbox-test-")
    os.chmod(root, 0o711)
    try:
        left = Path(root, f"synapse-task-{_dead_pid()}-left0ver")
        (left / "sub").mkdir(parents=True)
        (left / "sub" / "out.txt").write_text("partial")
        mine = Path(root, f"synapse-task-{os.getpid()}-running")
        mine.mkdir()
        ProcessDriver(workdir_root=root)
        assert sorted(os.listdir(root)) == [mine.name]
    finally:
        shutil.rmtree(root)


# -- bad jobs and unavailable drivers -----------------------------------------------------


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: Job(), "argv"),
        (lambda: Job(argv=("true",), entry="m:f"), "argv"),
        (lambda: Job(argv="echo hi"), "argv"),
        (lambda: Job(argv=()), "argv"),
        (lambda: Job(entry="not an entry"), "entry"),
        (lambda: Job(entry="mod.f"), "entry"),
        (lambda: Job(entry="m:f", args={"x": float("nan")}), "args"),
        (lambda: Job(entry="m:f", args=object()), "args"),
        (lambda: Job(argv=("true",), files={"/etc/passwd": b""}), "files['/etc/passwd']"),
        (lambda: Job(argv=("true",), files={"a/../../x": b""}), "files['a/../../x']"),
        (lambda: Job(argv=("true",), files={"x": "text"}), "files['x']"),
        (lambda: Job(argv=("true",), files={".synapse-result.json": b"{}"}), "files['.synapse-result.json']"),
        (lambda: Job(argv=("true",), env={"BAD=NAME": "x"}), "env['BAD=NAME']"),
        (lambda: Limits(cpu_s=-1), "limits.cpu_s"),
        (lambda: Limits(wall_s=0), "limits.wall_s"),
        (lambda: Limits(memory_bytes=1 << 50), "limits.memory_bytes"),
        (lambda: Limits(memory_bytes=1024), "limits.memory_bytes"),
        (lambda: Limits(processes=0), "limits.processes"),
        (lambda: Limits(output_bytes=True), "limits.output_bytes"),
        (lambda: Limits(wall_s=float("inf")), "limits.wall_s"),
        (lambda: Grants(read_paths=("relative/dir",)), "grants.read_paths['relative/dir']"),
        (lambda: Grants(write_paths="/tmp"), "grants.write_paths"),
        (lambda: Grants(write_paths=("/",)), "grants.write_paths['/']"),
    ],
)
def test_bad_jobs_are_refused_naming_the_field(build, field):
    with pytest.raises(JobError) as e:
        build()
    assert e.value.field == field
    assert isinstance(e.value, ValueError)


def test_unknown_driver_name():
    with pytest.raises(ValueError, match="choose one of auto, process, bwrap, container"):
        choose_driver("chroot")


def test_auto_prefers_bwrap():
    assert choose_driver("auto").name == ("process" if BWRAP_PROBLEM else "bwrap")


def _engine_reachable() -> bool:
    return shutil.which("docker") is not None and \
        subprocess.run(["docker", "version"], capture_output=True, timeout=30).returncode == 0


def test_container_driver_without_an_engine():
    if _engine_reachable():
        pytest.skip("a Docker engine is reachable here; this test is about machines without one")
    for build in (ContainerDriver, lambda: choose_driver("container")):
        with pytest.raises(SandboxUnavailable) as e:
            build()
        assert e.value.driver == "container"
        assert "Docker" in str(e.value) or "docker" in str(e.value)


def test_container_driver_without_its_image():
    """An engine with no registry cannot pull: an image it lacks makes the driver unavailable
    (named, with the fix), so "auto" falls back instead of failing every task."""
    if not _engine_reachable():
        pytest.skip("no Docker engine is reachable here; test_container_driver_without_an_engine covers it")
    image = "synapse-test-no-such-image:never-built"
    with pytest.raises(SandboxUnavailable) as e:
        ContainerDriver(image=image)
    assert e.value.driver == "container" and image in str(e.value)


def test_removing_a_working_directory_never_touches_its_parent(tmp_path):
    """Regression: when the tree was already gone (another worker's sweep), the error handler
    chmodded the tree's parent — the shared /tmp — to 0700, locking every other user out."""
    from synapse.execution.supervisor import _remove_tree

    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o1777)
    _remove_tree(str(parent / "synapse-task-gone"))  # already removed
    tree = parent / "synapse-task-x"
    (tree / "locked" / "deep").mkdir(parents=True)
    (tree / "locked").chmod(0o000)  # as a task running as the worker's uid could leave it
    _remove_tree(str(tree))
    assert not tree.exists()
    assert parent.stat().st_mode & 0o7777 == 0o1777
