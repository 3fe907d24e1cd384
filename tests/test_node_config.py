"""Settings: flags over SYNAPSE_* over TOML over defaults, and every bad setting refused with a
message that names it."""

from __future__ import annotations

import subprocess
import sys
import pytest

from synapse.config import ConfigError, NodeConfig, load_config, parse_peers


def test_precedence_flags_over_env_over_file(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text('node_id = "from-file"\napi = "127.0.0.1:9001"\nraft = "127.0.0.1:9002"\nrequest_timeout = 7\n')
    env = {"SYNAPSE_NODE_ID": "from-env", "SYNAPSE_API": "127.0.0.1:9101"}
    cfg = load_config({"node_id": "from-flag"}, env, toml)
    assert cfg.node_id == "from-flag"
    assert cfg.api == "127.0.0.1:9101"
    assert cfg.raft == "127.0.0.1:9002"
    assert cfg.request_timeout == 7.0
    assert load_config({}, {}, None) == NodeConfig()


@pytest.mark.parametrize(
    "flags,setting",
    [
        ({"api": "localhost"}, "api"),
        ({"raft": "127.0.0.1:99999"}, "raft"),
        ({"peers": "node2"}, "peers"),
        ({"peers": "bad id!=127.0.0.1:1"}, "peers"),
        ({"peers": "n2=127.0.0.1:7071"}, "peers"),  # this node's own Raft address
        ({"node_id": "../etc"}, "node_id"),
        ({"node_id": "n9\n"}, "node_id"),
        ({"storage": "mysql://x"}, "storage"),
        ({"request_timeout": "fast"}, "request_timeout"),
        ({"raft_fsync": "maybe"}, "raft_fsync"),
        ({"checkpoint_interval": "-1"}, "checkpoint_interval"),
        ({"checkpoint_interval": "often"}, "checkpoint_interval"),
        ({"checkpoint_seconds": "0"}, "checkpoint_seconds"),
        ({"debug_fault_injection": "sometimes"}, "debug_fault_injection"),
        ({"peers": "n2=127.0.0.1:9999"}, "secret_file"),  # multi-node without a secret
        ({"api": "127.0.0.1:7071"}, "api"),  # same as raft
        ({"memory_index": "chromadb"}, "memory_index"),
        ({"memory_index": "http://127.0.0.1:8000"}, "memory_index"),
        ({"memory_index": "chroma+http://host"}, "memory_index"),  # no port
        ({"embedding_cache": "memcached://x"}, "embedding_cache"),
    ],
)
def test_bad_settings_name_the_setting(flags, setting):
    with pytest.raises(ConfigError) as e:
        load_config(flags, {}, None)
    assert e.value.setting == setting
    assert str(e.value).startswith(setting)


def test_short_secret_and_unknown_toml_key_are_refused(tmp_path):
    secret = tmp_path / "s"
    secret.write_text("short")
    with pytest.raises(ConfigError, match="secret_file"):
        load_config({"peers": "n2=127.0.0.1:9999", "secret_file": str(secret)}, {}, None)
    toml = tmp_path / "x.toml"
    toml.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="colour: unknown setting"):
        load_config({}, {}, toml)


def test_insecure_flag_allows_a_secretless_cluster_explicitly():
    cfg = load_config({"peers": "n2=127.0.0.1:9999", "insecure_no_cluster_secret": True}, {}, None)
    assert cfg.multi_node and cfg.secret_file is None


def test_peers_parse_from_flags_and_toml_tables():
    assert parse_peers("a=127.0.0.1:1, b=127.0.0.1:2") == {"a": "127.0.0.1:1", "b": "127.0.0.1:2"}
    assert parse_peers({"a": "127.0.0.1:1"}) == {"a": "127.0.0.1:1"}
    with pytest.raises(ConfigError, match="twice"):
        parse_peers("a=127.0.0.1:1,a=127.0.0.1:2")


def test_the_daemon_refuses_to_start_on_a_bad_setting_and_says_why(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "synapse.cli.main", "node", "start", "--data-dir", str(tmp_path),
         "--peers", "n2=127.0.0.1:9999"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    assert "secret_file" in r.stderr and "--secret-file" in r.stderr
    assert not (tmp_path / "raft-log").exists()


def test_a_data_dir_belongs_to_one_node(tmp_path):
    from tests.harness import free_ports

    api, raft = free_ports(2)
    (tmp_path / "node.json").write_text('{"node_id": "other", "raft": "127.0.0.1:1"}')
    r = subprocess.run(
        [sys.executable, "-m", "synapse.cli.main", "node", "start", "--id", "me", "--data-dir", str(tmp_path),
         "--api", f"127.0.0.1:{api}", "--raft", f"127.0.0.1:{raft}"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0 and "belongs to node 'other'" in r.stderr
