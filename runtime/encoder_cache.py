"""Encoder cache: features of media already encoded, by the content hash of the encoder's exact input (pixel rows
and grid, or log-mel frames), least recently used first out, bounded by bytes.

Keys hash what the graph is fed, after preprocessing: the same picture sent as PNG and as JPEG decodes to
different pixels and is two entries; the same file sent twice is one. A hit skips the encoder; the features
returned are those the encoder computed for the first request (when several items were encoded in one graph run,
their features may differ from a run of that item alone in the last bits of float32).

Shared between requests, a cache tells whoever can time a request whether the same media went through recently
(a hit skips the encoder, and the result's timings then have no `vision`/`audio` entry). A service judging several
tenants' media should give each tenant its own Guard options or turn it off (`encoder_cache_bytes=0`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from .checked import is_int

DEFAULT_BYTES = 256 * 2**20


def content_key(kind: str, array: np.ndarray, grid=None) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{kind}|{array.dtype.str}|{array.shape}|{tuple(grid) if grid is not None else ''}|".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


class EncoderCache:
    """`max_bytes`: the most feature bytes held (0: nothing is cached)."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        if not is_int(max_bytes) or max_bytes < 0:
            raise ValueError(f"encoder cache size must be a number of bytes >= 0, not {max_bytes!r}")
        self.max_bytes, self.nbytes = int(max_bytes), 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # one Guard may serve several threads

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, features: np.ndarray) -> None:
        size = int(features.nbytes)
        if size > self.max_bytes or key in self._items:
            return
        value = features.copy()
        value.flags.writeable = False  # shared by every request that hits it
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= int(old.nbytes)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0
