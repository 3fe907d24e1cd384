"""The Rust fast path of the command processor (``StateStore.apply_kv_entry``) against the
Python processor, which is its definition: two stores fed the same log, one processor with the
fast path and one without, must give the same results, the same kv changes, the same audit
chain and the same state (digest and contents) after every entry.

The fast path may only *prove* the ordinary case (plain, valid, authorized puts and deletes
that replay nothing and meet their ``if_version``) and must leave everything else, having
changed nothing, to Python. So the tests also check that it is really used for the ordinary
case (``fast_entries``) and never for the rest, that a bail leaves the store untouched, and
that the store lock is held while the store changes.

Deterministic: every random choice comes from a seeded ``random.Random``.
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
from collections import Counter

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse._core import StateStore
from synapse.state import keys
from synapse.state.commands import encode_entry
from synapse.state.processor import DEDUP_CAPACITY, CommandProcessor, EntryOutcome
from synapse.state.records import KvChange

MAX_U64 = (1 << 64) - 1

# --- msgpack with a choice of forms --------------------------------------------------------------
#
# Python's reader accepts every msgpack form of a value (an int in any wide-enough int format,
# a short string as str8/str16/str32...), so entries may arrive in any of them. ``pack`` writes
# the smallest form (as msgpack.packb does) or, given an rng, a random valid one; ``Pairs``
# writes a map as given (repeated keys included); ``RawStr`` a str of arbitrary bytes.


class Pairs(list):
    """A msgpack map written as these (key, value) pairs, in order, repeats kept."""


class RawStr(bytes):
    """A msgpack str whose payload is these bytes (possibly not UTF-8)."""


class Ext:
    def __init__(self, code: int, data: bytes) -> None:
        self.code, self.data = code, data


_INT_FORMS = (
    (0xCC, ">B", 0, 0xFF), (0xCD, ">H", 0, 0xFFFF), (0xCE, ">I", 0, 0xFFFF_FFFF), (0xCF, ">Q", 0, MAX_U64),
    (0xD0, ">b", -(1 << 7), (1 << 7) - 1), (0xD1, ">h", -(1 << 15), (1 << 15) - 1),
    (0xD2, ">i", -(1 << 31), (1 << 31) - 1), (0xD3, ">q", -(1 << 63), (1 << 63) - 1),
)


def pack(obj, rng: random.Random | None = None) -> bytes:
    out = bytearray()
    _emit(obj, rng, out)
    return bytes(out)


def _pick(forms: list, rng: random.Random | None):
    return forms[0] if rng is None else rng.choice(forms)


def _head(n: int, fix: int | None, fix_limit: int, markers: tuple, rng, out: bytearray) -> None:
    """A length header: the fixed form (if it fits), then 8/16/32-bit (0 marker: no such form)."""
    forms = []
    if fix is not None and n < fix_limit:
        forms.append(("fix",))
    for marker, fmt, limit in zip(markers, (">B", ">H", ">I"), (0xFF, 0xFFFF, 0xFFFF_FFFF)):
        if marker and n <= limit:
            forms.append((marker, fmt))
    form = _pick(forms, rng)
    if form == ("fix",):
        out.append(fix | n)
    else:
        out.append(form[0])
        out += struct.pack(form[1], n)


def _emit(obj, rng, out: bytearray) -> None:
    if obj is None:
        out.append(0xC0)
    elif obj is True or obj is False:
        out.append(0xC3 if obj else 0xC2)
    elif isinstance(obj, int):
        forms = []
        if 0 <= obj < 128:
            forms.append(("fix",))
        if -32 <= obj < 0:
            forms.append(("negfix",))
        forms += [(m, f) for m, f, lo, hi in _INT_FORMS if lo <= obj <= hi]
        form = _pick(forms, rng)
        if form == ("fix",):
            out.append(obj)
        elif form == ("negfix",):
            out.append(obj & 0xFF)
        else:
            out.append(form[0])
            out += struct.pack(form[1], obj)
    elif isinstance(obj, float):
        out.append(0xCB)
        out += struct.pack(">d", obj)
    elif isinstance(obj, RawStr):
        _head(len(obj), 0xA0, 32, (0xD9, 0xDA, 0xDB), rng, out)
        out += obj
    elif isinstance(obj, str):
        data = obj.encode()
        _head(len(data), 0xA0, 32, (0xD9, 0xDA, 0xDB), rng, out)
        out += data
    elif isinstance(obj, (bytes, bytearray)):
        _head(len(obj), None, 0, (0xC4, 0xC5, 0xC6), rng, out)
        out += obj
    elif isinstance(obj, Ext):
        out += bytes([0xC7, len(obj.data), obj.code & 0xFF]) + obj.data
    elif isinstance(obj, (dict, Pairs)):
        pairs = list(obj.items()) if isinstance(obj, dict) else list(obj)
        _head(len(pairs), 0x80, 16, (0, 0xDE, 0xDF), rng, out)
        for k, v in pairs:
            _emit(k, rng, out)
            _emit(v, rng, out)
    elif isinstance(obj, (list, tuple)):
        _head(len(obj), 0x90, 16, (0, 0xDC, 0xDD), rng, out)
        for item in obj:
            _emit(item, rng, out)
    else:
        raise TypeError(type(obj))


# --- the two processors -------------------------------------------------------------------------


class CountingLock:
    """A ``threading.Lock`` that counts how often it was entered and knows whether it is held."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.enters = 0
        self.held = False

    def __enter__(self) -> CountingLock:
        self._lock.acquire()
        self.enters += 1
        self.held = True
        return self

    def __exit__(self, *exc) -> None:
        self.held = False
        self._lock.release()


