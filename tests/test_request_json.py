"""Request bodies are parsed by orjson where it agrees with Python's json and by json where it
does not (synapse/api/common.py, _loads): the result must always be exactly json.loads's —
same values, same types (an int stays an int however long), same errors."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse.api.common import ApiError, _loads, parse_json_object

_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2 ** 70), 2 ** 70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text())
_documents = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=30)


def _same(a, b) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0 here), NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@settings(max_examples=400, deadline=None)
@given(_documents, st.booleans())
def test_any_document_parses_exactly_as_json_does(doc, ascii_only):
    raw = json.dumps(doc, ensure_ascii=ascii_only).encode()
    assert _same(_loads(raw), json.loads(raw))


@pytest.mark.parametrize("raw", [
    b"123456789012345678901234567890", b"-9223372036854775809", b"18446744073709551616", b"[1e400]",
    b'{"a": NaN, "b": -Infinity}', b'"\\ud800"', b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16"),
    b'{"a": 1, "a": 2}', b"-0", b"-0.0", b"1E2", b'{"v": [0.1, 1e-7, 5]}', b"  {}  ",
])
def test_what_orjson_reads_differently_or_refuses_reads_as_json_does(raw):
    assert _same(_loads(raw), json.loads(raw))


@pytest.mark.parametrize("raw", [b"{", b"[1,]", b"{'a': 1}", b"\xff", b"[" * 5000 + b"]" * 5000])
def test_bad_json_is_refused_with_a_400(raw):
    with pytest.raises(ApiError) as e:
        parse_json_object(raw, {"a"})
    assert e.value.status == 400
