"""The service's settings (`ServeConfig`, checked when made) and who a request comes from (its API key's client)."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from ..runtime.checked import is_int


@dataclass(frozen=True)
class ServeConfig:
    max_body_bytes: int = 32 * 2**20  # a request body; media come inside it, base64
    max_concurrent: int = 256  # requests in the service at once (queued or running); more: 429
    queue_size: int = 64  # jobs waiting for the batcher; more: 429
    max_batch: int = 8  # requests judged in one moderate_batch call
    batch_wait_s: float = 0.005  # how long the batcher waits for more requests to join a batch
    timeout_s: float = 60.0  # a request not judged within this: 504
    api_key: str | None = None  # required as `Authorization: Bearer KEY` when set
    # more keys, each its own client (principal): the Guards, and so the encoder caches and streams, are per key
    api_keys: tuple = ()
    warmup: bool = True  # one moderation before /ready: the policy prefix and the sessions' first runs
    guards: int = 8  # Guards kept for distinct (mode, categories) of /v1/guard, least recently used dropped
    max_streams: int = 64  # open /v1/streams; more: 429
    stream_idle_s: float = 60.0  # a stream without a request for this long is dropped with its cache
    stream_lifetime_s: float = 600.0  # a stream older than this is dropped
    stream_kv_bytes: int = 2 << 30  # decoder caches all open streams may hold together; past it a stream stops
    # each client's (API key's) share, so that one client cannot take what the others need
    client_streams: int = 8  # open streams of one client
    client_stream_kv_bytes: int = 512 << 20  # decoder caches one client's streams may hold
    client_guards: int = 2  # (mode, categories) settings one client's open streams may hold Guards for
    stream_workers: int = 2  # threads judging stream requests, taking the clients in turn
    # /metrics needs the API key when one is set, except from these networks (a scraper's), by the TCP peer's
    # address only: X-Forwarded-For is never read (any client can write it)
    metrics_from: tuple = ()
    # per-request stage timings (and token times) in answers: off by default, since they tell whether a medium was
    # in the encoder cache (the vision or audio stage is missing), i.e. whether another client sent it recently
    stage_timings: bool = False

    def __post_init__(self):
        for name in ("max_body_bytes", "max_concurrent", "queue_size", "max_batch", "guards", "max_streams",
                     "stream_kv_bytes", "client_streams", "client_stream_kv_bytes", "client_guards", "stream_workers"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be an int >= 1, not {value!r}")
        if not (self.timeout_s > 0 and self.batch_wait_s >= 0 and self.stream_idle_s > 0 and self.stream_lifetime_s > 0):
            raise ValueError("ServeConfig needs timeout_s, stream_idle_s and stream_lifetime_s > 0, batch_wait_s >= 0")
        try:
            object.__setattr__(self, "metrics_from", tuple(ipaddress.ip_network(n, strict=False)
                                                           for n in self.metrics_from))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ServeConfig.metrics_from must be networks such as 10.0.0.0/8 ({exc})") from None
        if not isinstance(self.api_keys, tuple) or not all(isinstance(k, str) and k.strip() for k in self.api_keys):
            raise ValueError("ServeConfig.api_keys must be a tuple of non-empty strings (an empty key would accept "
                             "requests without one)")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("ServeConfig.api_key must be a non-empty string or None (an empty key would accept "
                             "requests without one)")


    def keys(self) -> tuple[str, ...]:
        """Every key the service accepts (none: no authentication)."""
        return ((self.api_key,) if self.api_key is not None else ()) + self.api_keys


def principal_of(key: bytes | None) -> str:
    """A client's name in the service's keys (Guards, streams): a digest of its API key, never the key; "-" when the
    service has no keys (one client)."""
    return hashlib.sha256(key).hexdigest()[:16] if key is not None else "-"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