class WatchedStore:
    """The real store, checking that ``apply_kv_entry`` changes nothing when it returns None,
    and (given a lock) that every change to the store happens with the lock held."""

    def __init__(self, lock: CountingLock | None = None) -> None:
        self.inner = StateStore()
        self.lock = lock
        self.fast_calls = 0
        self.bails = 0
        self.changes_unlocked = 0

    def apply_kv_entry(self, index, payload, dedup_capacity):
        self.fast_calls += 1
        if self.lock is not None and not self.lock.held:
            self.changes_unlocked += 1
        before = (self.inner.digest(), len(self.inner))
        out = self.inner.apply_kv_entry(index, payload, dedup_capacity)
        if out is None:
            self.bails += 1
            assert (self.inner.digest(), len(self.inner)) == before, "apply_kv_entry returned None yet changed things"
        return out

    def apply(self, ops):
        if self.lock is not None and not self.lock.held:
            self.changes_unlocked += 1
        return self.inner.apply(ops)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def strict(x):
    """A value with its types spelled out (True != 1, b"" != "", dict key order counts)."""
    if isinstance(x, dict):
        return ("dict", tuple((strict(k), strict(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(strict(i) for i in x))
    return (type(x).__name__, x)


def change_fields(outcome: EntryOutcome) -> list[tuple]:
    assert all(type(c) is KvChange for c in outcome.changes)
    return [strict((c.key, c.value, c.version, c.create_index, c.mod_index, c.index)) for c in outcome.changes]


def describe(payload) -> str:
    """The entry, readably and briefly, for failure messages."""
    try:
        text = repr(msgpack.unpackb(bytes(payload), raw=False))
    except Exception as exc:  # noqa: BLE001 - garbage entries are part of the test
        text = f"<undecodable ({type(exc).__name__}): {bytes(payload)[:80]!r}>"
    return text if len(text) <= 1500 else text[:1500] + "..."


class Pair:
    """``a`` with the fast path (over a WatchedStore), ``b`` without (the oracle), fed the same
    entries at the same log indexes; every entry's outcome and state are compared."""

    def __init__(self, dedup_capacity: int = DEDUP_CAPACITY, lock: CountingLock | None = None) -> None:
        self.store_a = WatchedStore(lock)
        self.a = CommandProcessor(self.store_a, dedup_capacity, store_lock=lock)
        self.b = CommandProcessor(StateStore(), dedup_capacity, kv_fast_path=False)
        self.index = 0
        self.codes: Counter = Counter()  # result kinds seen, for checking what a run covered

    def feed(self, payload, index: int | None = None) -> tuple[EntryOutcome, bool]:
        """Apply ``payload`` to both; returns a's outcome and whether the fast path applied it."""
        self.index = self.index + 1 if index is None else index
        fast_before = self.a.fast_entries
        oa = self.a.apply_entry(self.index, payload)
        ob = self.b.apply_entry(self.index, payload)
        fast = self.a.fast_entries - fast_before
        what = f"entry {self.index}: {describe(payload)}"
        assert fast in (0, 1), what
        assert self.b.fast_entries == 0, "the oracle used the fast path"
        assert strict(oa.results) == strict(ob.results), (
            f"results differ for {what}\nfast: {oa.results!r}\npython: {ob.results!r}")
        assert change_fields(oa) == change_fields(ob), (
            f"changes differ for {what}\nfast: {oa.changes!r}\npython: {ob.changes!r}")
        assert type(oa.chain) is bytes and oa.chain == ob.chain, f"chain differs for {what}"
        assert (oa.events, oa.memory) == (ob.events, ob.memory), what
        assert self.a.store.digest() == self.b.store.digest(), f"state digest differs after {what}"
        for r in ob.results:
            self.codes[r.get("error", "ok") if isinstance(r, dict) else "?"] += 1
        return oa, bool(fast)

    def run(self, *commands) -> tuple[EntryOutcome, bool]:
        return self.feed(encode_entry(commands))

    def seed(self, ops: list[tuple[bytes, bytes | None]]) -> None:
        """Write raw records into both stores (a damaged or hand-made state)."""
        self.store_a.inner.apply(ops)
        self.b.store.apply(ops)

    def assert_same_state(self) -> None:
        rows = self.a.store.scan()
        assert rows == self.b.store.scan()
        assert self.a.store.recompute_digest() == self.a.store.digest() == self.b.store.digest()
        assert self.a.store.get(keys.CHAIN) == self.b.store.get(keys.CHAIN)
        assert self.store_a.changes_unlocked == 0


# --- random entries -----------------------------------------------------------------------------

KEYS = [
    "a", "b", "c/d", " ", "a b\tc", "app/x", "app/xy", "app/secret/s", "app/tmp/t", "app/tmp/deep/z", "other/o",
    "ключ", "ключи/x", "日本/キー", "app/😀", "\u00e9" * 512, "k" * 1024,
]
BAD_KEYS = ["", "a\x00b", "\x00", "k" * 1025, "\u00e9" * 513, "😀" * 257, 5, b"a", None, ["a"]]
BIG = bytes(range(256)) * 274  # 70,144 bytes
FIXED_VALUES = [b"", b"1", b'{"a": [1, 2]}', b"\x00", b"\xff" * 31, b"v" * 255, b"w" * 256, b"x" * 65535, b"y" * 65536]


def _value(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.03:
        return BIG
    if roll < 0.25:
        return rng.choice(FIXED_VALUES[:7])
    if roll < 0.28:
        return rng.choice(FIXED_VALUES[7:])
    return rng.randbytes(rng.randrange(1, 300))


def _shuffled(rng: random.Random, fields: dict) -> dict:
    """The same command with its fields in a random order (the msgpack map's order)."""
    items = list(fields.items())
    rng.shuffle(items)
    return dict(items)


class Gen:
    """Random entries for a ``Pair``. ``auths``: (accessor, [auth_ms...]) a command may carry."""

    def __init__(self, rng: random.Random, pair: Pair, keys_=KEYS, auths=(("root", [0, 1000, MAX_U64]),)) -> None:
        self.rng = rng
        self.pair = pair
        self.keys = list(keys_)
        self.auths = list(auths)
        self.rids: list[str] = []
        self.hashes: dict[str, bytes] = {}
        self.n = 0

    def version(self, key: str, local: dict[str, int]) -> int:
        if key in local:
            return local[key]
        record = self.pair.b.get(key)
        return record.version if record else 0

    def fresh_rid(self) -> str:
        self.n += 1
        style = self.rng.randrange(5)
        if style == 0:
            rid = f"r{self.n}"
        elif style == 1:
            rid = f"rïd-{self.n}-€"
        elif style == 2:
            rid = f"{self.n}-".ljust(128, "R")  # the longest rid
        elif style == 3:
            rid = f"{self.n}-" + "é" * 100  # 128 characters or fewer, more bytes
        else:
            rid = f"z{self.n}" if self.rng.random() < 0.5 else f"A{self.n}"
        self.rids.append(rid)
        return rid

    def good(self, local: dict[str, int], *, replays: bool = True, conflicts: bool = True,
             auth: bool = True, last_rid: str | None = None, noops: float = 0.05) -> dict:
        """A valid put or delete, or now and then a noop (it may still replay a rid, conflict,
        or be refused)."""
        rng = self.rng
        key = rng.choice(self.keys)
        current = self.version(key, local)
        put = rng.random() < 0.7
        c = {"op": "put", "key": key, "value": _value(rng)} if put else {"op": "delete", "key": key}
        noop = rng.random() < noops
        if noop:
            c = {"op": "noop"}
        roll = rng.random()
        if roll < 0.45:
            if replays and last_rid is not None and rng.random() < 0.15:
                rid = last_rid  # the same rid twice in one entry
            elif replays and self.rids and rng.random() < 0.15:
                rid = rng.choice(self.rids)  # maybe applied before (maybe evicted since)
            else:
                rid = self.fresh_rid()
            c["rid"] = rid
            hroll = rng.random()
            if hroll < 0.35:
                c["request_hash"] = self.hashes.setdefault(rid, rng.randbytes(16))
            elif hroll < 0.5:
                c["request_hash"] = rng.randbytes(16)  # a reused rid with another request
        if not noop and rng.random() < 0.3:
            if conflicts and rng.random() < 0.4:
                c["if_version"] = rng.choice([current + 1, max(current - 1, 0), MAX_U64, 0 if current else 1])
                if c["if_version"] == current:
                    c["if_version"] += 1
            else:
                c["if_version"] = current
        if auth and self.auths and rng.random() < 0.3:
            accessor, times = rng.choice(self.auths)
            c["auth"], c["auth_ms"] = accessor, rng.choice(times)
        if noop:
            pass
        elif put:
            local[key] = current + 1 if c.get("if_version", current) == current else current
        elif c.get("if_version", current) == current:
            local[key] = 0
        return _shuffled(rng, c)

    def bad(self, local: dict[str, int]):
        """A command the fast path must leave to Python: invalid, another op, or odd."""
        rng = self.rng
        base = self.good(local, replays=False, conflicts=False, auth=False, noops=0)
        kind = rng.randrange(27)
        c = dict(base)
        if kind == 0:
            c[rng.choice(["ttl", "Key", "rid ", "values"])] = 3
        elif kind == 1:
            c["key"] = rng.choice(BAD_KEYS)
        elif kind == 2:
            c = {"op": "put", "key": base["key"], "value": rng.choice(["text", 5, None, [b"x"], True])}
        elif kind == 3:
            c["rid"] = rng.choice(["r" * 129, "", 5, None, "é" * 129, "e\u0301" * 65, b"rid"])
        elif kind == 4:
            c.pop("rid", None)
            c["request_hash"] = rng.randbytes(16)
        elif kind == 5:
            c["rid"] = self.fresh_rid()
            c["request_hash"] = rng.choice([rng.randbytes(15), rng.randbytes(17), "h" * 16, None])
        elif kind == 6:
            c["if_version"] = rng.choice([-1, -(1 << 63), True, False, 1.0, "1", None])
        elif kind == 7:
            c.pop("auth_ms", None)
            c["auth"] = "root"
        elif kind == 8:
            c.pop("auth", None)
            c["auth_ms"] = 1000
        elif kind == 9:
            c["auth"], c["auth_ms"] = rng.choice([
                ("root", -1), ("root", True), ("root", 1.5), ("root", None), ("a\x07b", 1), ("r" * 129, 1),
                ("", 1), (5, 1), (None, 1), ("a\u00a0b", 1), ("a\u200bb", 1),
            ])
        elif kind == 10:
            c = {"op": "noop", rng.choice(["key", "value", "if_version", "ttl"]): b"1"}
        elif kind == 11:
            then = [{"op": "put", "key": base["key"], "value": b"t"}, {"op": "get", "key": "a"}]
            c = {"op": "txn", "if": [{"key": base["key"], "exists": rng.random() < 0.5}], "then": then}
            if rng.random() < 0.5:
                c["rid"] = self.fresh_rid()
        elif kind == 12:
            c = {"op": "txn", "then": [{"op": "get", "key": base["key"]}], "rid": self.fresh_rid()}
        elif kind == 13:
            c.pop("op")
        elif kind == 14:
            c["op"] = rng.choice(["PUT", "put ", "get", b"put", 1, None, "delete" if base["op"] == "put" else "put"])
        elif kind == 15:
            c = rng.choice([[1], "put", 5, None, b"put", [base]])
        elif kind == 16:
            c = {"op": "delete", "key": base["key"], "value": b"1"}
        elif kind == 17:
            c = {"op": "put", "key": base["key"]}
        elif kind == 18:  # a repeated field: Python's reader keeps the last one
            c = Pairs([("op", "put"), ("key", base["key"]), ("value", b"1"), ("key", rng.choice(self.keys))])
        elif kind == 19:
            c = Pairs([("op", "noop"), ("op", base["op"]), *[(k, v) for k, v in base.items() if k != "op"]])
        elif kind == 20:
            c = Pairs([("op", base["op"]), *[(k, v) for k, v in base.items() if k != "op"], ("value", b"second")])
        elif kind == 21:
            c = Pairs([(b"op", "put"), ("key", base["key"]), ("value", b"1")])  # a bin field name
        elif kind == 22:
            c = {"op": "checkpoint", "label": "cp"}
        elif kind == 23:
            c = {"op": "register_node", "node_id": "n1", "api": "h:1", "raft": "h:2"}
        elif kind == 24:
            c = {}
        elif kind == 25:
            c = {"op": "put", "key": base["key"], "value": b"1", "rid": self.fresh_rid(), "auth": "t-none-such",
                 "auth_ms": 1}
        else:
            c["if_version"] = MAX_U64  # valid, conflicting at any version a test reaches
        return c

    def commands(self, bad_rate: float, max_commands: int = 12) -> list:
        out, local, last_rid = [], {}, None
        for _ in range(self.rng.randint(1, max_commands)):
            if self.rng.random() < bad_rate:
                out.append(self.bad(local))
            else:
                out.append(self.good(local, last_rid=last_rid))
                last_rid = out[-1].get("rid", last_rid)
        return out

    def garbage(self) -> bytes:
        """A whole entry that is not a schema-1 entry, or an odd-but-valid one."""
        rng = self.rng
        good = [self.good({}, replays=False, conflicts=False, noops=0)]
        valid = encode_entry(good)
        kind = rng.randrange(20)
        if kind == 0:
            return rng.randbytes(rng.randrange(0, 40))
        if kind == 1:
            return pack([rng.choice([0, 2, -1, MAX_U64]), good])
        if kind == 2:
            return pack([1, good[0]])  # the commands not a list
        if kind == 3:
            return pack(rng.choice([[1], [1, good, 3], {"a": 1}, 1, None, "entry", [], [[1, good]]]))
        if kind == 4:
            return valid + rng.choice([b"\x00", b"\xc0", valid])  # trailing bytes
        if kind == 5:
            return valid[: rng.randrange(len(valid))]  # truncated
        if kind == 6:
            return pack([rng.choice([True, 1.0, "1", b"\x01", None]), good])
        if kind == 7:
            return pack([1, []])  # no commands
        if kind == 8:
            return pack([1, [{"op": "put", "key": RawStr(b"k\xff"), "value": b"1"}]])  # not UTF-8
        if kind == 9:
            return pack([1, [{"op": "put", "key": RawStr(b"\xed\xa0\x80"), "value": b"1"}]])  # a surrogate
        if kind == 10:
            return pack([1, [{**good[0], "x": Ext(5, b"ab")}]])
        if kind == 11:
            return pack([1, [{**good[0], "value": Ext(1, b"ab")}]])
        if kind == 12:
            return pack([1, [Pairs([("op", "put"), (1, 2)])]])  # an integer map key
        if kind == 13:  # nested deeper than any command needs (Python's reader gives up past 1024)
            depth = rng.choice([31, 40, 2000])
            shallow = pack([1, [Pairs([*good[0].items(), ("x", None)])]])
            assert shallow.endswith(b"\xc0")
            return shallow[:-1] + b"\x91" * depth + b"\xc0"
        if kind == 14:
            return pack([1, [Pairs([*good[0].items(), ("x", [[[[[1]]]]])])]])
        if kind == 15:
            return pack([1, good], rng)  # valid, in random msgpack forms
        if kind == 16:
            return b"\x92\x01\xdd\xff\xff\xff\xff"  # a forged array length
        if kind == 17:
            return b"\x92\x01\x91\xdf\xff\xff\xff\xff"  # a forged map length
        if kind == 18:
            return pack([1, [{**good[0], "x": 1.5, "y": struct.unpack(">f", b"\x3f\x80\x00\x00")[0]}]])
        return pack([1, [Pairs([("op", "put"), (RawStr(b"key"), "a"), ("value", b"1")])]])

    def entry(self, bad_rate: float, garbage_rate: float, noncanonical_rate: float) -> bytes:
        if self.rng.random() < garbage_rate:
            return self.garbage()
        return encode(self.commands(bad_rate), self.rng if self.rng.random() < noncanonical_rate else None)


def encode(commands: list, rng: random.Random | None = None) -> bytes:
    """The entry as ``encode_entry`` writes it, or (given an rng, or commands it cannot write
    as they are: not maps, repeated fields, ext values) by ``pack``."""
    if rng is None and all(type(c) is dict for c in commands):
        try:
            return encode_entry(commands)
        except (TypeError, ValueError):
            pass
    return pack([1, commands], rng)


def with_root(pair: Pair) -> Pair:
    """The root principal, role and token (accessor "root"), through both processors."""
    outcome, fast = pair.run({"op": "security_bootstrap", "secret_hash": hashlib.sha256(b"root").digest(), "now_ms": 1})
    assert outcome.results[0]["created"] and not fast
    return pair


def test_the_packer_writes_what_msgpack_writes_and_reads_back():
    rng = random.Random(7)
    sample = [1, [{"op": "put", "key": "ключ" * 20, "value": b"v" * 300, "if_version": MAX_U64, "n": -(1 << 40)},
                  {"a": [None, True, False, 1.5, -1, -33, 200, 70_000, "x" * 40, b"\x00" * 70_000]}]]
    assert pack(sample) == msgpack.packb(sample, use_bin_type=True)
    for _ in range(50):
        assert msgpack.unpackb(pack(sample, rng), raw=False) == sample
    assert msgpack.unpackb(pack(Pairs([("k", 1), ("k", 2)])), raw=False) == {"k": 2}


@pytest.mark.parametrize(
    ("seed", "capacity", "entries"),
    [(1, DEDUP_CAPACITY, 400), (2, 5, 400), (3, 0, 300), (4, 1, 300), (5, 17, 300)],
)
def test_random_entries_give_what_the_python_processor_gives(seed, capacity, entries):
    rng = random.Random(seed)
    pair = with_root(Pair(capacity))
    gen = Gen(rng, pair)
    for _ in range(entries):
        pair.feed(gen.entry(bad_rate=0.04, garbage_rate=0.05, noncanonical_rate=0.1))
    pair.assert_same_state()
    # What the run covered: the fast path applied entries, and left to Python replays,
    # reused rids, conflicts, bad commands and bad entries.
    assert pair.a.fast_entries >= entries // 5, (pair.a.fast_entries, pair.codes)
    for code in ("ok", "conflict", "bad_command", "bad_entry", "request_id_reused"):
        assert pair.codes[code] > 0, (code, pair.codes)
    assert pair.store_a.bails > 0 and pair.store_a.fast_calls == entries + 1
    rid_count = keys.decode_count(pair.b.store.get(keys.RID_COUNT))
    assert rid_count == len(pair.b.store.scan_prefix(keys.RID)) == len(pair.b.store.scan_prefix(keys.RIDX))
    if capacity < DEDUP_CAPACITY:
        assert rid_count == capacity  # eviction happened


def test_mostly_bad_entries_give_what_the_python_processor_gives():
    rng = random.Random(11)
    pair = with_root(Pair(3))
    gen = Gen(rng, pair)
    for _ in range(300):
        pair.feed(gen.entry(bad_rate=0.4, garbage_rate=0.3, noncanonical_rate=0.3))
    pair.assert_same_state()


# --- the fast path is used, and only for the ordinary case ---------------------------------------


def test_the_fast_path_applies_every_ordinary_entry():
    rng = random.Random(21)
    pair = with_root(Pair(50))
    gen = Gen(rng, pair)
    entries = 250
    for i in range(entries):
        commands, local = [], {}
        for _ in range(rng.randint(1, 12)):
            commands.append(gen.good(local, replays=False, conflicts=False, noops=0))
        payload = pack([1, commands], rng) if i % 4 == 0 else encode_entry(commands)
        outcome, fast = pair.feed(payload)
        assert fast, f"the fast path left an ordinary entry to Python: {describe(payload)}"
        assert all(r["ok"] for r in outcome.results)
    assert pair.a.fast_entries == entries
    assert pair.store_a.bails == 1  # the bootstrap
    pair.assert_same_state()


def test_entries_the_fast_path_must_leave_to_python_are_not_counted():
    rng = random.Random(22)
    pair = with_root(Pair(4))
    gen = Gen(rng, pair)
    # A history to replay and conflict with.
    for _ in range(30):
        pair.run(*[gen.good({}, replays=False, conflicts=False) for _ in range(3)])
    applied_rid = next(r for r in gen.rids if pair.b.store.get(keys.rid_key(r)) is not None)
    first = keys.decode_rid_record(pair.b.store.get(keys.rid_key(applied_rid)))
    existing = next(k for k in KEYS[2:] if pair.b.get(k) is not None)
    version = pair.b.get(existing).version
    ordinary = {"op": "put", "key": "fresh", "value": b"1"}
    spoilers = [
        {"op": "put", "key": "a", "value": b"2", "rid": applied_rid},  # a replay
        {"op": "put", "key": "a", "value": b"2", "rid": applied_rid, "request_hash": b"\x01" * 16},
        {"op": "put", "key": existing, "value": b"2", "if_version": version + 1},  # a conflict
        {"op": "delete", "key": existing, "if_version": 0},
        {"op": "put", "key": "missing-key", "value": b"2", "if_version": 3},
        {"op": "put", "key": "a", "value": b"2", "ttl": 5},
        {"op": "put", "key": "", "value": b"2"},
        {"op": "noop", "rid": applied_rid},
        {"op": "noop", "auth": "t-none-such", "auth_ms": 1},
        {"op": "noop", "if_version": 0},
        {"op": "txn", "then": [{"op": "put", "key": "a", "value": b"t"}]},
        {"op": "put", "key": "a", "value": b"2", "auth": "t-none-such", "auth_ms": 1},
        {"op": "put", "key": "a", "value": "not bytes"},
        {"op": "delete", "key": "a", "auth": "root"},
    ]
    for spoiler in spoilers:
        for commands in ([spoiler], [ordinary, spoiler], [spoiler, ordinary, ordinary]):
            outcome, fast = pair.run(*commands)
            assert not fast, f"the fast path applied {commands!r}: {outcome.results!r}"
    # A replay is answered with the first result (by Python).
    outcome, fast = pair.run(put("a"), {"op": "put", "key": "zzz", "value": b"9", "rid": applied_rid})
    assert outcome.results[1] == first[1] and not fast
    for n in range(3):  # a rid used twice in one entry: the second command replays the first
        outcome, fast = pair.run(put("a", b"2", rid=f"twice-{n}"), *[ordinary] * n, put("b", b"3", rid=f"twice-{n}"))
        assert not fast and outcome.results[-1] == outcome.results[0]
    # Garbage and odd entries are not counted either.
    for payload in (b"", b"\xc1", pack([1, []]), pack([2, [ordinary]]), encode_entry([ordinary]) + b"\x00"):
        _, fast = pair.feed(payload)
        assert not fast
    # A payload that is not bytes goes to Python (which accepts bytes-like payloads).
    before = pair.a.fast_entries
    index = pair.index + 1
    oa = pair.a.apply_entry(index, bytearray(encode_entry([ordinary])))
    ob = pair.b.apply_entry(index, bytearray(encode_entry([ordinary])))
    pair.index = index
    assert strict(oa.results) == strict(ob.results) and oa.chain == ob.chain
    assert pair.a.fast_entries == before
    pair.assert_same_state()


def test_the_fast_path_off_never_calls_rust():
    store = WatchedStore()
    proc = CommandProcessor(store, kv_fast_path=False)
    for i in range(1, 6):
        assert proc.apply_entry(i, encode_entry([{"op": "put", "key": "a", "value": b"1"}])).results[0]["ok"]
    assert store.fast_calls == 0 and proc.fast_entries == 0
    assert CommandProcessor(StateStore()).fast_entries == 0


# --- directed cases -----------------------------------------------------------------------------


def put(key, value=b"v", **extra):
    return {"op": "put", "key": key, "value": value, **extra}


def delete(key, **extra):
    return {"op": "delete", "key": key, **extra}


def test_a_key_put_deleted_and_put_again_in_one_entry():
    pair = Pair()
    pair.run(put("k", b"old"))
    outcome, fast = pair.run(put("k", b"two", rid="r1"), delete("k"), put("k", b"new", if_version=0))
    assert fast
    assert outcome.results == [
        {"ok": True, "key": "k", "version": 2, "index": 2},
        {"ok": True, "key": "k", "deleted": True, "index": 2},
        {"ok": True, "key": "k", "version": 1, "index": 2},
    ]
    assert [tuple(vars_of(c)) for c in outcome.changes] == [
        ("k", b"two", 2, 1, 2, 2), ("k", None, 0, 0, 0, 2), ("k", b"new", 1, 2, 2, 2),
    ]
    record = pair.a.get("k")
    assert (record.value, record.version, record.create_index, record.mod_index) == (b"new", 1, 2, 2)
    pair.assert_same_state()


def vars_of(c: KvChange) -> tuple:
    return (c.key, c.value, c.version, c.create_index, c.mod_index, c.index)


def test_two_puts_of_one_key_in_one_entry():
    pair = Pair()
    outcome, fast = pair.run(put("k", b"1"), put("k", b"2", if_version=1))
    assert fast
    assert [r["version"] for r in outcome.results] == [1, 2]
    assert [vars_of(c) for c in outcome.changes] == [("k", b"1", 1, 1, 1, 1), ("k", b"2", 2, 1, 1, 1)]
    pair.assert_same_state()


def test_a_delete_of_a_missing_key():
    pair = Pair()
    outcome, fast = pair.run(delete("nothing"))
    assert fast
    assert outcome.results == [{"ok": True, "key": "nothing", "deleted": False, "index": 1}]
    assert outcome.changes == []
    outcome, fast = pair.run(put("k"), delete("k"), delete("k", rid="r"))
    assert fast and [r["deleted"] for r in outcome.results[1:]] == [True, False]
    assert [vars_of(c) for c in outcome.changes] == [("k", b"v", 1, 2, 2, 2), ("k", None, 0, 0, 0, 2)]
    pair.assert_same_state()


def test_noops_among_puts_and_deletes():
    pair = with_root(Pair(2))
    for commands in (
        [{"op": "noop"}],
        [{"op": "noop", "rid": "n1"}, put("a", rid="p1"), {"op": "noop", "auth": "root", "auth_ms": 5}],
        [put("a"), {"op": "noop", "rid": "n2", "request_hash": b"q" * 16}, delete("a")],
    ):
        _, fast = pair.run(*commands)
        assert fast, commands
    outcome, fast = pair.run({"op": "noop", "rid": "n2"})  # a replay
    assert not fast and outcome.results[0]["index"] == 4
    _, fast = pair.run({"op": "noop", "rid": "n2", "request_hash": b"x" * 16})  # reused
    assert not fast
    pair.assert_same_state()


def _rids(pair: Pair) -> list[str]:
    return [k[len(keys.RID):].decode() for k, _ in pair.a.store.scan_prefix(keys.RID)]


def test_the_dedup_table_at_and_beyond_its_capacity():
    pair = Pair(3)
    _, fast = pair.run(put("a", rid="r1"), put("b", rid="r2"), put("c", rid="r3"))
    assert fast and _rids(pair) == ["r1", "r2", "r3"]  # exactly at capacity: nothing evicted
    assert pair.a.store.get(keys.RID_COUNT) == keys.encode_count(3)
    _, fast = pair.run(put("a"), delete("zz"))  # no rid: the table is untouched
    assert fast and _rids(pair) == ["r1", "r2", "r3"]
    # Four new ones at one index, in rid byte order "a" < "b" < "z" < "é": the three old ones and
    # the smallest new one go.
    _, fast = pair.run(put("a", rid="b"), put("b", rid="é"), delete("c", rid="a"), put("d", rid="z"))
    assert fast and _rids(pair) == ["b", "z", "é"]
    assert [keys.split_ridx(k) for k, _ in pair.a.store.scan_prefix(keys.RIDX)] == [(3, "b"), (3, "z"), (3, "é")]
    assert pair.a.store.get(keys.RID_COUNT) == keys.encode_count(3)
    # An evicted rid is new again; a kept one replays.
    _, fast = pair.run(put("a", rid="r1"))
    assert fast
    outcome, fast = pair.run(put("a", b"other", rid="z"))
    assert not fast and outcome.results[0]["index"] == 3
    pair.assert_same_state()


def test_a_dedup_table_of_capacity_zero_keeps_nothing_but_its_count():
    pair = Pair(0)
    _, fast = pair.run(put("a", rid="r1"), put("a", rid="r2", request_hash=b"h" * 16))
    assert fast and _rids(pair) == [] and pair.a.store.scan_prefix(keys.RIDX) == []
    assert pair.a.store.get(keys.RID_COUNT) == keys.encode_count(0)
    _, fast = pair.run(put("a", rid="r1"))  # evicted at once, so no replay
    assert fast
    outcome, fast = pair.run(put("a", rid="r3"), put("b", rid="r3"))  # but within an entry it is
    assert not fast and outcome.results[1] == outcome.results[0]
    pair.assert_same_state()


def test_a_long_entry_evicts_many_request_ids_at_once():
    rng = random.Random(51)
    pair = Pair(10)
    _, fast = pair.run(*[put(f"k{i % 7}", rid=f"first-{i}") for i in range(8)])
    assert fast
    commands = [put(f"k{i % 7}", str(i).encode(), rid=rng.choice([f"r{i}", f"ŕ{i}", f"{i:03}"])) if i % 5
                else delete(f"k{i % 7}") for i in range(300)]
    _, fast = pair.run(*commands)
    assert fast
    assert len(_rids(pair)) == 10 and pair.a.store.get(keys.RID_COUNT) == keys.encode_count(10)
    pair.assert_same_state()


def test_log_indexes_at_the_ends_of_the_range():
    for index in (0, 1 << 32, 1 << 63, MAX_U64):
        pair = Pair(1)
        outcome, fast = pair.feed(encode_entry([put("k", rid="r1"), put("k", rid="r2"), delete("k")]), index)
        assert fast and outcome.results[0]["index"] == index
        pair.assert_same_state()


def test_a_dedup_capacity_beyond_64_bits_is_applied_like_any_other():
    # The processor accepts any integer >= 0 as the capacity, and apply_entry never raises.
    for capacity in (MAX_U64, 1 << 64, 1 << 100):
        pair = Pair(capacity)
        pair.run(put("k", rid="r1"), delete("k", rid="r2"))
        pair.run(put("k", rid="r1"))
        pair.assert_same_state()


def test_values_and_keys_at_their_limits():
    pair = Pair()
    limit = b"m" * (1 << 20)
    _, fast = pair.run(put("k" * 1024, limit), put("\u00e9" * 512, b""), put("😀" * 256, BIG))
    assert fast
    _, fast = pair.run(put("k", limit + b"x"))  # over the limit: Python refuses it
    assert not fast
    _, fast = pair.run(put("\u00e9" * 513, b"1"))  # 513 characters, 1026 bytes
    assert not fast
    _, fast = pair.run(put("k", rid="é" * 128), put("k", rid="😀" * 128))  # 128 characters
    assert fast
    _, fast = pair.run(put("k", rid="e\u0301" * 65))  # 130 code points, 65 graphemes
    assert not fast
    pair.assert_same_state()


# --- tokens ---------------------------------------------------------------------------------------

EXPIRES = 5_000


def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _security_pair() -> Pair:
    """A Pair whose stores hold the same principals, roles and tokens, set up through Python."""
    pair = Pair(8)

    def ok(command, by="root"):
        if by is not None:
            command = dict(command, auth=by, auth_ms=1000)
        outcome, fast = pair.run(command)
        assert outcome.results[0]["ok"], (command, outcome.results)
        assert not fast
        return outcome.results[0]

    ok({"op": "security_bootstrap", "secret_hash": _hash("root"), "now_ms": 1000}, by=None)
    roles = {
        "app-writer": (["kv:write:app/", "kv:read:app/"], []),
        "writer-all": (["kv:write"], ["kv:write:app/secret/"]),
        "star": (["*"], []),
        "gone": (["kv:write:"], []),
        "deny-all": (["kv:write:"], ["*"]),
        "mixed": (["task:submit", "kv:read:", "memory:write:x", "task:fs:/data", "kv:write:ключ", "cluster:admin"],
                  []),
        "other-deny": (["kv:write:"], ["kv:read:", "memory:write:", "task:fs:/", "worker"]),
    }
    for name, (allow, deny) in roles.items():
        ok({"op": "role_put", "name": name, "allow": allow, "deny": deny})
    principals = {
        "alice": ["app-writer"], "bob": ["writer-all"], "dave": ["gone"], "erin": ["deny-all"], "gina": [],
        "hank": ["missing-role", "star"], "ünï": ["star"], "mona": ["mixed"], "olga": ["other-deny"],
    }
    for name, member_of in principals.items():
        ok({"op": "principal_put", "name": name, "kind": "person", "roles": member_of, "now_ms": 1000})
    ok({"op": "principal_put", "name": "alice-agent", "kind": "agent", "roles": ["app-writer"], "owner": "alice",
        "now_ms": 1000})

    def token(accessor, principal, allow, by="root", **extra):
        result = ok({"op": "token_create", "accessor": accessor, "secret_hash": _hash(accessor),
                     "principal": principal, "allow": allow, "now_ms": 1000, **extra}, by)
        return result["parent"]

    token("t-app", "alice", ["kv:write:app/"])
    token("t-deny", "bob", ["*"], deny=["kv:write:app/tmp/"])
    token("t-exp", "alice", ["kv:write:app/"], expires_ms=EXPIRES)
    assert token("t-child", "alice-agent", ["kv:write:app/tmp/"], by="t-app") == "t-app"
    assert token("t-grand", "alice-agent", ["kv:write:app/tmp/deep/"], by="t-child") == "t-child"
    assert token("t-exp-child", "alice", ["kv:write:app/x"], by="t-exp") == "t-exp"
    token("t-rev", "alice", ["kv:write:app/"])
    token("t-rev-child", "alice", ["kv:write:app/"], by="t-rev")
    token("t-gone", "dave", ["kv:write:"])
    token("t-erin", "erin", ["*"])
    token("t-gina", "gina", ["kv:write:"])
    token("t-hank", "hank", ["kv:write:"])
    token("токен", "ünï", ["kv:write:"])
    token("t-mona", "mona", ["*"])
    token("t-olga", "olga", ["kv:write:", "kv:read:"], deny=["memory:read:", "checkpoint"])
    token("t space", "alice", ["kv:write:app/"])
    token("T" * 128, "alice", ["kv:write:app/"])
    token("t-wide-deny", "bob", ["kv:write:"], deny=["kv:write"])
    token("t-kvread", "alice", ["kv:read:"])
    token("t-exact", "alice", ["kv:write:app/x"])
    token("t-late", "alice", ["kv:write:app/"], expires_ms=MAX_U64)
    assert token("t-c1", "alice", ["kv:write:app/"]) is None  # an administrator's: a root of its own
    for n in range(2, 11):  # a parent chain of ten tokens: the tenth is one too many
        assert token(f"t-c{n}", "alice", ["kv:write:app/"], by=f"t-c{n - 1}") == f"t-c{n - 1}"
    assert ok({"op": "token_revoke", "accessor": "t-rev"})["revoked"] == 2
    ok({"op": "role_delete", "name": "gone"})
    return pair


# (accessor, key, auth_ms, the oracle's verdict); "ok" rows with an ASCII accessor must be fast.
TOKEN_CASES = [
    ("root", "app/x", 0, "ok"), ("root", "ключ", MAX_U64, "ok"),
    ("t-app", "app/x", 1000, "ok"), ("t-app", "app/secret/s", 1000, "ok"), ("t-app", "other/o", 1000, "forbidden"),
    ("t-app", "ключ", 1000, "forbidden"), ("t-app", "app", 1000, "forbidden"),
    ("t-deny", "other/o", 1000, "ok"), ("t-deny", "app/x", 1000, "ok"), ("t-deny", "ключ", 1000, "ok"),
    ("t-deny", "app/secret/s", 1000, "forbidden"), ("t-deny", "app/tmp/t", 1000, "forbidden"),
    ("t-deny", "app/tmp/deep/z", 1000, "forbidden"),
    ("t-exp", "app/x", EXPIRES - 1, "ok"), ("t-exp", "app/x", EXPIRES, "unauthorized"),
    ("t-exp", "app/x", EXPIRES + 1, "unauthorized"), ("t-exp", "other/o", 1000, "forbidden"),
    ("t-exp-child", "app/x", EXPIRES - 1, "ok"), ("t-exp-child", "app/xy", 0, "ok"),
    ("t-exp-child", "app/tmp/t", 1000, "forbidden"), ("t-exp-child", "app/x", EXPIRES, "unauthorized"),
    ("t-child", "app/tmp/t", 1000, "ok"), ("t-child", "app/tmp/deep/z", MAX_U64, "ok"),
    ("t-child", "app/x", 1000, "forbidden"),
    ("t-grand", "app/tmp/deep/z", 1000, "ok"), ("t-grand", "app/tmp/t", 1000, "forbidden"),
    ("t-rev", "app/x", 1000, "unauthorized"), ("t-rev-child", "app/x", 1000, "unauthorized"),
    ("t-gone", "app/x", 1000, "forbidden"), ("t-erin", "other/o", 1000, "forbidden"),
    ("t-gina", "a", 1000, "forbidden"), ("t-hank", "a", 1000, "ok"),
    ("токен", "ключ", 1000, "ok"),
    ("t-mona", "ключ", 1000, "ok"), ("t-mona", "ключи/x", 1000, "ok"), ("t-mona", "app/x", 1000, "forbidden"),
    ("t-olga", "app/secret/s", 1000, "ok"),
    ("t space", "app/x", 1000, "ok"), ("T" * 128, "app/xy", 1000, "ok"), ("t-late", "app/x", MAX_U64 - 1, "ok"),
    ("t-late", "app/x", MAX_U64, "unauthorized"),
    ("t-c1", "app/x", 1000, "ok"), ("t-c9", "app/x", 1000, "ok"), ("t-c9", "b", 1000, "forbidden"),
    ("t-c10", "app/x", 1000, "unauthorized"),
    ("t-wide-deny", "a", 1000, "forbidden"), ("t-kvread", "app/x", 1000, "forbidden"),
    ("t-exact", "app/x", 1000, "ok"), ("t-exact", "app/xy", 1000, "ok"), ("t-exact", "app/", 1000, "forbidden"),
    ("t-none-such", "app/x", 1000, "unauthorized"),
]


def test_tokens_grant_and_refuse_as_the_python_processor_decides():
    pair = _security_pair()
    for n, (accessor, key, now, verdict) in enumerate(TOKEN_CASES):
        for command in (put(key, b"1", auth=accessor, auth_ms=now), delete(key, auth=accessor, auth_ms=now),
                        put(key, b"2", rid=f"tok-{n}", request_hash=b"h" * 16, auth=accessor, auth_ms=now)):
            outcome, fast = pair.run(command)
            result = outcome.results[0]
            assert result.get("error", "ok") == verdict, (command, result)
            if verdict != "ok":
                assert not fast, (command, result)
            elif accessor.isascii():
                assert fast, f"the fast path did not prove {command!r}"
        # A noop needs no scope, only a live token.
        outcome, fast = pair.run({"op": "noop", "auth": accessor, "auth_ms": now})
        noop_verdict = "unauthorized" if verdict == "unauthorized" else "ok"
        assert outcome.results[0].get("error", "ok") == noop_verdict, (accessor, now, outcome.results)
        if noop_verdict != "ok":
            assert not fast
        elif accessor.isascii():
            assert fast
        # Among ordinary commands: a refusal leaves the whole entry to Python.
        outcome, fast = pair.run(put("a"), put(key, b"3", auth=accessor, auth_ms=now),
                                 delete("b", auth="root", auth_ms=1))
        assert outcome.results[1].get("error", "ok") == verdict
        if verdict != "ok":
            assert not fast
        elif accessor.isascii():
            assert fast
    pair.assert_same_state()


def test_random_entries_with_tokens_give_what_the_python_processor_gives():
    pair = _security_pair()
    rng = random.Random(31)
    times = [0, 1000, EXPIRES - 1, EXPIRES, EXPIRES + 1, MAX_U64]
    accessors = sorted({row[0] for row in TOKEN_CASES})
    gen = Gen(rng, pair, keys_=sorted({row[1] for row in TOKEN_CASES} | {"a", "b"}),
              auths=[(a, times) for a in accessors])
    fast = 0
    for _ in range(250):
        commands, local = [], {}
        for _ in range(rng.randint(1, 5)):
            c = gen.good(local) if rng.random() < 0.95 else gen.bad(local)
            if isinstance(c, dict) and c.get("op") in ("put", "delete") and "auth" not in c and rng.random() < 0.8:
                c["auth"], c["auth_ms"] = rng.choice(accessors), rng.choice(times)
            commands.append(c)
        fast += pair.feed(encode(commands))[1]
    assert fast > 20, fast
    for code in ("ok", "forbidden", "unauthorized"):
        assert pair.codes[code] > 0, pair.codes
    pair.assert_same_state()


# --- a damaged or hand-made state -----------------------------------------------------------------


def _token_record(principal="alice", allow=("*",), deny=(), expires_ms=None, parent=None) -> dict:
    return {"hash": _hash("x"), "principal": principal, "allow": list(allow), "deny": list(deny),
            "expires_ms": expires_ms, "parent": parent, "created_ms": 1, "label": None}


def _with_pairs(record: dict, *extra) -> Pairs:
    return Pairs([*record.items(), *extra])


# name -> raw records written into both stores; every command below then uses token "t-x"
DAMAGED = {
    "token not a map": [(b"sec/t/t-x", pack([1, 2]))],
    "token missing its hash": [(b"sec/t/t-x", pack({k: v for k, v in _token_record().items() if k != "hash"}))],
    "token missing deny": [(b"sec/t/t-x", pack({k: v for k, v in _token_record().items() if k != "deny"}))],
    "token allow a string": [(b"sec/t/t-x", pack(_token_record() | {"allow": "*"}))],
    "token allow not a scope": [(b"sec/t/t-x", pack(_token_record(allow=["*", "bogus"])))],
    "token deny not a scope": [(b"sec/t/t-x", pack(_token_record(deny=["kv:writer"])))],
    "token scope too long": [(b"sec/t/t-x", pack(_token_record(allow=["kv:write:" + "a" * 1200])))],
    "token expiry text": [(b"sec/t/t-x", pack(_token_record(expires_ms="5000")))],
    "token expiry true": [(b"sec/t/t-x", pack(_token_record(expires_ms=True)))],
    "token expiry negative": [(b"sec/t/t-x", pack(_token_record(expires_ms=-1)))],
    "token expiry float": [(b"sec/t/t-x", pack(_token_record(expires_ms=5000.5)))],
    "token principal none": [(b"sec/t/t-x", pack(_token_record(principal=None)))],
    "token principal int": [(b"sec/t/t-x", pack(_token_record(principal=3)))],
    "token parent int": [(b"sec/t/t-x", pack(_token_record(parent=3)))],
    "token parent missing": [(b"sec/t/t-x", pack(_token_record(parent="t-gone")))],
    "token parent itself": [(b"sec/t/t-x", pack(_token_record(parent="t-x")))],
    "token trailing bytes": [(b"sec/t/t-x", pack(_token_record()) + b"\x00")],
    "token bin field names": [(b"sec/t/t-x", pack(Pairs([(k.encode(), v) for k, v in _token_record().items()])))],
    "principal missing": [(b"sec/t/t-x", pack(_token_record(principal="nobody")))],
    "principal roles a string": [(b"sec/p/alice", pack({"kind": "person", "roles": "star"}))],
    "principal roles ints": [(b"sec/p/alice", pack({"kind": "person", "roles": [1]}))],
    "principal no roles": [(b"sec/p/alice", pack({"kind": "person"}))],
    "role not a map": [(b"sec/r/star", pack(["*"]))],
    "role missing deny": [(b"sec/r/star", pack({"allow": ["*"]}))],
    "role bad scope": [(b"sec/r/star", pack({"allow": ["*", "nope"], "deny": []}))],
    "kv record garbage": [(b"kv/app/x", b"\xc1")],
    "kv record short": [(b"kv/app/x", pack([b"v", 1, 1]))],
    "kv record text value": [(b"kv/app/x", pack(["v", 1, 1, 1]))],
    "kv record bool version": [(b"kv/app/x", pack([b"v", True, 1, 1]))],
    "kv record negative version": [(b"kv/app/x", pack([b"v", -1, 1, 1]))],
    "kv record version at the top": [(b"kv/app/x", pack([b"v", MAX_U64, 1, 1]))],
    "kv record negative create index": [(b"kv/app/x", pack([b"v", 1, -5, 1]))],
    "kv record float mod index": [(b"kv/app/x", pack([b"v", 1, 1, 1.0]))],
    "rid count negative": [(keys.RID_COUNT, pack(-1))],
    "rid count text": [(keys.RID_COUNT, pack("3"))],
    "rid count bool": [(keys.RID_COUNT, pack(True))],
    "rid count wrong": [(keys.RID_COUNT, pack(50))],
    # (the oldest ridx/ keys: evicted first)
    "ridx key without index": [(b"ridx/\x00", b""), (keys.RID_COUNT, pack(2))],
    "ridx key not UTF-8": [(keys.RIDX + bytes(8) + b"\xff", b""), (keys.RID_COUNT, pack(2))],
    "rid record garbage": [(b"rid/r-old", b"\xc1")],
    "chain short": [(keys.CHAIN, pack([3, b"short"]))],
    "chain not a list": [(keys.CHAIN, pack("chain"))],
    "chain garbage": [(keys.CHAIN, b"\xc1")],
    "chain long": [(keys.CHAIN, pack([3, b"c" * 33]))],
    "chain index text": [(keys.CHAIN, pack(["3", b"c" * 32]))],
}


def _damaged_commands() -> list[list[dict]]:
    return [
        [put("app/x", b"1", auth="t-x", auth_ms=1000)],
        [put("app/x", b"1", rid="r-new", auth="t-x", auth_ms=1000)],
        [delete("app/x", auth="t-x", auth_ms=1000)],
        [put("app/x", b"1")],
        [delete("app/x")],
        [put("app/x", b"1", rid="r-old", request_hash=b"q" * 16)],
        [put("b", b"1", rid="r-a"), put("c", b"1", rid="r-b")],
        [put("app/x", b"1", auth="root", auth_ms=1000)],
    ]


def _base_security(pair: Pair) -> None:
    pair.run({"op": "security_bootstrap", "secret_hash": _hash("root"), "now_ms": 1000})
    for cmd in ({"op": "role_put", "name": "star", "allow": ["*"], "deny": []},
                {"op": "principal_put", "name": "alice", "kind": "person", "roles": ["star"], "now_ms": 1000}):
        assert pair.run(dict(cmd, auth="root", auth_ms=1000))[0].results[0]["ok"]
    pair.seed([(b"sec/t/t-x", pack(_token_record()))])


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_state_gives_what_the_python_processor_gives(damage):
    pair = Pair(2)
    _base_security(pair)
    pair.seed(DAMAGED[damage])
    for commands in _damaged_commands():
        pair.run(*commands)
    pair.assert_same_state()


# Records with a repeated field: Python's reader keeps the last value. (Only a damaged or
# forged state holds them: keys.pack never writes one.)
REPEATED = {
    "token allow": [(b"sec/t/t-x", pack(_with_pairs(_token_record(), ("allow", ["kv:read:"]))))],
    "token deny": [(b"sec/t/t-x", pack(_with_pairs(_token_record(), ("deny", ["kv:write:"]))))],
    "token expires_ms": [(b"sec/t/t-x", pack(_with_pairs(_token_record(), ("expires_ms", 10))))],
    "token principal": [(b"sec/t/t-x", pack(_with_pairs(_token_record(), ("principal", "nobody"))))],
    "token parent": [(b"sec/t/t-x", pack(_with_pairs(_token_record(), ("parent", "t-gone"))))],
    "role deny": [(b"sec/r/star", pack(Pairs([("allow", ["*"]), ("deny", []), ("deny", ["*"])])))],
    "principal roles": [(b"sec/p/alice", pack(Pairs([("kind", "person"), ("roles", ["star"]), ("roles", [])])))],
}


@pytest.mark.parametrize("damage", sorted(REPEATED))
def test_a_record_with_a_repeated_field_is_read_as_python_reads_it(damage):
    pair = Pair(2)
    _base_security(pair)
    pair.seed(REPEATED[damage])
    pair.run(put("app/x", b"1", auth="t-x", auth_ms=1000))
    pair.assert_same_state()


# --- the store lock -------------------------------------------------------------------------------


def test_the_store_lock_is_held_whenever_the_store_changes():
    lock = CountingLock()
    pair = with_root(Pair(6, lock=lock))
    gen = Gen(random.Random(41), pair)
    for i in range(150):
        before = lock.enters
        if i % 3 == 0:
            payload = encode_entry([gen.good({}, replays=False, conflicts=False)])
        else:
            payload = gen.entry(bad_rate=0.1, garbage_rate=0.05, noncanonical_rate=0.1)
        _, fast = pair.feed(payload)
        assert not lock.held
        assert lock.enters - before >= 1, "an entry changed the store without taking the lock"
        if fast:
            assert lock.enters - before == 1  # the one Rust call, nothing else
    assert pair.store_a.changes_unlocked == 0
    assert pair.a.fast_entries >= 50 and pair.store_a.bails > 0
    pair.assert_same_state()


# --- hypothesis: command-shaped documents of any content --------------------------------------

_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.binary(max_size=20)
    | st.text(max_size=12) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# A valid put, delete or noop, with optional fields (valid values, and then a few at a limit),
# and now and then one field replaced by anything at all: most documents get past the first
# checks, so the fast path is reached, and the broken ones probe each check.
_OPTIONAL = {
    "key": st.sampled_from(["k", "a/b", "é", "x" * 1024, "x" * 1025, "k\x00", ""]),
    "value": st.binary(max_size=30),
    "if_version": st.integers(min_value=0, max_value=3),
    "rid": st.sampled_from(["r1", "r2", "é" * 128, "e" * 129]),
    "request_hash": st.binary(min_size=15, max_size=17),
    "auth": st.sampled_from(["root", "nobody"]),
    "auth_ms": st.integers(min_value=0, max_value=2**64 - 1),
}


def _command(op: str, extras: dict, broken: dict) -> dict:
    command = {"op": op}
    if op != "noop":
        command["key"] = "k"
    if op == "put":
        command["value"] = b"1"
    return {**command, **extras, **broken}


_COMMANDS = st.builds(
    _command,
    st.sampled_from(["put", "delete", "noop"]),
    st.fixed_dictionaries({}, optional=_OPTIONAL),
    st.just({}) | st.dictionaries(st.sampled_from([*_OPTIONAL, "op", "ttl"]), _ANY, max_size=1),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_COMMANDS, min_size=1, max_size=4), min_size=1, max_size=4))
def test_any_command_shaped_entries_give_what_the_python_processor_gives(entries):
    pair = Pair(dedup_capacity=2)
    pair.feed(encode_entry([{"op": "security_bootstrap", "secret_hash": bytes(32), "now_ms": 1}]))
    for commands in entries:
        try:
            payload = msgpack.packb([1, commands], use_bin_type=True)
        except (OverflowError, ValueError):  # an integer msgpack cannot carry
            continue
        pair.feed(payload)
    pair.assert_same_state()
