"""The container driver (synapse/execution/drivers.py ContainerDriver) run for real against
the Docker engine, with the task image scripts/docker-build makes (synapse:latest, or
SYNAPSE_TASK_IMAGE): the limits tests/test_sandbox.py holds the other drivers to, hit by real
tasks in real containers, and the isolation a container adds (no network unless granted,
only granted paths mounted, a read-only image). Skips only when no engine answers, unless
SYNAPSE_REQUIRE_DOCKER=1 (scripts/test), where it fails instead. After each test no working
directory and no task container is left."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from synapse.execution import ContainerDriver, Grants, Job, JobError, Limits, ProcessDriver, choose_driver
from synapse.execution.drivers import DEFAULT_TASK_IMAGE, TASK_IMAGE_ENV
from synapse.execution.supervisor import NOBODY

MiB = 1 << 20
IMAGE = os.environ.get(TASK_IMAGE_ENV) or DEFAULT_TASK_IMAGE


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    done = subprocess.run(["docker", "version"], capture_output=True, timeout=30)
    return None if done.returncode == 0 else done.stderr.decode(errors="replace").strip()


ENGINE_PROBLEM = _engine_problem()
if ENGINE_PROBLEM is not None:
    if os.environ.get("SYNAPSE_REQUIRE_DOCKER") == "1":
        raise RuntimeError(f"SYNAPSE_REQUIRE_DOCKER=1 but no Docker engine answers: {ENGINE_PROBLEM}")
    pytest.skip(f"no Docker engine answers: {ENGINE_PROBLEM}", allow_module_level=True)


def _task_containers() -> list[str]:
    done = subprocess.run(["docker", "ps", "-a", "--filter", "label=org.synapse.task", "--format", "{{.Names}}"],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.fixture(scope="module")
def workdir_root():
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        pytest.fail(f"the task image {IMAGE} is missing: run ./scripts/docker-build (scripts/test does)")
    root = tempfile.mkdtemp(prefix="synapse-container-test-", dir="/var/tmp")
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root)


@pytest.fixture
def driver(workdir_root):
    before = set(_task_containers())
    d = ContainerDriver(workdir_root=workdir_root)
    yield d
    assert os.listdir(workdir_root) == [], "a task's working directory was not removed"
    assert set(_task_containers()) - before == set(), "a task container was left"


def python(code: str, **kwargs) -> Job:
    return Job(argv=("python3", "-c", code), **kwargs)


def test_auto_needs_a_named_task_image(monkeypatch):
    monkeypatch.delenv(TASK_IMAGE_ENV, raising=False)
    assert choose_driver("auto").name in ("bwrap", "process")
    monkeypatch.setenv(TASK_IMAGE_ENV, IMAGE)
    assert choose_driver("auto").name == "container"
    monkeypatch.setenv(TASK_IMAGE_ENV, "synapse-test-no-such-image:never-built")
    assert choose_driver("auto").name in ("bwrap", "process")


def test_command_runs_as_nobody_in_its_working_directory(driver):
    o = driver.run(Job(argv=("sh", "-c", "id -u; pwd; cat data/in.txt; echo warn >&2; touch made"), files={"data/in.txt": b"input"}))
    assert (o.status, o.reason, o.exit_code) == ("succeeded", "ok", 0), o.stderr
    assert o.stdout.decode().splitlines() == [str(NOBODY), "/work", "input"]
    assert o.stderr == b"warn\n" and o.driver == "container"


def test_same_output_hash_as_the_process_driver(driver, workdir_root):
    job = Job(argv=("sh", "-c", "seq 1 1000; echo done >&2"))
    assert driver.run(job).output_hash == ProcessDriver(workdir_root=workdir_root).run(job).output_hash


def test_environment_is_scrubbed(driver, monkeypatch):
    monkeypatch.setenv("SYNAPSE_WORKER_SECRET", "do-not-leak")
    o = driver.run(Job(argv=("env",), env={"GREETING": "hi"}))
    env = dict(line.split("=", 1) for line in o.stdout.decode().splitlines())
    assert "SYNAPSE_WORKER_SECRET" not in env
    assert env["GREETING"] == "hi" and env["PATH"] == "/usr/local/bin:/usr/bin:/bin" and env["HOME"] == "/work"


def test_small_memory_limit_still_starts(driver):
    # Regression: a --ulimit data of 64 MiB applied to runc's init too, which then could not
    # set up the container ("cannot allocate memory"): every such task was a spawn_error.
    o = driver.run(Job(argv=("sh", "-c", "echo small"), limits=Limits(memory_bytes=64 * MiB)))
    assert (o.status, o.stdout) == ("succeeded", b"small\n"), o
    o = driver.run(Job(argv=("no-such-program-here",), limits=Limits(memory_bytes=64 * MiB)))
    assert (o.status, o.reason) == ("failed", "spawn_error") and "no-such-program-here" in o.detail, o


def test_nonzero_exit_and_missing_command(driver):
    o = driver.run(Job(argv=("sh", "-c", "echo oops >&2; exit 3")))
    assert (o.status, o.reason, o.exit_code, o.stderr) == ("failed", "exit_code", 3, b"oops\n")
    o = driver.run(Job(argv=("no-such-program-here",)))
    assert (o.status, o.reason, o.exit_code) == ("failed", "spawn_error", None)
    assert "no-such-program-here" in o.detail and "PATH" in o.detail


MODULE = b"""
def add(a, b):
    return {"sum": a + b}

