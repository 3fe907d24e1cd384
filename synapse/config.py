"""Node settings: command-line flags over ``SYNAPSE_*`` environment variables over a TOML file
over defaults. Every bad setting is refused with a message naming it and the fix."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from synapse.cluster.tuning import RaftTuning

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfigError(ValueError):
    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


def _setting(default: Any = None, doc: str = "", *, factory: Any = None, default_text: str | None = None) -> Any:
    """A node setting with its meaning: the one description of it, from which
    docs/configuration.md is generated (``settings_markdown``). ``default_text`` says the
    default where its value alone would not (e.g. -1 meaning auto)."""
    meta = {"doc": " ".join(doc.split()), "default_text": default_text}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NodeConfig:
    node_id: str = _setting("node1", """This node's id, unique in the cluster: 1-63 letters, digits, '.', '_'
        or '-'. Other nodes list it in their `peers`; `synapse cluster add/remove` name it.""")
    data_dir: Path = _setting(Path("synapse-data"), """Where this node keeps its Raft log, dumps,
        checkpoints' snapshots, the SQLite view, the embedded memory index and its tokens.""")
    api: str = _setting("127.0.0.1:7070", """HOST:PORT the HTTP API listens on. Binding every interface
        (0.0.0.0 or ::) must be asked for explicitly.""")
    raft: str = _setting("127.0.0.1:7071", """HOST:PORT for Raft traffic between the voters; the other
        nodes dial this address, so it must be reachable from them (and it is this node's identity
        in the Raft configuration).""")
    peers: dict[str, str] = _setting(doc="""The other voters' Raft addresses, by node id:
        `ID=HOST:PORT,ID=HOST:PORT` as a flag or variable, a table `{node2 = "10.0.0.2:7071"}` in
        TOML. Empty: a single-node (local mode) cluster.""", factory=dict, default_text="(none: local mode)")
    secret_file: Path | None = _setting(None, """A file holding the cluster secret (at least 16
        characters; the same file on every node), which authenticates and encrypts Raft traffic.
        Required with `peers`: without it anyone who reaches the Raft port can run code in the node
        (PySyncObj unpickles every frame; synapse/cluster/DESIGN.md).""")
    insecure_no_cluster_secret: bool = _setting(False, """Run a multi-node cluster with NO authentication
        or encryption of Raft traffic, so anyone who reaches the Raft port can run code in the node.
        Refused unless asked for by this deliberately alarming name; throwaway test clusters only.""")
    storage: str = _setting("sqlite", """Where the applied key-value state is materialized as tables:
        `sqlite` (a file in the data dir) or a `postgresql://` DSN (synapse/storage/DESIGN.md).""")
    memory_index: str = _setting("chroma", """Agent memory's vector index (synapse/memory/DESIGN.md):
        `chroma` (embedded, in data_dir/memory-index), `chroma+http://HOST:PORT` (a Chroma server;
        one database per node) or `off` (this node serves no memory routes).""")
    embedding_cache: str = _setting("off", """A Redis shared by the nodes that caches query embeddings
        (`redis://HOST:PORT/DB`), or `off` (local mode's default: one process has no one to share
        with). Bypassed while the Redis is down.""")
    root_token_file: Path | None = _setting(None, """A file holding the API root token. Default: generated
        at first start (or derived from the cluster secret) and kept in data_dir/root.token.""",
        default_text="(data_dir/root.token, generated)")
    request_timeout: float = _setting(5.0, """Seconds a request may wait for the cluster (a write's
        commit, a read's barrier, a membership change) before it is answered 503.""")
    raft_fsync: bool = _setting(False, """fdatasync every Raft log append before acknowledging it:
        survives power loss of a majority, at the disk's sync latency per entry
        (synapse/cluster/DESIGN.md, durability).""")
    checkpoint_interval: int = _setting(1000, """The leader proposes a checkpoint (a state digest
        every node reports and a majority must agree on) every this many log entries; 0: none but
        on demand.""")
    checkpoint_seconds: float = _setting(60.0, """The leader also proposes a checkpoint at least this
        often, in seconds, while writes come in.""")
    checkpoint_retain: int = _setting(5, """Snapshots of the newest this-many checkpoints are kept in
        data_dir/checkpoints: the checkpoints `synapse rollback` can go back to (0: none).""")
    checkpoint_snapshot_seconds: float = _setting(30.0, """A periodic checkpoint gets a snapshot only
        if the last one is at least this many seconds old (0: every checkpoint). A snapshot writes
        the whole state (synapse/integrity/DESIGN.md, "Rollback"). Checkpoints made on demand
        always get one.""")
    debug_fault_injection: bool = _setting(False, """Allows POST /v1/debug/corrupt (`synapse debug
        corrupt`) on this node: tests and chaos runs only — it changes this node's state behind
        the log's back.""")
    heartbeat_timeout: float = _setting(5.0, """An execution node silent this many seconds is marked
        down and its tasks rescheduled.""")
    worker_slots: int = _setting(-1, """Task slots of the execution node embedded in this node: -1
        (auto) is the CPU count in local mode (no peers) and none in a cluster, where `synapse
        worker start` runs them; 0: no embedded worker.""", default_text="-1 (auto)")
    worker_driver: str = _setting("auto", """The embedded worker's sandbox: `auto` (a container when
        `SYNAPSE_TASK_IMAGE` names an image a reachable Docker engine has, else bubblewrap when
        usable, else a plain process), `bwrap`, `process` or `container`
        (synapse/execution/DESIGN.md).""")
    tls_cert: Path | None = _setting(None, """Serve the API over HTTPS with this certificate (PEM;
        `synapse tls init` makes one per node); needs `tls_key` (synapse/security/DESIGN.md,
        TLS). With a CA (`tls_ca` or `tls_client_ca`) the Raft port speaks mutual TLS too.""")
    tls_key: Path | None = _setting(None, "The private key of `tls_cert` (PEM).")
    tls_client_ca: Path | None = _setting(None, """Require every client to present a certificate this
        CA signed (mutual TLS).""")
    tls_ca: Path | None = _setting(None, """The CA this node verifies other nodes' certificates against
        when it calls them (and its embedded worker calls its API); default `tls_client_ca`.""",
        default_text="(tls_client_ca)")
    # Raft timing: not a setting (no flag, variable or key); measured, synapse/cluster/DESIGN.md.
    tuning: RaftTuning = field(default_factory=RaftTuning)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def peer_ca(self) -> Path | None:
        return self.tls_ca or self.tls_client_ca

    @property
    def multi_node(self) -> bool:
        return bool(self.peers)

    @property
    def embedded_worker_slots(self) -> int:
        if self.worker_slots >= 0:
            return self.worker_slots
        return 0 if self.multi_node else (os.cpu_count() or 1)

    def api_host_port(self) -> tuple[str, int]:
        return split_address("api", self.api)

    def raft_host_port(self) -> tuple[str, int]:
        return split_address("raft", self.raft)

    def read_secret(self) -> str | None:
        if self.secret_file is None:
            return None
        try:
            secret = self.secret_file.read_text().strip()
        except OSError as e:
            raise ConfigError("secret_file", f"cannot read {self.secret_file}: {e.strerror}") from e
        if len(secret) < 16:
            raise ConfigError(
                "secret_file",
                f"{self.secret_file} holds {len(secret)} characters; use at least 16 "
                "(e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
            )
        return secret


