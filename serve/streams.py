"""Streams of the service: a reply judged while it is generated (runtime/stream.py), as an HTTP resource any client
can drive (server-sent events alone could not carry the client's chunks).

- POST /v1/streams: {prompt?, conversation?, media?, categories?, mode?, every?, sentences?, hysteresis?} -> 201
  {"id", "idle_timeout_s", "lifetime_s"}.
- POST /v1/streams/{id}/chunks: {"text": "..."} -> {"checks": [...], "stopped": bool}: the checks of every check
  point the chunk crossed (an unsafe one ends the list and the stream).
- POST /v1/streams/{id}/close -> {"result": {...}, "flagged": bool}: the whole reply's result; the stream is gone.

Limits (ServeConfig): open streams (`max_streams`, then 429), idle time (`stream_idle_s`) and lifetime
(`stream_lifetime_s`), after which a stream is dropped with its cache (404 then), and the decoder cache all streams
hold together (`stream_kv_bytes`: a chunk that would pass it stops its stream with an `error` check, fail closed).
Chunks of one stream run one at a time; different streams run in parallel threads on the shared sessions. On
shutdown every open stream is closed: a request to it then gets 410 and says the service stopped.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations from here

from ..runtime.errors import InputError
from .inputs import MODES, guard_request

STREAM_FIELDS = {"prompt", "conversation", "media", "categories", "mode", "every", "sentences", "hysteresis"}
MAX_CHUNK_CHARS = 1 << 16  # one chunk's text


@dataclass
class OpenStream:
    stream: object  # runtime.stream.GuardStream
    key: tuple  # the Guard's (client, mode, categories)
    created: float
    used: float
    lock: threading.Lock = field(default_factory=threading.Lock)


class StreamLimitError(Exception):
    """Too many open streams (a 429), or the service is stopping (a 503)."""


class NoStream(Exception):
    """No open stream of this id for this client (a 404: closed, timed out, another client's or never opened)."""


class StreamGone(Exception):
    """The stream was closed when the service stopped (a 410)."""


MIN_EVERY = 16  # the service's smallest `every`: a check per reply token would cost a decoder run per token


class Streams:
    """The open streams of one service, with their limits; the Guards come from the service's bounded set."""

    def __init__(self, guard_for, config, public=lambda result: result):
        self.guard_for, self.config, self.public = guard_for, config, public
        self.open: dict[str, OpenStream] = {}
        self.closed_by_stop: set[str] = set()
        self._lock = threading.Lock()
        self.stopping = False

    # -- life cycle -------------------------------------------------------------------------------------
    def create(self, body, principal: str) -> tuple[str, OpenStream]:
        if not isinstance(body, dict):
            raise InputError(f"the body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - STREAM_FIELDS)
        if unknown:
            raise InputError(f"unknown field(s) {unknown}: {', '.join(sorted(STREAM_FIELDS))}")
        options = {k: body[k] for k in ("every", "sentences", "hysteresis") if k in body}
        every = options.get("every", 64)
        if isinstance(every, int) and not isinstance(every, bool) and 0 < every < MIN_EVERY:
            raise InputError(f"every must be at least {MIN_EVERY} reply tokens here (or null: sentence ends only), not "
                             f"{every}")
        request = {k: body[k] for k in ("prompt", "conversation", "media", "categories", "mode") if k in body}
        request.setdefault("mode", "verdict")
        if request["mode"] not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, not {request['mode']!r}")
        if "prompt" not in request and "conversation" not in request:
            request["prompt"] = ""  # a reply without a prompt: guard_request needs something to judge
        req, mode, codes = guard_request(request)
        self.reap()
        with self._lock:
            if self.stopping:
                raise StreamLimitError("the service is stopping")
            if len(self.open) >= self.config.max_streams:
                raise StreamLimitError(f"{len(self.open)} streams are open, the most this service keeps "
                                       f"({self.config.max_streams}): close one or wait")
        guard = self.guard_for((principal, mode, codes))
        stream = guard.stream(req.get("text"), conversation=req.get("conversation"), media=req.get("media"),
                              **options)
        now = time.monotonic()
        sid = f"strm-{secrets.token_hex(12)}"
        with self._lock:
            if len(self.open) >= self.config.max_streams or self.stopping:  # raced with others: still bounded
                raise StreamLimitError("the service is stopping" if self.stopping else "too many open streams")
            self.open[sid] = OpenStream(stream, (principal, mode, codes), now, now)
        return sid, self.open[sid]

    def get(self, sid: str, principal: str) -> OpenStream:
        """The open stream `sid` of this client; KeyError for another client's (as for none: its existence is not
        told)."""
        self.reap()
        with self._lock:
            entry = self.open.get(sid)
        if entry is not None and entry.key[0] != principal:
            raise NoStream(sid)
        if entry is None:
            if sid in self.closed_by_stop:
                raise StreamGone(sid)
            raise NoStream(sid)
        entry.used = time.monotonic()
        return entry

    def feed(self, sid: str, body, principal: str) -> dict:
        if not isinstance(body, dict) or set(body) != {"text"} or not isinstance(body["text"], str):
            raise InputError('the body must be {"text": "<the reply\'s next chunk>"}')
        if len(body["text"]) > MAX_CHUNK_CHARS:
            raise InputError(f"text: {len(body['text'])} characters, more than one chunk may hold ({MAX_CHUNK_CHARS})")
        entry = self.get(sid, principal)
        with entry.lock:
            checks = entry.stream.feed(body["text"])
            checks = self._within_memory(entry, checks)
            entry.used = time.monotonic()
        return {"checks": [check_json(c) for c in checks], "stopped": entry.stream.stopped is not None}

    def close(self, sid: str, principal: str) -> dict:
        entry = self.get(sid, principal)
        with entry.lock:
            result = entry.stream.close()
        with self._lock:
            self.open.pop(sid, None)
        out = self.public(result.to_dict())
        out["flagged"] = result.verdict != "safe"
        return {"result": out, "flagged": out["flagged"]}

    def reap(self) -> int:
        """Drop streams idle or alive past their limits (their caches go with them); -> how many."""
        now, cfg = time.monotonic(), self.config
        with self._lock:
            old = [sid for sid, e in self.open.items()  # a stream whose chunk is running is busy, not idle
                   if (now - e.used > cfg.stream_idle_s and not e.lock.locked())
                   or now - e.created > cfg.stream_lifetime_s]
            for sid in old:
                self.open.pop(sid, None)
        return len(old)

    def stop(self) -> None:
        """Shutdown: every open stream is closed; later requests to them get 410."""
        with self._lock:
            self.stopping = True
            self.closed_by_stop |= set(self.open)
            self.open.clear()

    def in_use(self) -> set:
        with self._lock:
            return {e.key for e in self.open.values()}

    # -- memory ---------------------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        with self._lock:
            entries = list(self.open.values())
        return sum(e.stream.cache_bytes for e in entries)

    def _within_memory(self, entry: OpenStream, checks: list) -> list:
        """The checks, unless the streams' caches together now pass `stream_kv_bytes`: then this stream stops with
        an error check (fail closed: its reply is not judged further)."""
        total = self.kv_bytes()
        if total <= self.config.stream_kv_bytes or entry.stream.stopped is not None:
            return checks
        stop = entry.stream.fail(InputError(
            f"the open streams' decoder caches take {total / 2**20:.0f} MiB, over the service's limit of "
            f"{self.config.stream_kv_bytes / 2**20:.0f} MiB (ServeConfig.stream_kv_bytes): this stream stops"))
        return [*checks, stop]


def check_json(check) -> dict:
    r = check.result
    return {"position": check.position, "verdict": r.verdict, "flagged": r.verdict != "safe", "p_unsafe": r.p_unsafe,
            "categories": [c["code"] for c in r.categories], "stop": check.stop,
            **({"error": r.error} if r.error else {})}


def add_routes(app, service, ask):
    """The /v1/streams routes. `ask(request, endpoint, work)`: the service's common path (readiness, a slot of
    max_concurrent, auth, body) that runs `work(body)` in a thread and answers its dict, or the refusal."""
    @app.post("/v1/streams", status_code=201)
    async def create(request: Request):
        def work(body, principal):
            sid, _ = service.streams.create(body, principal)
            return {"id": sid, "idle_timeout_s": service.config.stream_idle_s,
                    "lifetime_s": service.config.stream_lifetime_s}
        return await ask(request, "streams", work, status=201)

    @app.post("/v1/streams/{sid}/chunks")
    async def chunk(sid: str, request: Request):
        return await ask(request, "stream_chunks", lambda body, who: service.streams.feed(sid, body, who))

    @app.post("/v1/streams/{sid}/close")
    async def close(sid: str, request: Request):
        return await ask(request, "stream_close", lambda body, who: service.streams.close(sid, who), empty_body=True)
