"""docs/configuration.md is generated from the settings (synapse/config.py) and cannot drift:
it is regenerated and compared, and what it says — each setting's flag, variable and TOML
key — is checked against what `synapse node start` and ``load_config`` really accept."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import synapse.config as config
from synapse.cli.main import node_start
from synapse.cli.tasks import worker_start
from synapse.config import SETTINGS, load_config, settings_markdown, settings_reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGENERATE = "python -m synapse.config --markdown > docs/configuration.md"

# A valid value other than the default for every setting, as (TOML/flag value, expected).
SAMPLES = {
    "node_id": ("n-7", "n-7"),
    "data_dir": ("/var/lib/synapse/n7", Path("/var/lib/synapse/n7")),
    "api": ("10.0.0.7:8070", "10.0.0.7:8070"),
    "raft": ("10.0.0.7:8071", "10.0.0.7:8071"),
    "peers": ({"n8": "10.0.0.8:8071"}, {"n8": "10.0.0.8:8071"}),
    "secret_file": ("/etc/synapse/secret", Path("/etc/synapse/secret")),
    "insecure_no_cluster_secret": (True, True),
    "storage": ("postgresql://synapse@db/synapse", "postgresql://synapse@db/synapse"),
    "memory_index": ("chroma+http://10.0.0.9:8000", "chroma+http://10.0.0.9:8000"),
    "embedding_cache": ("redis://10.0.0.9:6379/0", "redis://10.0.0.9:6379/0"),
    "root_token_file": ("/etc/synapse/root.token", Path("/etc/synapse/root.token")),
    "request_timeout": (7.5, 7.5),
    "raft_fsync": (True, True),
    "checkpoint_interval": (500, 500),
    "checkpoint_seconds": (30.0, 30.0),
    "checkpoint_retain": (2, 2),
    "checkpoint_snapshot_seconds": (0.0, 0.0),
    "debug_fault_injection": (True, True),
    "heartbeat_timeout": (9.0, 9.0),
    "worker_slots": (3, 3),
    "worker_driver": ("process", "process"),
    "tls_cert": ("/etc/synapse/n7.crt", Path("/etc/synapse/n7.crt")),
    "tls_key": ("/etc/synapse/n7.key", Path("/etc/synapse/n7.key")),
    "tls_client_ca": ("/etc/synapse/ca.crt", Path("/etc/synapse/ca.crt")),
    "tls_ca": ("/etc/synapse/ca.crt", Path("/etc/synapse/ca.crt")),
}


def test_the_committed_page_is_what_the_code_generates():
    assert DOC.read_text() == settings_markdown(), f"docs/configuration.md is out of date: run `{REGENERATE}`"


def test_the_generator_runs_as_documented():
    out = subprocess.run([sys.executable, "-m", "synapse.config", "--markdown"], capture_output=True, text=True,
                         check=True).stdout
    assert out == settings_markdown()
    bad = subprocess.run([sys.executable, "-m", "synapse.config", "--mark"], capture_output=True, text=True)
    assert bad.returncode != 0 and "usage: python -m synapse.config --markdown" in bad.stderr


def test_every_setting_is_documented_with_a_meaning_and_a_default():
    rows = settings_reference()
    assert [r["setting"] for r in rows] == list(SETTINGS)
    for r in rows:
        assert len(r["doc"]) > 20 and r["default"], r
        assert f"| `{r['setting']}` | `{r['flag']}` | `{r['env']}` |" in DOC.read_text()


def test_each_documented_flag_is_a_flag_of_node_start_and_no_flag_is_undocumented():
    flags = {opt for p in node_start.params for opt in p.opts}
    documented = {r["flag"] for r in settings_reference()}
    assert documented <= flags, f"documented but not flags of `synapse node start`: {documented - flags}"
    assert flags - documented == {"--config", "--log-level"}, flags - documented
    # ... and each flag reaches its own setting (click's parameter name is the setting's name).
    by_flag = {opt: p.name for p in node_start.params for opt in p.opts}
    assert all(by_flag[r["flag"]] == r["setting"] for r in settings_reference())


@pytest.fixture
def unvalidated(monkeypatch):
    """load_config without the cross-setting checks (files that exist, a secret with peers):
    what is tested here is which name reaches which setting."""
    monkeypatch.setattr(config, "validate", lambda c: None)


def _env_text(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value).lower() if isinstance(value, bool) else str(value)


def _toml(name: str, value) -> str:
    if isinstance(value, dict):
        return f"[{name}]\n" + "".join(f'{k} = "{v}"\n' for k, v in value.items())
    if isinstance(value, bool):
        return f"{name} = {str(value).lower()}\n"
    if isinstance(value, (int, float)):
        return f"{name} = {value}\n"
    return f'{name} = "{value}"\n'


def test_each_documented_variable_and_toml_key_sets_its_setting(unvalidated, tmp_path):
    assert set(SAMPLES) == set(SETTINGS), "a new setting needs a sample here"
    for r in settings_reference():
        raw, expected = SAMPLES[r["setting"]]
        assert getattr(load_config(env={r["env"]: _env_text(raw)}), r["setting"]) == expected, r["env"]
        toml = tmp_path / f"{r['setting']}.toml"
        toml.write_text(_toml(r["setting"], raw))
        assert getattr(load_config(config_file=toml), r["setting"]) == expected, toml.read_text()
        dashed = tmp_path / f"{r['setting']}-dashed.toml"
        dashed.write_text(_toml(r["setting"].replace("_", "-"), raw))
        assert getattr(load_config(config_file=dashed), r["setting"]) == expected


def test_the_documented_defaults_are_the_defaults():
    defaults = config.NodeConfig()
    for r in settings_reference():
        value = getattr(defaults, r["setting"])
        if r["default"].startswith("`"):
            shown = r["default"].strip("`")
            assert shown in (str(value), str(value).lower(), f"{value:g}" if isinstance(value, float) else ""), r
        else:
            assert r["default"].startswith(("(", "-1 ")), r  # said in words: none, auto, derived


def test_the_example_toml_in_the_page_is_valid(unvalidated, tmp_path):
    block = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert set(tomllib.loads(block)) <= set(SETTINGS)
    (tmp_path / "node.toml").write_text(block)
    loaded = load_config(config_file=tmp_path / "node.toml")
    assert loaded.node_id == "node1" and loaded.peers == {"node2": "10.0.0.2:7071", "node3": "10.0.0.3:7071"}


def test_worker_start_is_configured_by_flags_only_as_the_page_says():
    flags = {opt for p in worker_start.params for opt in p.opts}
    assert "--config" not in flags, "synapse worker start takes a settings file now: document its settings"
    assert "configured by flags only" in DOC.read_text()