def boom():
    raise ValueError("bad input 42")

def hog():
    return len(bytearray(1 << 30))

def write_big(n):
    with open("big.bin", "wb") as f:
        f.write(b"x" * n)

def uses_synapse():
    import synapse.execution.sandbox as sandbox
    return sandbox.RESULT_FILE
"""


def entry(function: str, args=None, **kwargs) -> Job:
    return Job(entry=f"work:{function}", args=args, files={"work.py": MODULE}, **kwargs)


def test_entry_points(driver):
    o = driver.run(entry("add", [2, 3]))
    assert (o.status, o.reason, o.result) == ("succeeded", "ok", {"sum": 5}), o.stderr
    o = driver.run(entry("boom"))
    assert (o.status, o.reason) == ("failed", "exception") and b"ValueError: bad input 42" in o.stderr
    # The synapse image carries the package: an entry point can import it there.
    o = driver.run(entry("uses_synapse"))
    assert (o.status, o.result) == ("succeeded", ".synapse-result.json"), o.stderr


def test_cpu_limit(driver):
    o = driver.run(python("while True: pass", limits=Limits(cpu_s=1, wall_s=30)))
    assert (o.status, o.reason) == ("failed", "cpu_limit"), (o, o.stderr)
    assert o.signal is not None


def test_memory_limit_command_and_entry_point(driver):
    o = driver.run(python("x = bytearray(1 << 30)", limits=Limits(memory_bytes=256 * MiB)))
    assert (o.status, o.reason, o.exit_code) == ("failed", "memory_limit", 1), o
    assert b"MemoryError" in o.stderr
    o = driver.run(entry("hog", limits=Limits(memory_bytes=256 * MiB)))
    assert (o.status, o.reason) == ("failed", "memory_limit"), o


def test_memory_limit_whole_task(driver):
    # Three processes of 100 MiB each: each under the per-process limit, together over the
    # container's 256 MiB, which only the engine's memory cgroup sees (its OOM kill is read
    # back from the engine: the shell's `wait` itself exits 0).
    hog = "import time; x = b'x' * (100 << 20); time.sleep(3)"
    o = driver.run(Job(argv=("sh", "-c", f"for i in 1 2 3; do python3 -c \"{hog}\" & done; wait"),
                       limits=Limits(memory_bytes=256 * MiB, wall_s=30)))
    assert (o.status, o.reason) == ("failed", "memory_limit"), (o, o.stderr)


def test_file_size_limit(driver):
    o = driver.run(Job(argv=("sh", "-c", "exec head -c 3000000 /dev/zero > big.bin"), limits=Limits(file_bytes=MiB)))
    assert (o.status, o.reason) == ("failed", "file_limit"), o
    o = driver.run(entry("write_big", [3 * MiB], limits=Limits(file_bytes=MiB)))
    assert (o.status, o.reason) == ("failed", "file_limit"), o


def test_fork_loop_is_contained(driver):
    # Bounded: 200 forks at most. The pids limit is the engine's: the forks past it fail.
    code = """
import os, sys, time
made = refused = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    made += 1
print(made, refused, flush=True)
sys.exit(1 if refused else 0)
"""
    o = driver.run(python(code, limits=Limits(processes=20, wall_s=30)))
    made, refused = map(int, o.stdout.split())
    assert made <= 19 and refused >= 181, o
    # The engine does not tell the worker a fork was refused: the task's own exit says it.
    assert (o.status, o.reason, o.exit_code) == ("failed", "exit_code", 1)


def test_output_flood_is_bounded_and_killed(driver):
    o = driver.run(Job(argv=("yes", "flood"), limits=Limits(output_bytes=64 * 1024, wall_s=30)))
    assert (o.status, o.reason) == ("failed", "output_limit")
    assert len(o.stdout) == 64 * 1024 and o.stdout_truncated


def test_wall_time_kills_the_container(driver):
    marker = str(random.randrange(10**11, 10**12))
    code = f"""
import signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen(["setsid", "sleep", "301.{marker}"])
print("started", flush=True)
time.sleep(300)
"""
    o = driver.run(python(code, limits=Limits(wall_s=3)))
    assert (o.status, o.reason, o.stdout) == ("timed-out", "wall_time", b"started\n")
    left = subprocess.run(["pgrep", "-f", f"301.{marker}"], capture_output=True)
    assert left.returncode == 1, left.stdout  # nothing of the container runs on the host


def test_cancel(driver):
    cancel, started, result = threading.Event(), threading.Event(), {}

    def run():
        result["o"] = driver.run(Job(argv=("sleep", "300")), cancel=cancel, on_start=lambda t: started.set())

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    cancel.set()
    thread.join(60)
    assert (result["o"].status, result["o"].reason) == ("cancelled", "cancelled")


def test_concurrent_runs(driver):
    outcomes = [None] * 3

    def run(i):
        outcomes[i] = driver.run(Job(argv=("sh", "-c", f"echo task-{i}")))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [o.stdout for o in outcomes] == [f"task-{i}\n".encode() for i in range(3)]


@pytest.fixture
def listener():
    # On the docker bridge's gateway address, which a container on the default bridge reaches.
    # (the engine's own address on it: the subnet's first host, as the engine assigns it).
    subnet = subprocess.run(["docker", "network", "inspect", "bridge", "--format", "{{range .IPAM.Config}}{{.Subnet}}{{end}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    gateway = str(ipaddress.ip_network(subnet)[1])
    server = socket.socket()
    server.bind((gateway, 0))
    server.listen()
    yield gateway, server.getsockname()[1]
    server.close()


def test_no_network_unless_granted(driver, listener):
    host, port = listener
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=5); print('connected')"
    o = driver.run(python(code))
    assert (o.status, o.reason) == ("failed", "exit_code") and b"Network is unreachable" in o.stderr, o.stderr
    o = driver.run(Job(argv=("cat", "/proc/net/dev")))
    assert [line.split(":")[0].strip() for line in o.stdout.decode().splitlines()[2:]] == ["lo"]
    o = driver.run(python(code, grants=Grants(network=True)))
    assert (o.status, o.stdout) == ("succeeded", b"connected\n"), o.stderr


@pytest.fixture
def shared_dirs():
    made = [tempfile.mkdtemp(prefix="synapse-container-test-", dir="/var/tmp") for _ in range(3)]
    granted, readable, ungranted = made
    os.chown(granted, NOBODY, NOBODY)
    Path(readable, "in.txt").write_text("readable\n")
    os.chmod(readable, 0o755)
    Path(ungranted, "secret.txt").write_text("not yours\n")
    os.chmod(ungranted, 0o777)
    os.chmod(Path(ungranted, "secret.txt"), 0o644)
    yield granted, readable, ungranted
    for path in made:
        shutil.rmtree(path)


def test_only_granted_paths_are_mounted(driver, shared_dirs):
    granted, readable, ungranted = shared_dirs
    # Not granted: not there at all (unlike bwrap, which shows the host read-only).
    o = driver.run(Job(argv=("cat", f"{ungranted}/secret.txt")))
    assert (o.status, o.reason) == ("failed", "exit_code") and b"No such file" in o.stderr
    o = driver.run(Job(argv=("sh", "-c", f"cat {readable}/in.txt; echo x > {readable}/w"), grants=Grants(read_paths=(readable,))))
    assert o.stdout == b"readable\n" and b"Read-only file system" in o.stderr
    o = driver.run(Job(argv=("sh", "-c", f"echo granted > {granted}/f; echo x > /etc/f"), grants=Grants(write_paths=(granted,))))
    assert Path(granted, "f").read_text() == "granted\n" and b"Read-only file system" in o.stderr


def test_write_grant_must_be_writable_by_nobody(driver):
    with tempfile.TemporaryDirectory(dir="/var/tmp") as private:
        os.chmod(private, 0o755)
        with pytest.raises(JobError, match=f"not writable by uid {NOBODY}"):
            driver.run(Job(argv=("true",), grants=Grants(write_paths=(private,))))
