"""Policy-prefix KV cache: the decoder's cache of the prompt's fixed opening (system message, task, the policy's
categories, up to the first token that depends on the request), computed once per (bundle, policy, template) and
reused by every request that starts with the same tokens.

Reuse is decided on token ids, never assumed: a request reuses the first M cached positions where M is the
longest common prefix of its own prompt ids (tokenized whole, as without the cache) and the cached ids, stopped
before its first media placeholder (those positions hold encoder features, not token embeddings) and before its
last token (whose logits must be computed). The decoder is causal, so the first M positions of a cached prefix
are exactly the cache of those M tokens: no token boundary has to be stable for the reuse to be exact, and when
the tokenizer merges across the boundary (tokens(prefix + rest) != tokens(prefix) + tokens(rest)) the match just
ends earlier. Text positions before any media are 0..M-1 on all three TMRoPE rows; the Guard checks that too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CachedPrefix:
    ids: tuple[int, ...]
    past: tuple[np.ndarray, ...]  # past_key_0, past_value_0, ... [1, kv_heads, len(ids), head_dim]

    @property
    def nbytes(self) -> int:
        from .decode import kv_nbytes

        return sum(kv_nbytes(p) for p in self.past)


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def reusable(ids, prefix: CachedPrefix, media_ids) -> int:
    """How many of `ids`'s leading tokens the cached `prefix` covers (see the module's docstring)."""
    arr = np.asarray(ids)
    m = common_prefix(arr, prefix.ids)
    media = np.flatnonzero(np.isin(arr[:m], list(media_ids)))
    if media.size:
        m = int(media[0])
    return max(0, min(m, len(ids) - 1))


class PrefixCache:
    """Cached prefixes by key (template kind); `nbytes` is what they hold."""

    def __init__(self):
        self.entries: dict[str, CachedPrefix] = {}

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def get(self, key: str) -> CachedPrefix | None:
        return self.entries.get(key)

    def put(self, key: str, ids, past) -> CachedPrefix:
        entry = CachedPrefix(tuple(int(i) for i in ids), tuple(past))
        self.entries[key] = entry
        return entry

    def clear(self) -> None:
        self.entries.clear()


class PolicyPrefix(PrefixCache):
    """A Guard's prefix cache, keyed by template kind ("text", "image": prompt.template_kind): each template's
    fixed opening is built on first use (once, when threads share the Guard), and a request's decoder state starts
    from the longest part of it the request's prompt ids share.

    `probe_ids(kind, text)`: the prompt ids of a probe request of that template kind whose only free content is
    `text`; `embed_tokens(ids)`: token embeddings; `media_ids`: the placeholder token ids."""

    def __init__(self, decoder, embed_tokens, media_ids, probe_ids):
        super().__init__()
        self.decoder, self.embed_tokens, self.media_ids, self.probe_ids = decoder, embed_tokens, media_ids, probe_ids
        self._lock = threading.Lock()

    def start(self, ids: list[int], kind: str, positions: np.ndarray, delta: int, run_options, capacity: int):
        """(decoder state holding the cached prefix's first M positions, M) for these prompt ids and their
        TMRoPE positions, or (None, 0) when nothing is reused (text positions before any media must be 0..M-1 on
        all three rows for the cached cache to be exact)."""
        entry = self.get(kind)
        if entry is None:
            with self._lock:
                entry = self.get(kind) or self._build(kind, run_options)
        m = reusable(ids, entry, self.media_ids) if entry is not None else 0
        if m < 1 or not np.array_equal(positions[:, 0, :m], np.broadcast_to(np.arange(m), (3, m))):
            return None, 0
        past = self.decoder.first(list(entry.past), m)
        return self.decoder.start(delta, run_options, past, m, capacity=capacity), m

    def _build(self, kind: str, run_options) -> CachedPrefix | None:
        """The template's fixed opening: the common ids of two probe requests, up to the first media token."""
        probes = [self.probe_ids(kind, p) for p in ("a", "1")]
        same = common_prefix(*probes)
        media = [i for i, t in enumerate(probes[0][:same]) if t in self.media_ids]
        prefix = probes[0][: media[0] if media else same]
        if len(prefix) < 2:
            return None
        state = self.decoder.start(0, run_options)
        self.decoder.extend(state, self.embed_tokens(prefix)[None])
        return self.put(kind, prefix, self.decoder.cache(state))
