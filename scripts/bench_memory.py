"""Benchmarks agent memory (synapse/memory) on one real local node, against bare Chroma, in one run.

Prints one JSON object (and writes it to --json FILE). Every figure comes from the same run on
the same machine:

- ``embed_per_s``: ``Embedder().embed`` in this process (one onnxruntime thread, as a node runs
  it), realistic short sentences, batches of 32; ``embed_per_s_all_threads`` with one thread
  per core.
- ``remember_per_s_single`` (+ p50/p99): ``PUT /v1/memory/{ns}/{id}`` with one text each (the
  node embeds it), ``--clients`` concurrent clients, ``--duration`` s after ``--warmup``.
- ``remember_per_s_batched``: ``POST /v1/memory/{ns}`` with 256 texts per batch (the node
  embeds them), ``--clients`` concurrent clients, a fixed amount of work sized to take about
  ``--duration`` s; records acknowledged / (last answer - first send).
- ``remember_vectors_per_s_batched``: the same with caller-supplied 384-dimension vectors
  (no embedding), ``--duration`` s after ``--warmup``.
- Per size N of ``--sizes`` (a fresh node, a fresh data dir, for each): N records with
  caller-supplied vectors loaded in batches of 256 by ``--load-clients`` clients
  (``load_records_per_s``: until every batch is acknowledged; ``load_indexed_s``: until a
  linearizable recall answers, i.e. the node's Chroma index holds everything); the node's RSS;
  then ``--queries`` recall queries sent as ``vector`` (so no query embedding), k=10, by
  ``--clients`` clients through the full HTTP path, with ``consistency=linearizable`` and
  separately ``stale``: p50/p99/mean and ``recall_per_s``. The same vectors in a bare
  ``chromadb.PersistentClient`` (its own temp dir, cosine space, Chroma's HNSW defaults, the
  same 1,000-record upserts the node makes) queried in this process with the same query
  vectors from ``--clients`` threads: its p50/p99/mean, and ``overhead_p99_ratio`` = Synapse's
  linearizable p99 / bare p99. The queries are split into ``--rounds`` rounds; each round runs
  its share as linearizable, stale and bare, the order reversed every other round, so a burst
  of outside load falls on all three alike (``overhead_p99_ratio_per_round`` shows the spread). ``recall_at_10``: over 200 of the queries, the share of the
  exact top 10 (numpy brute-force cosine over the same vectors) that Synapse's recall returned
  (the bare figure beside it).
- ``index_rebuild_s_100k`` (the largest size; named ``_100k`` only when that size is 100,000;
  ``index_rebuild`` always has the detail): the node is stopped (SIGTERM), its
  ``<data_dir>/memory-index`` deleted, the node started again; seconds from the start of the
  process until a linearizable recall answers with the right records (the 10 results the
  probe query got before the stop, at least 9 of them), then recall@10 again over the rebuilt
  index. Just before, the same restart with the index kept (``plain_restart``): the node's own
  start (replaying its Raft log) is most of the figure, so ``rebuild_minus_plain_restart_s``
  says what the rebuild adds.

The vectors: 4,096 generated agent-memory sentences embedded with the node's model
(all-MiniLM-L6-v2) are the base; record i is normalize(e_a + w e_b + n) with a, b random base
sentences, w ~ U(0, 0.5) and n ~ N(0, 0.01^2 I) (a continuous, clustered cloud on the model's
own manifold, not random points); queries are embeddings of other generated sentences (none in
the base). Vectors travel as JSON rounded to 6 decimals: a batch of 256 x 384 at full float32
precision is ~1.2-2.1 MB of JSON, over the API's 1.06 MiB body limit (see ``notes``); every
comparison (bare Chroma, exact top 10) uses the same rounded vectors.

The load generator is this process (asyncio + uvloop + aiohttp, one request in flight per
client, request bodies prepared before the clock starts); its CPU and the node's over each
phase are reported. The node runs with its defaults plus ``--worker-slots 0`` (no embedded
execution node). The machine's cores are shared by the generator and the node: figures are
noisy; compare Synapse with bare Chroma within one run, as ratios.

Every process this script starts is in its own session, gets SIGKILL if this script dies and is
torn down on exit; the temp dir (data dirs, logs) is removed at the end unless ``--keep``.

Usage: ./scripts/bench-memory [--json FILE] [--sizes 10000,100000] [--clients 16] [--queries 2000]
       [--skip embed,single,batched,vectors,sizes,stale,bare,accuracy,rebuild]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import concurrent.futures
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_node as bn  # noqa: E402  (processes, ports, /proc readings, machine info)

from synapse.cli.progress import Bars, bars  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PARTS = ("embed", "single", "batched", "vectors", "sizes", "stale", "bare", "accuracy", "rebuild", "cache")
CACHE_RECORDS = 2048  # texts the query-embedding cache phase remembers on each of its two nodes
CACHE_QUERY_TEXTS = 200  # distinct query texts, each asked again and again
BATCH = 256  # synapse.state.memory.MAX_RECORDS: one log entry
EMBED_BATCH = 32
DIM = 384
K = 10
BASE_SENTENCES = 4096
MAX_QUERY_SENTENCES = 2000
ACCURACY_QUERIES = 200
NOISE_SIGMA = 0.01
MIX_MAX = 0.5
DECIMALS = 6
CHROMA_WRITE_BATCH = 1000  # synapse.memory.index.WRITE_BATCH
SEED = 20261204


def log(msg: str) -> None:
    print(f"bench-memory [{time.strftime('%H:%M:%S')}]: {msg}", file=sys.stderr, flush=True)


def r3(x):
    return None if x is None else round(x, 3)


def cpu_self_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def latency_summary(lat_s: list[float]) -> dict:
    s = sorted(lat_s)
    if not s:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    return {"p50_ms": r3(1000 * bn.pct(s, 0.50)), "p99_ms": r3(1000 * bn.pct(s, 0.99)),
            "mean_ms": r3(1000 * sum(s) / len(s)), "max_ms": r3(1000 * s[-1])}


# ---------------------------------------------------------------------------------------------
# Text: short agent-memory sentences from templates (deterministic, unique).
# ---------------------------------------------------------------------------------------------

NAMES = ["Alice", "Bob", "Carmen", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kofi",
         "Lena", "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Victor",
         "Wen", "Ximena", "Yusuf", "Zoe", "the user", "the customer", "our manager", "the new intern"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "next week",
        "the end of the month", "tomorrow", "the 14th", "the first of March"]
TIMES = ["9 am", "10:30", "noon", "2 pm", "4:15 pm", "6 pm", "8 in the evening"]
MEETINGS = ["standup", "design review", "quarterly planning", "one-on-one", "budget meeting", "customer call",
            "retro", "onboarding session", "board meeting", "demo"]
PREFS = ["dark mode", "short summaries", "bullet points", "email over chat", "metric units", "window seats",
         "vegetarian meals", "morning meetings", "detailed explanations", "Python examples", "plain text",
         "quiet hotels", "aisle seats", "weekly reports", "French translations", "large fonts"]
CONTEXTS = ["reading reports", "travelling", "on mobile", "writing code", "reviewing contracts",
            "planning trips", "booking restaurants", "preparing slides", "answering support tickets"]
SERVICES = ["billing", "search", "checkout", "auth", "notifications", "analytics", "inventory", "API gateway",
            "recommendation", "payments"]
ENVS = ["staging", "production", "the EU cluster", "the test environment", "us-east", "the canary fleet"]
REASONS = ["a missing environment variable", "an expired certificate", "the disk filled up",
           "a schema migration timed out", "the config had a typo", "a dependency was pinned wrong",
           "the health check was too strict", "DNS did not resolve", "memory ran out", "a race in the cache"]
FOODS = ["peanuts", "shellfish", "gluten", "lactose", "sesame", "eggs", "soy", "strawberries", "kiwi"]
RELATIONS = ["daughter", "son", "partner", "mother", "father", "colleague", "sister", "brother", "dog"]
PROJECTS = ["the mobile app", "the data migration", "Project Atlas", "the website redesign", "the tax filing",
            "the grant proposal", "the warehouse move", "the pricing study", "the hiring plan", "the audit"]
THINGS = ["the signed contract", "two more laptops", "the final budget", "legal approval", "the test results",
          "a new logo", "the API keys", "customer feedback", "the translated manual", "a venue"]
FEATURES = ["the export button", "login", "search", "dark mode", "the calendar sync", "file upload",
            "push notifications", "the dashboard", "password reset", "the shopping cart"]
PROBLEMS = ["stopped working", "is very slow", "crashes on start", "shows the wrong totals",
            "loses data", "logs users out", "freezes", "returns an error"]
VERSIONS = ["3.2", "4.0", "latest", "March", "beta", "2.9.1", "holiday"]
CITIES = ["Lisbon", "Tokyo", "Nairobi", "Toronto", "Berlin", "Sao Paulo", "Seoul", "Madrid", "Oslo",
          "Mumbai", "Austin", "Cape Town", "Melbourne", "Dublin"]
EVENTS = ["conference", "wedding", "trade fair", "team offsite", "marathon", "product launch", "workshop"]
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark Industries", "Wayne Corp", "Vandelay"]
PRODUCTS = ["chairs", "monitors", "licenses", "pallets of paper", "standing desks", "routers", "headsets"]
DOCS = ["spec", "roadmap", "contract", "slide deck", "runbook", "budget sheet", "meeting notes"]
PLACES = ["shared", "archive", "legal", "finance", "team", "drafts", "personal"]
HOBBIES = ["hiking", "chess", "baking bread", "cycling", "painting", "bird watching", "climbing", "jazz"]
TASKS = ["send the invoice", "update the roadmap", "book the room", "call the supplier", "review the PR",
         "draft the announcement", "renew the domain", "fix the flaky test", "order lunch", "file the report"]
ALTS = ["tea", "a phone call", "the summary view", "the train", "a shorter agenda", "the PDF version"]
DISLIKES = ["long emails", "video calls", "spicy food", "early flights", "open offices", "pop-up reminders"]
MOODS = ["frustrated", "happy", "worried", "excited", "confused", "relieved"]

TEMPLATES = [
    lambda c: f"{c(NAMES)} prefers {c(PREFS)} when {c(CONTEXTS)}.",
    lambda c: f"{c(NAMES)} asked to move the {c(MEETINGS)} with {c(NAMES)} to {c(DAYS)} at {c(TIMES)}.",
    lambda c: f"The {c(SERVICES)} deployment on {c(ENVS)} failed because {c(REASONS)}.",
    lambda c: f"Remember that {c(NAMES)}'s {c(RELATIONS)} is allergic to {c(FOODS)}.",
    lambda c: f"{c(NAMES)} is working on {c(PROJECTS)} and needs {c(THINGS)} by {c(DAYS)}.",
    lambda c: f"A user reported that {c(FEATURES)} {c(PROBLEMS)} after the {c(VERSIONS)} update.",
    lambda c: f"{c(NAMES)} booked a flight to {c(CITIES)} on {c(DAYS)} for the {c(EVENTS)}.",
    lambda c: f"{c(COMPANIES)} wants {random_qty(c)} {c(PRODUCTS)} delivered to {c(CITIES)} by {c(DAYS)}.",
    lambda c: f"{c(NAMES)} said the {c(DOCS)} for {c(PROJECTS)} is in the {c(PLACES)} folder.",
    lambda c: f"Last {c(DAYS)}, {c(NAMES)} mentioned {c(HOBBIES)} as a favourite weekend activity.",
    lambda c: f"Action item: {c(NAMES)} will {c(TASKS)} before the {c(MEETINGS)} on {c(DAYS)}.",
    lambda c: f"{c(NAMES)} does not like {c(DISLIKES)}; suggest {c(ALTS)} instead.",
    lambda c: f"{c(NAMES)} was {c(MOODS)} that {c(FEATURES)} {c(PROBLEMS)} during the {c(MEETINGS)}.",
    lambda c: f"The {c(EVENTS)} in {c(CITIES)} needs {c(THINGS)}; {c(NAMES)} is in charge.",
]


def random_qty(c) -> str:
    return c(["two", "five", "twelve", "40", "100", "250", "a dozen", "three hundred"])


class Sentences:
    """Unique sentences, deterministic for a seed."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._seen: set[str] = set()

    def take(self, n: int) -> list[str]:
        out = []
        choice = self._rng.choice
        misses = 0
        while len(out) < n:
            s = choice(TEMPLATES)(choice)
            if s in self._seen:
                misses += 1
                if misses > 50 * n + 10_000:
                    raise RuntimeError("the sentence templates ran out of unique combinations")
                continue
            self._seen.add(s)
            out.append(s)
        return out