def split_address(setting: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(setting, f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:7070)")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::"):
        # Binding every interface is a choice to make explicitly, not a default to inherit.
        return host, int(port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.match(r"^[A-Za-z0-9.-]+$", host):
            raise ConfigError(setting, f"{host!r} is not an IP address or host name") from None
    return host, int(port)


def parse_peers(value: str | Mapping[str, str]) -> dict[str, str]:
    """``ID=HOST:PORT,ID=HOST:PORT`` (flags, env) or a TOML table ``{id = "host:port"}``."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = []
        for item in filter(None, (p.strip() for p in value.split(","))):
            node_id, sep, addr = item.partition("=")
            if not sep:
                raise ConfigError("peers", f"{item!r} is not ID=HOST:PORT (e.g. node2=10.0.0.2:7071)")
            pairs.append((node_id.strip(), addr.strip()))
    peers: dict[str, str] = {}
    for node_id, addr in pairs:
        if not isinstance(addr, str):
            raise ConfigError("peers", f"the address of {node_id!r} must be a string HOST:PORT")
        check_node_id("peers", node_id)
        split_address("peers", addr)
        if node_id in peers:
            raise ConfigError("peers", f"{node_id!r} is listed twice")
        peers[node_id] = addr
    return peers


def check_node_id(setting: str, node_id: str) -> str:
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ConfigError(
            setting, f"{node_id!r} is not a valid node id: 1-63 letters, digits, '.', '_' or '-'"
        )
    return node_id


_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


# Numeric settings: (type, lowest, highest, how to say the range).
_RANGES: dict[str, tuple[type, float, float, str]] = {
    "request_timeout": (float, 0.1, 300, "0.1 to 300 seconds"),
    "checkpoint_interval": (int, 0, 10_000_000, "0 (on demand only) to 10,000,000 entries"),
    "checkpoint_retain": (int, 0, 10_000, "0 (no rollback) to 10,000 snapshots"),
    "checkpoint_seconds": (float, 0.1, 86_400, "0.1 to 86,400 seconds"),
    "checkpoint_snapshot_seconds": (float, 0, 86_400, "0 (every checkpoint) to 86,400 seconds"),
    "heartbeat_timeout": (float, 0.5, 600, "0.5 to 600 seconds"),
    "worker_slots": (int, -1, 4096, "-1 (auto), 0 (no embedded worker) to 4096 slots"),
}


_PATHS = ("data_dir", "secret_file", "root_token_file", "tls_cert", "tls_key", "tls_client_ca", "tls_ca")


def _coerce(name: str, raw: Any) -> Any:
    """Turns a flag/env/TOML value into the field's type, or raises ConfigError naming it."""
    try:
        if name in _PATHS:
            return None if raw in (None, "") else Path(raw)
        if name == "peers":
            return parse_peers(raw)
        if name in _BOOLEANS:
            if isinstance(raw, bool):
                return raw
            return _BOOL[str(raw).strip().lower()]
        if name in _RANGES:
            kind, low, high, fix = _RANGES[name]
            v = kind(raw)
            if not low <= v <= high:
                raise ConfigError(name, f"{v} is out of range; use {fix}")
            return v
        if name == "node_id":
            return check_node_id(name, str(raw))
        if name in ("api", "raft"):
            split_address(name, str(raw))
            return str(raw)
        if name == "worker_driver":
            if str(raw) not in WORKER_DRIVERS:
                raise ConfigError(name, f"{raw!r} is not auto, bwrap, process or container")
            return str(raw)
        if name == "memory_index":
            s = str(raw)
            if s not in ("chroma", "off") and not re.match(r"^chroma\+http://[A-Za-z0-9.\-\[\]:]+:\d{1,5}/?$", s):
                raise ConfigError(name, f"{s!r} is not 'chroma' (embedded), 'chroma+http://HOST:PORT' or 'off'")
            return s
        if name == "embedding_cache":
            s = str(raw)
            if s != "off" and not re.match(r"^rediss?://[^\s]+$", s):
                raise ConfigError(name, f"{s!r} is not 'off' or a redis:// URL (redis://HOST:PORT/DB)")
            return s
        if name == "storage":
            s = str(raw)
            if s != "sqlite" and not s.startswith(("postgresql://", "postgres://")):
                raise ConfigError(name, f"{s!r} is not 'sqlite' or a postgresql:// DSN")
            return s
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError):
        raise ConfigError(name, f"{raw!r} is not a valid value") from None
    raise ConfigError(name, "is not a known setting")


