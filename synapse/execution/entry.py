"""The entry-point runner: the process a Python entry-point task runs as.

Started by the drivers as ``python -I <this file> .synapse-entry.json`` in the task's
working directory. It reads the spec (``{"entry": "pkg.mod:function", "args": ...,
"result_bytes": n}``), imports the module with the working directory first on ``sys.path``
(so an input file ``mymod.py`` can be the entry module), calls the function and writes its
JSON return value to ``.synapse-result.json``. On failure it writes
``.synapse-error.json`` (``{"error": "exception" | "import" | "result_not_json" |
"result_limit", "type", "errno", "message"}``) and prints the traceback to stderr.

It imports nothing but the standard library and is run by path under ``-I`` (isolated mode:
no PYTHON* variables, no user site directory), so it works wherever the worker's interpreter
does, whether or not the synapse package is importable from the task; DESIGN.md has the whole
import path rule."""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

SPEC_FILE = ".synapse-entry.json"  # sandbox.ENTRY_SPEC_FILE
RESULT_FILE = ".synapse-result.json"  # sandbox.RESULT_FILE
ERROR_FILE = ".synapse-error.json"  # sandbox.ERROR_FILE


def _write_atomically(name: str, text: str) -> None:
    # The driver must never read half a result: write aside, then rename over.
    partial = name + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, name)


def _fail(kind: str, error: BaseException | None, message: str) -> int:
    if error is not None:
        traceback.print_exception(error)
    else:
        print(message, file=sys.stderr)
    record = {
        "error": kind,
        "type": type(error).__name__ if error is not None else None,
        "errno": getattr(error, "errno", None),
        "message": message,
    }
    try:
        _write_atomically(ERROR_FILE, json.dumps(record))
    except OSError as e:  # e.g. the task filled its file_bytes limit; stderr still says why
        print(f"synapse entry runner: cannot record the error: {e}", file=sys.stderr)
    return 1


def call(spec: dict) -> int:
    module_name, _, function_name = spec["entry"].partition(":")
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
    except Exception as e:
        return _fail("import", e, f"cannot load {spec['entry']}: {type(e).__name__}: {e}")
    if not callable(function):
        return _fail("import", None, f"{spec['entry']} is a {type(function).__name__}, not a function")
    args = spec.get("args")
    try:
        if isinstance(args, list):
            value = function(*args)
        elif isinstance(args, dict):
            value = function(**args)
        elif args is None:
            value = function()
        else:
            value = function(args)
    except Exception as e:  # SystemExit passes through: sys.exit(n) is an exit code
        return _fail("exception", e, f"{spec['entry']} raised {type(e).__name__}: {e}")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        return _fail("result_not_json", e, f"{spec['entry']} returned a {type(value).__name__}, which is not JSON: {e}")
    limit = spec.get("result_bytes")
    if limit is not None and len(text.encode("utf-8")) > limit:
        return _fail("result_limit", None, f"{spec['entry']} returned {len(text.encode())} bytes of JSON; the limit is {limit} (limits.result_bytes)")
    try:
        _write_atomically(RESULT_FILE, text)
    except OSError as e:
        return _fail("exception", e, f"cannot write the result: {e}")
    return 0


def main(argv: list[str]) -> int:
    # Running this file put its own directory (synapse/execution) first on sys.path; the
    # task's modules must not be shadowed by, nor shadow, the sandbox's own files.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    with open(argv[1] if len(argv) > 1 else SPEC_FILE, encoding="utf-8") as f:
        spec = json.load(f)
    # The import path rule (DESIGN.md): the working directory first, then this
    # interpreter's own path, then the worker's, for packages installed only there.
    sys.path.insert(0, os.getcwd())
    sys.path.extend(p for p in spec.get("path", []) if p not in sys.path)
    return call(spec)


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.exit(code)