# ---------------------------------------------------------------------------------------------
# The embedding model, in this process
# ---------------------------------------------------------------------------------------------


def embed_all(embedder, texts: list[str]):
    import numpy as np

    out = []
    for start in range(0, len(texts), EMBED_BATCH):
        out.extend(embedder.embed(texts[start:start + EMBED_BATCH]))
    return np.frombuffer(b"".join(out), dtype="<f4").reshape(len(texts), DIM).copy()


def run_embed(sentences: Sentences, measure: bool, query_count: int) -> tuple[dict, dict]:
    """Embeds the base and query sentences (the data set) and, when ``measure``, times the
    model: one intra-op thread (the node's setting) then one per core."""
    import numpy as np

    from synapse.memory.embedding import Embedder

    base_texts = sentences.take(BASE_SENTENCES)
    query_texts = sentences.take(query_count)
    one = Embedder()  # threads=1, as synapse.node builds it
    one.embed(["warm-up sentence"])
    result: dict = {"model_id": one.model_id, "dim": Embedder.dim, "batch": EMBED_BATCH}
    n_one = 2048 if measure else 0
    t0 = time.perf_counter()
    first = embed_all(one, base_texts[:n_one]) if n_one else np.zeros((0, DIM), np.float32)
    dt_one = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    many = Embedder(threads=cores)
    many.embed(["warm-up sentence"])
    rest_texts = base_texts[n_one:] + query_texts
    t0 = time.perf_counter()
    rest = embed_all(many, rest_texts)
    dt_many = time.perf_counter() - t0
    if measure:
        lengths = [len(t) for t in base_texts[:n_one]]
        result.update({
            "embed_per_s": round(n_one / dt_one, 1), "texts": n_one, "threads": 1,
            "mean_text_chars": round(sum(lengths) / len(lengths), 1),
            "embed_per_s_all_threads": round(len(rest_texts) / dt_many, 1), "all_threads": cores,
            "all_threads_texts": len(rest_texts),
        })
        log(f"embed: {result['embed_per_s']}/s on 1 thread, {result['embed_per_s_all_threads']}/s on {cores}")
    emb = np.concatenate([first, rest])
    data = {"base_texts": base_texts, "base": emb[:BASE_SENTENCES], "query_texts": query_texts,
            "queries": emb[BASE_SENTENCES:]}
    return result, data


