"""The offline embedding model (synapse/memory/embedding.py), for real: all-MiniLM-L6-v2 from
the files its PyPI packages ship; writes embedded together answer each caller with its own
vectors."""

from __future__ import annotations

import asyncio
import struct

import pytest

from synapse.memory.embedding import DIM, Embedder


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def _vector(raw: bytes) -> list[float]:
    return list(struct.unpack(f"<{DIM}f", raw))


def _cosine(a: bytes, b: bytes) -> float:
    return sum(x * y for x, y in zip(_vector(a), _vector(b)))


def test_the_model_is_identified_by_its_file_and_gives_unit_vectors_by_meaning(embedder):
    assert embedder.model_id.startswith("all-MiniLM-L6-v2-onnx-int8@sha256:")
    cat, kitten, stocks = embedder.embed(["The cat sits on the mat", "A kitten rests on a rug",
                                          "Stock prices fell sharply"])
    assert len(cat) == 4 * DIM
    assert abs(_cosine(cat, cat) - 1) < 1e-5
    assert _cosine(cat, kitten) > 0.5 > 0.2 > _cosine(cat, stocks)
    # A query embedded alone is the same bytes every time (recall relies on it, the cache too).
    assert embedder.embed(["The cat sits on the mat"]) == embedder.embed(["The cat sits on the mat"])


def test_concurrent_writes_are_embedded_together_and_each_gets_its_own_vectors(embedder):
    texts = [[f"fact {i} about topic {i % 3}", f"another fact {i}"] for i in range(12)]
    runs = []
    embed = embedder.embed

    def counting(batch):
        runs.append(len(batch))
        return embed(batch)

    embedder.embed = counting
    try:
        async def together():
            return await asyncio.gather(*(embedder.embed_together(t) for t in texts))

        results = asyncio.run(together())
    finally:
        del embedder.embed
    assert len(runs) < len(texts) and sum(runs) == 24  # fewer runs than calls
    for mine, vectors in zip(texts, results):
        alone = embedder.embed(mine)
        assert len(vectors) == 2
        # The int8 graph quantizes a run's activations by the run's range: close, not equal.
        assert all(_cosine(v, a) > 0.98 for v, a in zip(vectors, alone))
