"""A Redis cache of query embeddings, shared by the nodes (docker and distributed modes; off
in local mode): recalling the same text again skips the model (~4 ms for a short query on one
thread here). Keyed by (model id, BLAKE2b of the text), so a vector is only ever reused for
the model that made it, and a cached vector is the very bytes the model gave: results are
identical with or without the cache. A cache that fails is bypassed, never an error."""

from __future__ import annotations

import logging
import time

from synapse.memory.libraries import load
from synapse.state.memory import content_hash

log = logging.getLogger(__name__)

TTL_S = 7 * 86_400  # an entry unused this long goes
RETRY_AFTER_S = 5.0  # after a failure the cache is bypassed this long


class EmbeddingCache:
    def __init__(self, url: str) -> None:
        self.url = url
        self._client = None
        self._down_until = 0.0
        self.hits = self.misses = self.errors = 0

    def _redis(self):
        if self._client is None:
            redis = load("redis")
            # Short timeouts: a slow cache must cost less than the embedding it saves.
            self._client = redis.Redis.from_url(self.url, socket_timeout=0.2, socket_connect_timeout=0.2)
        return self._client

    @staticmethod
    def _key(model_id: str, text: str) -> str:
        return f"synapse:emb:{model_id}:{content_hash(text).hex()}"

    def get(self, model_id: str, text: str) -> bytes | None:
        if time.monotonic() < self._down_until:
            return None
        try:
            found = self._redis().getex(self._key(model_id, text), ex=TTL_S)
        except Exception as e:
            self._failed(e)
            return None
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, model_id: str, text: str, vector: bytes) -> None:
        if time.monotonic() < self._down_until:
            return
        try:
            self._redis().set(self._key(model_id, text), vector, ex=TTL_S)
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        self.errors += 1
        self._down_until = time.monotonic() + RETRY_AFTER_S
        log.warning("embedding cache %s: %s: %s; embedding without it for %g s", self.url, type(e).__name__, e,
                    RETRY_AFTER_S)
