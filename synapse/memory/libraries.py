"""The heavy libraries agent memory uses (numpy, onnxruntime, tokenizers, chromadb), imported
when first needed — a node that holds no memories never loads them — and one thread at a time.

Two threads importing numpy for the first time at once failed with "cannot import name
'NDArray' from partially initialized module 'numpy._typing'" (seen here: the index's writer
thread opening Chroma while a request's embedding ran in the executor). Every first import of
these goes through ``load``, under one lock.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

_lock = threading.Lock()


def load(name: str) -> ModuleType:
    """``import name`` under the one import lock (ImportError as usual)."""
    with _lock:
        return importlib.import_module(name)