class Records:
    """N records: text, a vector (float32 as the node stores it) and its JSON (6 decimals)."""

    def __init__(self, data: dict, n: int, seed: int) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        base = data["base"].astype(np.float64)
        a = rng.integers(0, len(base), n)
        b = rng.integers(0, len(base), n)
        w = rng.uniform(0.0, MIX_MAX, n)
        x = base[a] + w[:, None] * base[b] + rng.normal(0.0, NOISE_SIGMA, (n, DIM))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = np.round(x, DECIMALS)
        self.vectors = x.astype(np.float32)  # exactly what the node packs from the JSON
        t0 = time.perf_counter()
        self.vec_json = [json.dumps(row, separators=(",", ":")) for row in x.tolist()]
        texts = data["base_texts"]
        self.text_json = [json.dumps(f"{texts[a[i]]} Also: {texts[b[i]]} (#{i})") for i in range(n)]
        self.encode_s = time.perf_counter() - t0
        q = np.round(data["queries"].astype(np.float64), DECIMALS)
        self.queries = q.astype(np.float32)
        self.query_json = [json.dumps(row, separators=(",", ":")) for row in q.tolist()]

    @staticmethod
    def record_id(i: int) -> str:
        return f"r{i:07d}"

    def batch_body(self, start: int, stop: int, prefix: str = "r", tag: str = "") -> bytes:
        """Records start..stop-1 as a POST body; ``prefix`` and ``tag`` (added to the text, which
        dedup compares) make ids and texts unique when the same vectors are sent again."""
        if tag:
            texts = [self.text_json[i][:-1] + f' [{tag}]"' for i in range(start, stop)]
        else:
            texts = self.text_json[start:stop]
        parts = [f'{{"id":"{prefix}{i:07d}","text":{t},"vector":{self.vec_json[i]}}}'
                 for i, t in zip(range(start, stop), texts)]
        return ('{"records":[' + ",".join(parts) + "]}").encode()


# ---------------------------------------------------------------------------------------------
# One real node
# ---------------------------------------------------------------------------------------------


class SingleNode:
    """``synapse node start`` as a subprocess (a single-node cluster) on free loopback ports."""

    def __init__(self, root: Path, name: str, extra: tuple[str, ...] = (), worker_slots: int = 0) -> None:
        """``worker_slots``: the embedded execution node's (0: none; -1: the node's default)."""
        self.name = name
        self.data_dir = root / name
        api_port, raft_port = bn.free_ports(2)
        self.api = f"{HOST}:{api_port}"
        args = bn.synapse_command() + ["node", "start", "--id", name, "--data-dir", str(self.data_dir),
                                       "--api", self.api, "--raft", f"{HOST}:{raft_port}",
                                       "--worker-slots", str(worker_slots), *extra]
        self.member = bn.Member(name, self.api, args, self.data_dir, root / f"{name}.log")
        self.token = ""

    @property
    def url(self) -> str:
        return f"http://{self.api}"

    @property
    def pid(self) -> int:
        return self.member.pid

    def start(self, timeout: float = 180.0) -> float:
        """Starts the process and waits for /ready: seconds taken."""
        t0 = time.monotonic()
        self.member.start()
        self.wait_ready(timeout)
        return time.monotonic() - t0

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if not self.member.alive():
                raise RuntimeError(f"node {self.name} exited (code {self.member.proc.returncode}):\n"
                                   f"{self.member.log_tail()}")
            token_file = self.data_dir / "root.token"
            if not self.token and token_file.exists():
                self.token = token_file.read_text().strip()
            if self.token:
                try:
                    status, body = bn.http_json(self.api, "GET", "/ready", self.token, timeout=2.0)
                    last = f"{status} {body}"
                    if status == 200:
                        return
                except OSError as e:
                    last = repr(e)
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} not ready within {timeout} s (/ready: {last})\n"
                                   f"{self.member.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM, then SIGKILL after ``timeout``: seconds the clean stop took."""
        t0 = time.monotonic()
        p = self.member.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"node {self.name} did not stop within {timeout} s of SIGTERM: SIGKILL")
                self.member.sigkill()
        return time.monotonic() - t0

    def cpu_s(self) -> float | None:
        return bn.proc_cpu_s(self.pid)

    def mem(self) -> dict:
        return bn.proc_mem_mb(self.pid)

    def disk_mb(self) -> dict:
        out = {"data_dir_mb": round(bn.disk_bytes(self.data_dir) / 2**20, 1)}
        index = self.data_dir / "memory-index"
        if index.exists():
            out["memory_index_mb"] = round(bn.disk_bytes(index) / 2**20, 1)
        return out


# ---------------------------------------------------------------------------------------------
# The load generator: N closed-loop clients, one request in flight each
# ---------------------------------------------------------------------------------------------


def new_loop():
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run_async(coro):
    loop = new_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class Job:
    __slots__ = ("method", "path", "body", "items", "key", "write")

    def __init__(self, method: str, path: str, body: bytes, items: int = 1, key=None, write: bool = False):
        self.method, self.path, self.body, self.items, self.key, self.write = method, path, body, items, key, write


async def drive(url: str, token: str, clients: int, jobs, *, deadline: float | None = None,
                keep=None, timeout: float = 300.0) -> dict:
    """Runs ``jobs`` (an iterator of Job, shared by the clients) until it ends or ``deadline``
    (time.monotonic). Returns the (start, end, items) of each 200 answer, the failed jobs,
    error counts and, with ``keep``, keep(parsed answer) per job key."""
    import aiohttp

    it = iter(jobs)
    done: list[tuple[float, float, int]] = []
    failed: list[Job] = []
    errors: Counter = Counter()
    kept: dict = {}
    base_headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def client() -> None:
            for job in it:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                headers = dict(base_headers, **{"X-Request-Id": uuid.uuid4().hex}) if job.write else base_headers
                t0 = time.monotonic()
                try:
                    async with session.request(job.method, url + job.path, data=job.body, headers=headers) as r:
                        raw = await r.read()
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    errors[f"{type(e).__name__}: {e}"[:160]] += 1
                    failed.append(job)
                    continue
                t1 = time.monotonic()
                if status != 200:
                    errors[f"{status} {raw[:160].decode(errors='replace')}"] += 1
                    failed.append(job)
                    continue
                done.append((t0, t1, job.items))
                if keep is not None:
                    kept[job.key] = keep(json.loads(raw))

        await asyncio.gather(*(client() for _ in range(clients)))
    return {"done": done, "failed": failed, "errors": errors, "kept": kept}


