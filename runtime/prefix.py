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
