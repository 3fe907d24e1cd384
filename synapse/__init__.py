"""Synapse: replicated, hash-verified state for an agent platform.

``synapse.Node`` runs a node in this process; ``synapse.Client`` / ``synapse.AsyncClient``
talk to any node over HTTP; ``synapse.NodeConfig`` holds a node's settings. They load on
first use, so ``import synapse._core`` stays light.
"""

from __future__ import annotations

_EXPORTS = {
    "Node": "synapse.node",
    "NodeError": "synapse.node",
    "NodeConfig": "synapse.config",
    "ConfigError": "synapse.config",
    "Client": "synapse.client",
    "AsyncClient": "synapse.client",
    "SynapseError": "synapse.client",
    "ConflictError": "synapse.client",
    "UnavailableError": "synapse.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'synapse' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