def error_summary(errors: Counter) -> dict:
    return dict(errors.most_common(5)) if errors else {}


class Usage:
    """CPU of this process (the load generator) and of the node over a phase."""

    def __init__(self, node: SingleNode | None) -> None:
        self.node = node
        self.t0 = time.monotonic()
        self.me0 = cpu_self_s()
        self.node0 = node.cpu_s() if node else None

    def report(self) -> dict:
        dt = time.monotonic() - self.t0
        out = {"client_cpu_pct": round(100 * (cpu_self_s() - self.me0) / dt, 1)}
        if self.node is not None and self.node0 is not None:
            now = self.node.cpu_s()
            if now is not None:
                out["node_cpu_pct"] = round(100 * (now - self.node0) / dt, 1)
        return out


def ns_path(ns: str, *rest: str) -> str:
    from urllib.parse import quote

    return "/".join(["/v1/memory", quote(ns, safe=""), *(quote(r, safe="") for r in rest)])


# ---------------------------------------------------------------------------------------------
# Phases: remember
# ---------------------------------------------------------------------------------------------


def windowed(res: dict, t_from: float, t_to: float) -> dict:
    """Throughput and latency of the answers that arrived in [t_from, t_to]."""
    inside = [(t0, t1, n) for t0, t1, n in res["done"] if t_from <= t1 <= t_to]
    items = sum(n for _, _, n in inside)
    return {"per_s": round(items / (t_to - t_from), 1), "requests": len(inside), "items": items,
            **latency_summary([t1 - t0 for t0, t1, _ in inside])}


def drive_windowed(node: SingleNode, jobs, args) -> tuple[dict, dict, dict]:
    """Drives ``jobs`` for ``args.warmup`` + ``args.duration`` seconds: (the raw result, the
    measured window's figures, the node's and this process's CPU over that window)."""
    t_start = time.monotonic()
    t_warm, t_end = t_start + args.warmup, t_start + args.warmup + args.duration
    box = {}

    async def go():
        async def mark():
            await asyncio.sleep(max(0.0, t_warm - time.monotonic()))
            box["u"] = Usage(node)
            await asyncio.sleep(max(0.0, t_end - time.monotonic()))
            box["r"] = box["u"].report()
        marker = asyncio.ensure_future(mark())
        res = await drive(node.url, node.token, args.clients, jobs, deadline=t_end)
        await marker
        return res

    res = run_async(go())
    return res, windowed(res, t_warm, t_end), box.get("r", {})


def run_single(node: SingleNode, sentences: Sentences, args) -> dict:
    ns = "bench/single"
    texts = iter(sentences.take(int(2000 * (args.duration + args.warmup) + 1000)))

    def jobs():
        n = 0
        for text in texts:
            n += 1
            yield Job("PUT", ns_path(ns, f"s{n:07d}"), json.dumps({"text": text}).encode(), 1, write=True)

    res, w, usage = drive_windowed(node, jobs(), args)
    out = {"remember_per_s_single": w["per_s"], "remember_single_p50_ms": w["p50_ms"],
           "remember_single_p99_ms": w["p99_ms"], "remember_single_mean_ms": w["mean_ms"],
           "requests": w["requests"], "errors": error_summary(res["errors"]), **usage}
    log(f"remember single: {w['per_s']}/s, p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms")
    return out


def run_batched_texts(node: SingleNode, sentences: Sentences, args, embed_rate: float | None) -> dict:
    ns = "bench/batched"
    rate = embed_rate or 300.0
    rounds = max(1, round(rate * args.duration / (BATCH * args.clients)))
    n_batches = rounds * args.clients
    texts = sentences.take(n_batches * BATCH)
    bodies = []
    for b in range(n_batches):
        recs = [{"id": f"b{b * BATCH + i:07d}", "text": t} for i, t in enumerate(texts[b * BATCH:(b + 1) * BATCH])]
        bodies.append(Job("POST", ns_path(ns), json.dumps({"records": recs}).encode(), BATCH, write=True))
    usage = Usage(node)
    res = run_async(drive(node.url, node.token, args.clients, bodies))
    rep = usage.report()
    if not res["done"]:
        raise RuntimeError(f"no batch of texts was stored: {error_summary(res['errors'])}")
    first = min(t0 for t0, _, _ in res["done"])
    last = max(t1 for _, t1, _ in res["done"])
    items = sum(n for _, _, n in res["done"])
    lat = latency_summary([t1 - t0 for t0, t1, _ in res["done"]])
    out = {"remember_per_s_batched": round(items / (last - first), 1), "batches": len(res["done"]),
           "records": items, "elapsed_s": r3(last - first), "batch_p50_ms": lat["p50_ms"],
           "batch_p99_ms": lat["p99_ms"], "errors": error_summary(res["errors"]), **rep}
    log(f"remember batched (node embeds): {out['remember_per_s_batched']}/s over {out['elapsed_s']} s")
    return out