SETTINGS = tuple(f.name for f in fields(NodeConfig) if f.name != "tuning")
WORKER_DRIVERS = ("auto", "bwrap", "process", "container")
_BOOLEANS = ("insecure_no_cluster_secret", "raft_fsync", "debug_fault_injection")


def setting_env(name: str) -> str:
    """The environment variable of a setting."""
    return "SYNAPSE_" + name.upper()


def setting_flag(name: str) -> str:
    """The `synapse node start` flag of a setting (tests/test_config_docs.py checks each exists)."""
    return "--id" if name == "node_id" else "--" + name.replace("_", "-")


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> NodeConfig:
    """Merges defaults < TOML file < environment (SYNAPSE_<NAME>) < flags, then validates."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError("config", f"cannot read {config_file}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{config_file} is not valid TOML: {e}") from e
        for key, raw in doc.items():
            name = key.replace("-", "_")
            if name not in SETTINGS:
                raise ConfigError(key, f"unknown setting in {config_file}; known: {', '.join(SETTINGS)}")
            values[name] = _coerce(name, raw)
    for name in SETTINGS:
        raw = (env or {}).get(setting_env(name))
        if raw is not None:
            values[name] = _coerce(name, raw)
    for name, raw in (flags or {}).items():
        if raw is None:
            continue
        if name not in SETTINGS:
            raise ConfigError(name, f"unknown setting; known: {', '.join(SETTINGS)}")
        values[name] = _coerce(name, raw)
    config = replace(NodeConfig(), **values)
    validate(config)
    return config


def validate(config: NodeConfig) -> None:
    config.api_host_port()
    config.raft_host_port()
    if config.node_id in config.peers:
        raise ConfigError("peers", f"lists this node's own id {config.node_id!r}; list only the other voters")
    if config.raft in config.peers.values():
        raise ConfigError("peers", f"lists this node's own Raft address {config.raft}")
    if config.api == config.raft:
        raise ConfigError("api", "the API and Raft addresses must differ")
    if config.multi_node and config.secret_file is None and not config.insecure_no_cluster_secret:
        raise ConfigError(
            "secret_file",
            "a multi-node cluster needs a cluster secret: without one, anyone who can reach the "
            "Raft port can run code in this node. Give --secret-file FILE (the same file on every "
            "node), or --insecure-no-cluster-secret for a throwaway test cluster",
        )
    config.read_secret()
    _validate_tls(config)


def _validate_tls(config: NodeConfig) -> None:
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert", "HTTPS needs both --tls-cert and --tls-key (`synapse tls init` makes them)")
    if not config.tls and (config.tls_client_ca or config.tls_ca):
        raise ConfigError("tls_cert", "--tls-client-ca and --tls-ca need --tls-cert and --tls-key: a node "
                          "that serves plain HTTP cannot require or verify certificates")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "tls_ca"):
        path = getattr(config, name)
        if path is not None and not path.is_file():
            raise ConfigError(name, f"{path} does not exist or is not a file (`synapse tls init` makes them)")
    if config.tls and config.peer_ca is None and (config.multi_node or config.embedded_worker_slots > 0):
        raise ConfigError("tls_ca", "this node calls HTTPS APIs (the other nodes', or its own from its "
                          "embedded worker): give --tls-ca, the CA that signed the nodes' certificates "
                          "(`synapse tls init` writes it as ca.crt; for a public CA, "
                          "/etc/ssl/certs/ca-certificates.crt)")


# --- docs/configuration.md, generated from the settings above ---

_CHOICES = {
    "worker_driver": "`auto`, `bwrap`, `process`, `container`",
    "storage": "`sqlite` or `postgresql://USER@HOST/DB`",
    "memory_index": "`chroma`, `chroma+http://HOST:PORT`, `off`",
    "embedding_cache": "`off` or `redis://HOST:PORT/DB`",
}


def _default_text(f) -> str:
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    value = f.default
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def settings_reference() -> list[dict[str, str]]:
    """Every node setting: its TOML key, flag, environment variable, default, accepted values
    and meaning."""
    rows = []
    for f in fields(NodeConfig):
        if f.name not in SETTINGS:
            continue
        if f.name in _RANGES:
            values = _RANGES[f.name][3]
        elif f.name in _BOOLEANS:
            values = "`true`/`false` (also 1/0, yes/no, on/off); the flag takes no value"
        elif f.name in _PATHS:
            values = "a file path" if f.name != "data_dir" else "a directory"
        elif f.name in ("api", "raft"):
            values = "HOST:PORT"
        elif f.name == "peers":
            values = "ID=HOST:PORT,... (TOML: a table)"
        elif f.name == "node_id":
            values = "1-63 of `A-Z a-z 0-9 . _ -`"
        else:
            values = _CHOICES.get(f.name, "")
        rows.append({"setting": f.name, "flag": setting_flag(f.name), "env": setting_env(f.name),
                     "default": _default_text(f), "values": values, "doc": f.metadata["doc"]})
    return rows


def settings_markdown() -> str:
    """docs/configuration.md: ``python -m synapse.config --markdown > docs/configuration.md``."""
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    out = [
        "# Configuration",
        "",
        "<!-- Generated by `python -m synapse.config --markdown > docs/configuration.md` from the",
        "     settings in synapse/config.py; tests/test_config_docs.py fails when it is out of date. -->",
        "",
        "A node (`synapse node start`) takes each setting from, highest first: its command-line flag,",
        "its `SYNAPSE_*` environment variable, the TOML file given with `--config FILE`, the default.",
        "Every bad value is refused at start with a message naming the setting and the fix; an unknown",
        "key in the TOML file is refused too. TOML keys may be written with `_` or `-`.",
        "",
        "```toml",
        "# /etc/synapse/node1.toml",
        'node_id = "node1"',
        'data_dir = "/var/lib/synapse/node1"',
        'api = "10.0.0.1:7070"',
        'raft = "10.0.0.1:7071"',
        'secret_file = "/etc/synapse/cluster.secret"',
        "",
        "[peers]",
        'node2 = "10.0.0.2:7071"',
        'node3 = "10.0.0.3:7071"',
        "```",
        "",
        "| setting (TOML key) | flag | environment variable | default | values | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for r in settings_reference():
        out.append(f"| `{r['setting']}` | `{r['flag']}` | `{r['env']}` | {cell(r['default'])} | {cell(r['values'])} "
                   f"| {cell(r['doc'])} |")
    out += [
        "",
        "Flags of `synapse node start` that are not settings: `--config FILE` (the TOML file above;",
        "no variable) and `--log-level debug|info|warning|error` (default `info`).",
        "",
        "Raft's timing (election timeouts, heartbeats, keep-alives, compaction thresholds) is not",
        "configurable: it was tuned by measurement (synapse/cluster/DESIGN.md, \"Timing\").",
        "",
        "## Execution nodes (`synapse worker start`)",
        "",
        "An execution node is configured by flags only (no TOML file, and no `SYNAPSE_*` variable but",
        "`SYNAPSE_TOKEN`, its API token when neither `--token` nor `--token-file` is given): see",
        "`synapse worker start --help`.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m synapse.config --markdown > docs/configuration.md")
    sys.stdout.write(settings_markdown())