def run_cache(tmp: Path, sentences: Sentences, args) -> dict:
    """Recall by *text* (the node embeds the query) on two nodes holding the same memories, one
    without and one with the Redis cache of query embeddings, in alternating rounds: latency
    both ways, and whether every answer is the same."""
    url = os.environ.get("SYNAPSE_BENCH_REDIS_URL")
    if not url:
        return {"skipped": "no Redis: run through ./scripts/bench-memory, which starts one"}
    texts, queries = sentences.take(CACHE_RECORDS), sentences.take(CACHE_QUERY_TEXTS)
    nodes = {"off": SingleNode(tmp, "cache-off"), "redis": SingleNode(tmp, "cache-on", ("--embedding-cache", url))}
    ns, out = "bench/cache", {"records": CACHE_RECORDS, "query_texts": CACHE_QUERY_TEXTS, "clients": args.clients}
    try:
        for node in nodes.values():
            node.start()
            jobs = [Job("POST", ns_path(ns), json.dumps({"records": [{"id": f"c{b + i:05d}", "text": t}
                                                                     for i, t in enumerate(texts[b:b + BATCH])]}).encode(),
                        write=True) for b in range(0, len(texts), BATCH)]
            res = run_async(drive(node.url, node.token, 2, jobs))
            if res["failed"]:
                raise RuntimeError(f"cache phase: loading failed: {error_summary(res['errors'])}")

        def ask(node: SingleNode, n: int) -> dict:
            jobs = [Job("POST", ns_path(ns, "recall"), json.dumps({"query": q, "k": K}).encode(), key=q)
                    for q in (queries * (n // len(queries) + 1))[:n]]
            return run_async(drive(node.url, node.token, args.clients, jobs,
                                   keep=lambda a: [(r["id"], r["score"]) for r in a["results"]]))

        answers = {name: ask(node, len(queries))["kept"] for name, node in nodes.items()}  # warm-up: fills the cache
        lat: dict[str, list[float]] = {"off": [], "redis": []}
        per_round = max(1, args.queries // args.rounds)
        for r in range(args.rounds):
            for name in (("off", "redis") if r % 2 == 0 else ("redis", "off")):
                res = ask(nodes[name], per_round)
                lat[name] += [t1 - t0 for t0, t1, _ in res["done"]]
                for q, got in res["kept"].items():
                    if got != answers[name][q]:
                        out.setdefault("changed_answers", []).append(name)
        for name, values in lat.items():
            summary = latency_summary(values)
            out[name] = {"recall_p50_ms": summary["p50_ms"], "recall_p99_ms": summary["p99_ms"],
                         "recall_mean_ms": summary["mean_ms"], "queries": len(values)}
        out["identical_answers"] = answers["off"] == answers["redis"] and "changed_answers" not in out
        out["p50_ratio_redis_over_off"] = ratio(out["redis"]["recall_p50_ms"], out["off"]["recall_p50_ms"])
        out["p99_ratio_redis_over_off"] = ratio(out["redis"]["recall_p99_ms"], out["off"]["recall_p99_ms"])
        log(f"cache: p50 {out['off']['recall_p50_ms']} ms without, {out['redis']['recall_p50_ms']} ms with Redis; "
            f"identical answers: {out['identical_answers']}")
        return out
    finally:
        for node in nodes.values():
            node.stop()


def run_batched_vectors(node: SingleNode, recs: Records, args) -> dict:
    ns = "bench/vectors"
    n = len(recs.vec_json)

    def jobs():
        k = 0
        while True:
            start = (k * BATCH) % max(BATCH, n - BATCH)
            body = recs.batch_body(start, start + BATCH, prefix=f"v{k:05d}-", tag=f"v{k}")
            k += 1
            yield Job("POST", ns_path(ns), body, BATCH, write=True)

    res, w, usage = drive_windowed(node, jobs(), args)
    out = {"remember_vectors_per_s_batched": w["per_s"], "batches": w["requests"], "records": w["items"],
           "batch_p50_ms": w["p50_ms"], "batch_p99_ms": w["p99_ms"], "errors": error_summary(res["errors"]),
           **usage, "note": "the body's JSON is built in the client while it runs (string joins of "
           "pre-encoded vectors, ~1 ms a batch)"}
    log(f"remember batched (caller vectors): {w['per_s']}/s, batch p50 {w['p50_ms']} ms")
    return out


# ---------------------------------------------------------------------------------------------
# Phases: per size
# ---------------------------------------------------------------------------------------------


def load_records(node: SingleNode, ns: str, recs: Records, n: int, clients: int) -> dict:
    batches = [(s, min(n, s + BATCH)) for s in range(0, n, BATCH)]
    jobs = [Job("POST", ns_path(ns), recs.batch_body(s, e), e - s, key=(s, e), write=True) for s, e in batches]
    sizes = [len(j.body) for j in jobs]
    usage = Usage(node)
    t0 = time.monotonic()
    res = run_async(drive(node.url, node.token, clients, jobs))
    retried = 0
    for _ in range(3):
        if not res["failed"]:
            break
        retried += len(res["failed"])
        log(f"load: {len(res['failed'])} batches failed ({error_summary(res['errors'])}); retrying them")
        again = run_async(drive(node.url, node.token, 1, res["failed"]))
        res = {"done": res["done"] + again["done"], "failed": again["failed"],
               "errors": res["errors"] + again["errors"]}
    t_acked = time.monotonic()
    if res["failed"]:
        raise RuntimeError(f"load: {len(res['failed'])} batches still fail: {error_summary(res['errors'])}")
    loaded = sum(n for _, _, n in res["done"])
    lat = latency_summary([t1 - t0_ for t0_, t1, _ in res["done"]])
    return {"records": loaded, "load_s": r3(t_acked - t0), "load_records_per_s": round(loaded / (t_acked - t0), 1),
            "batches": len(jobs), "batch_body_bytes_max": max(sizes), "batch_body_bytes_mean": round(sum(sizes) / len(sizes)),
            "batch_p50_ms": lat["p50_ms"], "batch_p99_ms": lat["p99_ms"], "retried_batches": retried,
            "errors": error_summary(res["errors"]), "clients": clients, **usage.report(), "_t0": t0}


def wait_recall(node: SingleNode, ns: str, body: bytes, check, timeout: float) -> tuple[float, dict, int]:
    """Sends a linearizable recall until ``check(answer)`` holds: (time it held, the answer,
    attempts). A 503 (the index is catching up) or a wrong answer is retried."""
    deadline = time.monotonic() + timeout
    attempts, last = 0, ""
    while True:
        attempts += 1
        try:
            status, answer = bn.http_json(node.api, "POST", ns_path(ns, "recall"), node.token,
                                          json.loads(body), timeout=30.0)
            last = f"{status} {str(answer)[:200]}"
            if status == 200 and check(answer):
                return time.monotonic(), answer, attempts
        except OSError as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no correct linearizable recall within {timeout} s (last: {last})")
        time.sleep(0.05)


class Tally:
    """Latencies, answers and CPU of one kind of recall, summed over rounds."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.ids: dict = {}
        self.busy_s = 0.0  # wall time of the measured chunks
        self.client_cpu_s = 0.0
        self.node_cpu_s = 0.0
        self.errors: Counter = Counter()
        self.round_p99_ms: list[float | None] = []

    def add_round(self, lat: list[float], ids: dict, busy_s: float, client_cpu_s: float, node_cpu_s: float = 0.0,
                  errors: Counter | None = None) -> None:
        self.lat += lat
        self.ids.update(ids)
        self.busy_s += busy_s
        self.client_cpu_s += client_cpu_s
        self.node_cpu_s += node_cpu_s
        self.errors += errors or Counter()
        self.round_p99_ms.append(latency_summary(lat)["p99_ms"])

    def summary(self, prefix: str = "recall", node: bool = True) -> dict:
        lat = latency_summary(self.lat)
        out = {f"{prefix}_p50_ms": lat["p50_ms"], f"{prefix}_p99_ms": lat["p99_ms"],
               f"{prefix}_mean_ms": lat["mean_ms"], f"{prefix}_max_ms": lat["max_ms"],
               f"{prefix}_per_s": round(len(self.lat) / self.busy_s, 1) if self.busy_s else None,
               "queries": len(self.lat), "p99_ms_per_round": self.round_p99_ms,
               "answers_with_fewer_than_k": sum(1 for ids in self.ids.values() if len(ids) < K),
               "errors": error_summary(self.errors),
               "client_cpu_pct": round(100 * self.client_cpu_s / self.busy_s, 1) if self.busy_s else None}
        if node:
            out["node_cpu_pct"] = round(100 * self.node_cpu_s / self.busy_s, 1) if self.busy_s else None
        return out


def recall_jobs(ns: str, recs: Records, indices, consistency: str) -> list[Job]:
    q = len(recs.query_json)
    path = ns_path(ns, "recall")
    return [Job("POST", path, f'{{"vector":{recs.query_json[i % q]},"k":{K},"consistency":"{consistency}"}}'.encode(),
                1, key=i) for i in indices]


def synapse_chunk(node: SingleNode, ns: str, recs: Records, indices, clients: int, consistency: str,
                  tally: Tally | None) -> None:
    """``indices`` queries through the node; into ``tally`` (None: a warm-up)."""
    jobs = recall_jobs(ns, recs, indices, consistency)
    cpu0, node0, t0 = cpu_self_s(), node.cpu_s() or 0.0, time.monotonic()
    res = run_async(drive(node.url, node.token, clients, jobs, keep=lambda a: [r["id"] for r in a["results"]]))
    busy, cpu, node_cpu = time.monotonic() - t0, cpu_self_s() - cpu0, (node.cpu_s() or 0.0) - node0
    if not res["done"]:
        raise RuntimeError(f"recall ({consistency}): no query answered: {error_summary(res['errors'])}")
    if tally is not None:
        tally.add_round([t1 - t0_ for t0_, t1, _ in res["done"]], res["kept"], busy, cpu, node_cpu, res["errors"])


class Bare:
    """The same vectors in a bare embedded Chroma (its own temp dir), queried in this process."""

    def __init__(self, tmp: Path, n: int, recs: Records, clients: int) -> None:
        import chromadb
        from chromadb.config import Settings

        self.path = tmp / f"bare-{n}"
        self.path.mkdir()
        self.recs = recs
        self.client = chromadb.PersistentClient(path=str(self.path), settings=Settings(anonymized_telemetry=False,
                                                                                       allow_reset=False))
        self.col = self.client.create_collection(f"bare{n}", embedding_function=None,
                                                 configuration={"hnsw": {"space": "cosine"}})
        t0 = time.monotonic()
        for s in range(0, n, CHROMA_WRITE_BATCH):  # as the node writes: upserts of 1,000 with {"_i": log index}
            e = min(n, s + CHROMA_WRITE_BATCH)
            self.col.upsert(ids=[Records.record_id(i) for i in range(s, e)], embeddings=recs.vectors[s:e],
                            metadatas=[{"_i": i + 1} for i in range(s, e)])
        self.load_s = time.monotonic() - t0
        self.pool = concurrent.futures.ThreadPoolExecutor(clients)
        try:
            self.configuration = dict(self.col.configuration.get("hnsw") or {})
        except Exception:
            self.configuration = None

    def _one(self, i: int):
        q = self.recs.queries[i % len(self.recs.queries)]
        t = time.monotonic()
        found = self.col.query(query_embeddings=[q], n_results=K, include=["distances"])
        return i, time.monotonic() - t, found["ids"][0]

    def chunk(self, indices, tally: Tally | None) -> None:
        cpu0, t0 = cpu_self_s(), time.monotonic()
        answers = list(self.pool.map(self._one, indices))
        busy, cpu = time.monotonic() - t0, cpu_self_s() - cpu0
        if tally is not None:
            tally.add_round([dt for _, dt, _ in answers], {i: ids for i, _, ids in answers}, busy, cpu)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        try:
            self.client.delete_collection(self.col.name)
        except Exception:
            pass
        try:
            from chromadb.api.shared_system_client import SharedSystemClient

            SharedSystemClient.clear_system_cache()
        except Exception:
            pass
        shutil.rmtree(self.path, ignore_errors=True)


def exact_top(recs: Records, n: int, query_ids: list[int]):
    import numpy as np

    x = recs.vectors[:n]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = recs.queries[[i % len(recs.queries) for i in query_ids]]
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ x.T
    top = np.argpartition(-sims, K, axis=1)[:, :K]
    return {qi: {Records.record_id(int(j)) for j in row} for qi, row in zip(query_ids, top)}


def recall_at_k(exact: dict, got: dict) -> float | None:
    hits = [len(exact[i] & set(got[i])) / K for i in exact if i in got]
    return round(sum(hits) / len(hits), 4) if hits else None


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def run_size(n: int, is_largest: bool, tmp: Path, recs: Records, args, skip: set[str]) -> dict:
    out: dict = {"records": n, "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    node = SingleNode(tmp, f"size-{n}")
    log(f"size {n}: starting a fresh node")
    out["node_start_s"] = r3(node.start())
    ns = f"bench/size-{n}"
    bare = None
    try:
        log(f"size {n}: loading {n} records with caller vectors ({args.load_clients} clients, batches of {BATCH})")
        load = load_records(node, ns, recs, n, args.load_clients)
        t0 = load.pop("_t0")
        probe = f'{{"vector":{recs.vec_json[n - 1]},"k":{K},"consistency":"linearizable"}}'.encode()
        want = Records.record_id(n - 1)
        t_idx, _, attempts = wait_recall(node, ns, probe, lambda a: want in [r["id"] for r in a["results"]],
                                         timeout=1800)
        load["load_indexed_s"] = r3(t_idx - t0)
        load["load_indexed_records_per_s"] = round(n / (t_idx - t0), 1)
        load["index_wait_attempts"] = attempts
        out["load"] = load
        out["load_records_per_s"] = load["load_records_per_s"]
        log(f"size {n}: acknowledged in {load['load_s']} s ({load['load_records_per_s']}/s), indexed after "
            f"{load['load_indexed_s']} s")
        time.sleep(1.0)
        out["node_memory"] = node.mem()
        out["rss_mb"] = out["node_memory"]["rss_mb"]
        out["disk"] = node.disk_mb()
        log(f"size {n}: node RSS {out['rss_mb']} MB")

        if "bare" not in skip:
            log(f"size {n}: loading bare Chroma (in this process)")
            bare = Bare(tmp, n, recs, args.clients)
            out["bare_load_s"] = r3(bare.load_s)
            out["bare_load_records_per_s"] = round(n / bare.load_s, 1)
        # Warm-ups, then --rounds rounds of linearizable, stale and bare chunks, the order
        # reversed every other round, so a burst of outside load hits them alike.
        kinds = ["linearizable"] + ([] if "stale" in skip else ["stale"]) + ([] if bare is None else ["bare"])
        tallies = {k: Tally() for k in kinds}
        warm = range(min(200, args.queries))
        for kind in kinds:
            if kind == "bare":
                bare.chunk(warm, None)
            else:
                synapse_chunk(node, ns, recs, warm, args.clients, kind, None)
        rounds = max(1, min(args.rounds, args.queries))
        bounds = [round(r * args.queries / rounds) for r in range(rounds + 1)]
        out["loadavg_1m_before_queries"] = round(os.getloadavg()[0], 2)
        log(f"size {n}: {args.queries} queries of each of {', '.join(kinds)} ({args.clients} clients/threads, "
            f"{rounds} rounds)")
        for r in range(rounds):
            indices = range(bounds[r], bounds[r + 1])
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                if kind == "bare":
                    bare.chunk(indices, tallies[kind])
                else:
                    synapse_chunk(node, ns, recs, indices, args.clients, kind, tallies[kind])
        lin = tallies["linearizable"].summary()
        out.update({k: lin[k] for k in ("recall_p50_ms", "recall_p99_ms", "recall_mean_ms", "recall_per_s")})
        out["linearizable"] = lin
        log(f"size {n}: linearizable recall p50 {lin['recall_p50_ms']} ms, p99 {lin['recall_p99_ms']} ms, "
            f"{lin['recall_per_s']}/s")
        if "stale" in tallies:
            st = tallies["stale"].summary()
            out["stale"] = st
            out.update({"stale_" + k: st[k] for k in ("recall_p50_ms", "recall_p99_ms", "recall_mean_ms", "recall_per_s")})
            log(f"size {n}: stale recall p50 {st['recall_p50_ms']} ms, p99 {st['recall_p99_ms']} ms, "
                f"{st['recall_per_s']}/s")
        if "bare" in tallies:
            b = tallies["bare"].summary("bare_recall", node=False)
            b["configuration"] = bare.configuration
            b["threads"] = args.clients
            out["bare"] = b
            out.update({k: b[k] for k in ("bare_recall_p50_ms", "bare_recall_p99_ms", "bare_recall_mean_ms",
                                          "bare_recall_per_s")})
            out["overhead_p99_ratio"] = ratio(lin["recall_p99_ms"], b["bare_recall_p99_ms"])
            out["overhead_p50_ratio"] = ratio(lin["recall_p50_ms"], b["bare_recall_p50_ms"])
            out["overhead_p99_ratio_per_round"] = [ratio(x, y) for x, y in zip(lin["p99_ms_per_round"],
                                                                               b["p99_ms_per_round"])]
            if "stale" in out:
                out["stale_overhead_p99_ratio"] = ratio(out["stale_recall_p99_ms"], b["bare_recall_p99_ms"])
            log(f"size {n}: bare Chroma p50 {b['bare_recall_p50_ms']} ms, p99 {b['bare_recall_p99_ms']} ms, "
                f"{b['bare_recall_per_s']}/s; overhead p99 x{out['overhead_p99_ratio']} "
                f"(per round {out['overhead_p99_ratio_per_round']})")
        lin_ids = tallies["linearizable"].ids
        sample = list(range(min(ACCURACY_QUERIES, args.queries)))
        exact = None
        if "accuracy" not in skip or ("rebuild" not in skip and is_largest):
            exact = exact_top(recs, n, sample)
        if "accuracy" not in skip:
            out["recall_at_10"] = recall_at_k(exact, lin_ids)
            if "bare" in tallies:
                out["bare_recall_at_10"] = recall_at_k(exact, tallies["bare"].ids)
            out["recall_at_10_queries"] = len(sample)
            log(f"size {n}: recall@10 {out['recall_at_10']} (bare {out.get('bare_recall_at_10')})")
        if bare is not None:
            bare.close()
            bare = None
        if is_largest and "rebuild" not in skip:
            out["index_rebuild"] = run_rebuild(node, ns, recs, n, sample, lin_ids, exact, args)
    finally:
        if bare is not None:
            bare.close()
        node.stop()
        shutil.rmtree(node.data_dir, ignore_errors=True)
    return out


def restart_until_recall(node: SingleNode, ns: str, probe: bytes, expected: set[str], delete_index: bool) -> dict:
    """Stops the node (SIGTERM), deletes its memory index when asked, starts it again: seconds
    from the start of the process to /ready and to a correct linearizable recall."""
    stop_s = node.stop()
    if delete_index:
        shutil.rmtree(node.data_dir / "memory-index")
    t0 = time.monotonic()
    node.member.start()
    node.wait_ready(1800)
    t_ready = time.monotonic()

    def right(answer: dict) -> bool:
        ids = [r["id"] for r in answer["results"]]
        return len(ids) == K and len(expected & set(ids)) >= K - 1

    t_ok, answer, attempts = wait_recall(node, ns, probe, right, timeout=1800)
    return {"ready_s": r3(t_ready - t0), "correct_recall_s": r3(t_ok - t0), "stop_s": r3(stop_s),
            "recall_attempts": attempts, "probe_overlap_with_before": len(expected & {r["id"] for r in answer["results"]})}


def run_rebuild(node: SingleNode, ns: str, recs: Records, n: int, sample: list[int], before: dict, exact,
                args) -> dict:
    probe_q = sample[0]
    probe = f'{{"vector":{recs.query_json[probe_q % len(recs.query_json)]},"k":{K},"consistency":"linearizable"}}'
    expected = set(before[probe_q])
    log("rebuild: first a plain restart (index kept), for comparison")
    plain = restart_until_recall(node, ns, probe.encode(), expected, delete_index=False)
    log(f"rebuild: plain restart: ready after {plain['ready_s']} s, correct recall after {plain['correct_recall_s']} s")
    log(f"rebuild: stopping the node, deleting {node.data_dir / 'memory-index'}, starting it")
    gone = restart_until_recall(node, ns, probe.encode(), expected, delete_index=True)
    out = {"records": n, "index_rebuild_s": gone["correct_recall_s"], "node_ready_s": gone["ready_s"],
           "deleted_index": gone, "plain_restart": plain,
           "rebuild_minus_plain_restart_s": r3(gone["correct_recall_s"] - plain["correct_recall_s"]),
           "measured_from": "the start of the node process (the old one stopped with SIGTERM)",
           "correct_means": f"a linearizable recall of query {probe_q} returns {K} results, at least {K - 1} of "
                            "them the ones it returned before the stop"}
    log(f"rebuild: ready after {gone['ready_s']} s, correct recall after {gone['correct_recall_s']} s")
    time.sleep(0.5)
    out["rss_mb_after_rebuild"] = node.mem()["rss_mb"]
    out["disk_after_rebuild"] = node.disk_mb()
    if exact is not None:
        jobs = recall_jobs(ns, recs, sample, "linearizable")
        res = run_async(drive(node.url, node.token, args.clients, jobs, keep=lambda a: [r["id"] for r in a["results"]]))
        out["recall_at_10_after_rebuild"] = recall_at_k(exact, res["kept"])
        same = [len(set(before[i]) & set(res["kept"][i])) / K for i in sample if i in res["kept"] and i in before]
        out["same_results_as_before"] = round(sum(same) / len(same), 4) if same else None
        log(f"rebuild: recall@10 after {out['recall_at_10_after_rebuild']}, same results {out['same_results_as_before']}")
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    info = bn.machine_info()
    info.pop("pysyncobj", None)
    from importlib.metadata import version

    for mod in ("chromadb", "onnxruntime", "tokenizers", "numpy"):
        try:
            info[mod] = version(mod)
        except Exception:
            info[mod] = None
    return info


def commit() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def run_all(args, skip: set[str], tmp: Path, result: dict, shown: Bars) -> None:
    sentences = Sentences(SEED)
    sizes = sorted(args.sizes)
    need_data = "sizes" not in skip or "vectors" not in skip
    remember_parts = [p for p in ("single", "batched", "vectors") if p not in skip]
    steps = shown.bar("bench-memory", unit="phases", total=1 + need_data + len(remember_parts) + ("cache" not in skip)
                      + (len(sizes) if "sizes" not in skip else 0))
    query_count = min(MAX_QUERY_SENTENCES, max(args.queries, ACCURACY_QUERIES))
    steps.step("bench-memory: embedding the data set")
    log("embedding the data set" + (" (and timing the model)" if "embed" not in skip else ""))
    load_before = round(os.getloadavg()[0], 2)
    emb, data = run_embed(sentences, "embed" not in skip, query_count)
    emb["loadavg_1m_at_start"] = load_before
    result["embedding"] = emb
    if "embed_per_s" in emb:
        result["embed_per_s"] = emb["embed_per_s"]
        result["embed_per_s_all_threads"] = emb["embed_per_s_all_threads"]
    recs = None
    if need_data:
        n_max = max(sizes) if "sizes" not in skip else 20_000
        steps.step("bench-memory: making the record vectors")
        log(f"making {n_max} record vectors and their JSON")
        recs = Records(data, n_max, SEED + 1)
        result["vectors"] = {
            "how": (f"{BASE_SENTENCES} generated agent-memory sentences embedded by {emb['model_id']}; record i = "
                    f"normalize(e_a + w*e_b + n), a, b random base sentences, w ~ U(0, {MIX_MAX}), "
                    f"n ~ N(0, {NOISE_SIGMA}^2 I); queries: {len(recs.queries)} other generated sentences, embedded; "
                    f"sent as JSON rounded to {DECIMALS} decimals (the same rounded vectors everywhere)"),
            "dim": DIM, "base_sentences": BASE_SENTENCES, "query_vectors": len(recs.queries),
            "records_made": n_max, "json_encode_s": r3(recs.encode_s),
            "example_sentences": data["base_texts"][:3],
        }
    if remember_parts:
        node = SingleNode(tmp, "remember")
        log("remember phases: starting a node")
        result["remember_loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
        result["remember_node_start_s"] = r3(node.start())
        result["remember_node_rss_mb_at_start"] = node.mem()["rss_mb"]
        try:
            if "single" in remember_parts:
                steps.step("bench-memory: remember single")
                log(f"remember single: {args.clients} clients, {args.duration} s")
                single = run_single(node, sentences, args)
                result["remember_per_s_single"] = single["remember_per_s_single"]
                single["node_rss_mb_after"] = node.mem()["rss_mb"]
                result["remember_single"] = single
            if "batched" in remember_parts:
                steps.step("bench-memory: remember batched")
                log(f"remember batched (node embeds): {args.clients} clients")
                batched = run_batched_texts(node, sentences, args, emb.get("embed_per_s_all_threads"))
                result["remember_per_s_batched"] = batched["remember_per_s_batched"]
                batched["node_rss_mb_after"] = node.mem()["rss_mb"]
                result["remember_batched"] = batched
            if "vectors" in remember_parts:
                steps.step("bench-memory: remember batched vectors")
                log(f"remember batched (caller vectors): {args.clients} clients, {args.duration} s")
                vec = run_batched_vectors(node, recs, args)
                result["remember_vectors_per_s_batched"] = vec["remember_vectors_per_s_batched"]
                vec["node_rss_mb_after"] = node.mem()["rss_mb"]
                result["remember_vectors_batched"] = vec
            result["remember_node_memory"] = node.mem()
        finally:
            node.stop()
            shutil.rmtree(node.data_dir, ignore_errors=True)
    if "cache" not in skip:
        steps.step("bench-memory: query-embedding cache")
        log("query-embedding cache: two nodes, without and with Redis")
        result["embedding_cache"] = run_cache(tmp, sentences, args)
    if "sizes" not in skip:
        result["sizes"] = {}
        for n in sizes:
            steps.step(f"bench-memory: recall over {n:,} records")
            size = run_size(n, n == sizes[-1], tmp, recs, args, skip)
            result["sizes"][str(n)] = size
            rebuild = size.get("index_rebuild")
            if rebuild:
                result["index_rebuild_s"] = rebuild["index_rebuild_s"]
                result["index_rebuild_records"] = n
                if n == 100_000:
                    result["index_rebuild_s_100k"] = rebuild["index_rebuild_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the JSON object to this file")
    p.add_argument("--sizes", default="10000,100000", help="record counts for the recall phases (default 10000,100000)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients / threads (default 16)")
    p.add_argument("--queries", type=int, default=2000, help="recall queries per size and consistency (default 2000)")
    p.add_argument("--rounds", type=int, default=4, help="rounds the recall queries are split into, alternating "
                   "linearizable, stale and bare Chroma (default 4)")
    p.add_argument("--load-clients", type=int, default=4, help="concurrent 256-record batches while loading (default 4)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds of the remember phases (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before them (default 2)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {','.join(PARTS)}")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data dirs, node logs) after the run")
    args = p.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) in --skip: {', '.join(sorted(unknown))}; parts: {', '.join(PARTS)}")
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        p.error("--sizes: expected comma-separated record counts, e.g. 10000,100000")
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes: expected positive record counts")
    if min(args.clients, args.queries, args.load_clients, args.rounds) < 1:
        p.error("--clients, --queries, --load-clients and --rounds must be at least 1")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, bn._raise_exit)
    signal.signal(signal.SIGHUP, bn._raise_exit)
    atexit.register(bn.kill_all)
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    log(f"work dir {tmp}")
    result: dict = {"benchmark": "synapse agent memory, one local node", **commit(), "machine": machine(),
                    "parameters": {"sizes": args.sizes, "clients": args.clients, "queries": args.queries,
                                   "load_clients": args.load_clients, "rounds": args.rounds, "duration_s": args.duration,
                                   "warmup_s": args.warmup, "k": K, "batch": BATCH, "embed_batch": EMBED_BATCH,
                                   "accuracy_queries": ACCURACY_QUERIES, "skipped": sorted(skip),
                                   "node_flags": "defaults + --worker-slots 0 (single node, no --peers)"}}
    t_start = time.monotonic()
    failed = None
    try:
        with bars() as shown:
            run_all(args, skip, tmp, result, shown)
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        failed = e
        result["error"] = f"{type(e).__name__}: {e}"[:4000]
        log(f"FAILED: {result['error'][:2000]}")
    finally:
        bn.kill_all()
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["total_s"] = round(time.monotonic() - t_start, 1)
    result["notes"] = [
        "The load generator (this process) and the node share the machine's cores, and other work on the machine "
        "shows in the loadavg_1m_* figures: figures are noisy; compare Synapse with bare Chroma within one run, as "
        "ratios (bare Chroma runs in the same rounds as Synapse's recall).",
        "Synapse's recall latency is the client's: HTTP, JSON, the token check, (linearizable) a Raft barrier and "
        "a wait for the index, the Chroma query on the node's 2-thread query pool, the records read from the state. "
        "Bare Chroma is col.query() called in-process from the same number of threads.",
        "Vectors are sent rounded to 6 decimals (~0.97 MB a 256-record batch rather than ~2.1 MB as Python floats): "
        "the same rounded vectors go to Synapse, bare Chroma and the exact search.",
    ]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.keep:
        log(f"work dir kept: {tmp}")
    else:
        if failed is not None:
            for f in sorted(tmp.glob("*.log")):
                log(f"--- {f.name} (last 1500 characters)\n{f.read_text(errors='replace')[-1500:]}")
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(failed, KeyboardInterrupt):
        sys.exit(130)
    if isinstance(failed, SystemExit):
        sys.exit(failed.code)
    if failed is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
