"""Streams of the service: a reply judged while it is generated (runtime/stream.py), as an HTTP resource any client
can drive (server-sent events alone could not carry the client's chunks).

- POST /v1/streams: {prompt?, conversation?, media?, categories?, mode?, every?, sentences?, hysteresis?} -> 201
  {"id", "idle_timeout_s", "lifetime_s"}.
- POST /v1/streams/{id}/chunks: {"text": "..."} -> {"checks": [...], "stopped": bool}: the checks of every check
  point the chunk crossed (an unsafe one ends the list and the stream). One chunk of a stream at a time: another
  sent while one is being judged is a 409 (its text is not taken).
- POST /v1/streams/{id}/close -> {"result": {...}, "flagged": bool}: the whole reply's result; the stream is gone.

Limits (ServeConfig), the service's and each client's (an API key's; with no key there is one client and the
service's limits are its), so that one client cannot take what the others need: open streams (`max_streams`,
`client_streams`: then 429); the Guards (mode, categories) a client's streams hold (`client_guards`; the service
keeps `guards`); the decoder cache the streams hold (`stream_kv_bytes`, `client_stream_kv_bytes`), reserved before a
check makes a cache grow: a check that would pass either stops its stream with an `error` check (fail closed)
before the memory is taken; idle time (`stream_idle_s`) and lifetime (`stream_lifetime_s`), after which a stream is
dropped with its cache (404 then). Stream requests run on `stream_workers` threads that take the clients in turn
(serve/workers.py), a long chunk in slices (serve/stream_routes.py); one not judged within `timeout_s` is a 504
that says whether anything was taken: if it had not started, nothing was; a chunk whose job had started stops its
stream once that job ends (its checks were not all answered), a stream made for nobody is dropped. On shutdown
every open stream is closed: a request to it then gets 410.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from dataclasses import dataclass

from ..runtime.checked import is_int
from ..runtime.errors import InputError, MemoryBudgetError
from .inputs import MODES, guard_request

STREAM_FIELDS = {"prompt", "conversation", "media", "categories", "mode", "every", "sentences", "hysteresis"}
MAX_CHUNK_CHARS = 1 << 16  # one chunk's text
MIN_EVERY = 16  # the service's smallest `every`: a check per reply token would cost a decoder run per token


@dataclass
class OpenStream:
    sid: str
    stream: object  # runtime.stream.GuardStream
    key: tuple  # the Guard's (client, mode, categories)
    created: float
    used: float
    busy: bool = False  # a request of this stream is queued or running
    reserved: int = 0  # cache bytes it may hold (asked before its cache grows; none once it stopped)


class StreamLimitError(Exception):
    """Too many open streams, the service's or the client's (a 429), or the service is stopping (a 503)."""


class NoStream(Exception):
    """No open stream of this id for this client (a 404: closed, timed out, another client's or never opened)."""


class StreamGone(Exception):
    """The stream was closed when the service stopped (a 410)."""


class StreamBusy(Exception):
    """A request of this stream is being judged (a 409: chunks go one at a time, in order)."""


class Streams:
    """The open streams of one service, with their limits; the Guards come from the service's bounded set."""

    def __init__(self, guard_for, config, public=lambda result: result):
        self.guard_for, self.config, self.public = guard_for, config, public
        self.open: dict[str, OpenStream] = {}
        self.closed_by_stop: set[str] = set()
        self._lock = threading.Lock()
        self.stopping = False

    # -- life cycle -------------------------------------------------------------------------------------
    def create(self, body, principal: str, deadline: float | None = None) -> tuple[str, OpenStream]:
        if not isinstance(body, dict):
            raise InputError(f"the body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - STREAM_FIELDS)
        if unknown:
            raise InputError(f"unknown field(s) {unknown}: {', '.join(sorted(STREAM_FIELDS))}")
        options = {k: body[k] for k in ("every", "sentences", "hysteresis") if k in body}
        every = options.get("every", 64)
        if is_int(every) and 0 < every < MIN_EVERY:
            raise InputError(f"every must be at least {MIN_EVERY} reply tokens here (or null: sentence ends only), not "
                             f"{every}")
        request = {k: body[k] for k in ("prompt", "conversation", "media", "categories", "mode") if k in body}
        request.setdefault("mode", "verdict")
        if request["mode"] not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, not {request['mode']!r}")
        if "prompt" not in request and "conversation" not in request:
            request["prompt"] = ""  # a reply without a prompt: guard_request needs something to judge
        req, mode, codes = guard_request(request)
        key = (principal, mode, codes)
        self.reap()
        with self._lock:
            self._admit(key)
        guard = self.guard_for(key)
        stream = guard.stream(req.get("text"), conversation=req.get("conversation"), media=req.get("media"),
                              **options)
        now = time.monotonic()
        sid = f"strm-{secrets.token_hex(12)}"
        stream.on_grow = functools.partial(self._grow, sid, principal)
        with self._lock:
            self._admit(key)  # raced with others: still bounded
            self.open[sid] = OpenStream(sid, stream, key, now, now)
        if deadline is not None and time.monotonic() > deadline:  # its caller was answered 504: nobody has the id
            self.drop(sid)
            raise TimeoutError("the stream was made after its request's timeout")
        return sid, self.open[sid]

    def _admit(self, key: tuple) -> None:
        """StreamLimitError unless a stream of Guard `key` may open: the service's and the client's limits (the
        caller holds the lock)."""
        cfg, principal = self.config, key[0]
        if self.stopping:
            raise StreamLimitError("the service is stopping")
        if len(self.open) >= cfg.max_streams:
            raise StreamLimitError(f"{len(self.open)} streams are open, the most this service keeps "
                                   f"({cfg.max_streams}): close one or wait")
        held = {e.key for e in self.open.values()}
        if key not in held and len(held) >= cfg.guards:  # the Guards streams hold: Service.guard_for keeps them
            raise StreamLimitError(f"all {cfg.guards} Guards of the service serve open streams (ServeConfig.guards): "
                                   "close a stream or use its mode and categories")
        if not cfg.keys():  # no API keys: every request is the one client, the service's limits are its
            return
        self._within_client_streams(principal)
        mine = [e.key for e in self.open.values() if e.key[0] == principal]
        if key not in mine and len(set(mine)) >= cfg.client_guards:
            raise StreamLimitError(f"this client's open streams use {len(set(mine))} (mode, categories) settings, the "
                                   f"most one client may ({cfg.client_guards}): use one of theirs or close a stream")

    def claim(self, sid: str, principal: str) -> OpenStream:
        """The open stream `sid` of this client, marked busy until `release`: NoStream for another client's (as for
        none: its existence is not told), StreamBusy while another request of it is queued or running."""
        self.reap()
        with self._lock:
            entry = self.open.get(sid)
            if entry is None or entry.key[0] != principal:
                raise StreamGone(sid) if entry is None and sid in self.closed_by_stop else NoStream(sid)
            if entry.busy:
                raise StreamBusy(sid)
            entry.busy, entry.used = True, time.monotonic()
        return entry

    def release(self, entry: OpenStream, stop: bool = False) -> None:
        """The request of `entry` is over. `stop`: its chunk was taken and not wholly judged (its request timed out
        or went away): the stream stops with an error check, fail closed (nobody received the rest's checks)."""
        stream = entry.stream
        if stop and stream.stopped is None and not stream.closed:
            stream.fail(TimeoutError("the chunk's request ended before its checks were answered: the stream stops"))
        with self._lock:
            entry.busy, entry.used = False, time.monotonic()

    def feed(self, entry: OpenStream, text: str, deadline: float | None = None, limit: int | None = None) -> dict:
        """The chunk's checks, at most `limit` of them now ("more": the rest wait for `resume`)."""
        return self._answer(entry, entry.stream.feed(text, deadline=deadline, limit=limit))

    def resume(self, entry: OpenStream, deadline: float | None = None, limit: int | None = None) -> dict:
        return self._answer(entry, entry.stream.resume(deadline=deadline, limit=limit))

    def _answer(self, entry: OpenStream, checks: list) -> dict:
        return {"checks": [check_json(c) for c in checks], "stopped": entry.stream.stopped is not None,
                "more": entry.stream.pending > 0}

    def admit_client(self, principal: str) -> None:
        """StreamLimitError when this client may open no stream now (checked again, whole, when it is made)."""
        if self.config.keys():
            with self._lock:
                self._within_client_streams(principal)

    def _within_client_streams(self, principal: str) -> None:
        """StreamLimitError when this client keeps client_streams open streams (the caller holds the lock)."""
        mine = sum(1 for e in self.open.values() if e.key[0] == principal)
        if mine >= self.config.client_streams:
            raise StreamLimitError(f"this client has {mine} open streams, the most one client may keep "
                                   f"({self.config.client_streams}): close one or wait")

    def close(self, entry: OpenStream) -> dict:
        result = entry.stream.close()
        self.drop(entry.sid)
        out = self.public(result.to_dict())
        out["flagged"] = result.verdict != "safe"
        return {"result": out, "flagged": out["flagged"]}

    def drop(self, sid: str) -> None:
        with self._lock:
            self.open.pop(sid, None)

    def reap(self) -> int:
        """Drop streams idle or alive past their limits (their caches go with them); -> how many."""
        now, cfg = time.monotonic(), self.config
        with self._lock:
            old = [sid for sid, e in self.open.items()  # a stream whose request is queued or running is not idle
                   if (now - e.used > cfg.stream_idle_s and not e.busy) or now - e.created > cfg.stream_lifetime_s]
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
    @property
    def reserved(self) -> dict[str, int]:
        """Cache bytes each open stream has reserved (at least what it holds): a stopped stream holds none, a closed or
        dropped one is gone with its entry."""
        with self._lock:
            return self._reserved()

    def _reserved(self) -> dict[str, int]:
        return {sid: e.reserved for sid, e in self.open.items() if e.reserved and e.stream.stopped is None}

    def kv_bytes(self) -> int:
        return sum(self.reserved.values())

    def _grow(self, sid: str, principal: str, nbytes: int) -> None:
        """A stream's cache is about to hold `nbytes` (GuardStream.on_grow): reserved, unless the streams' caches
        would pass the service's or the client's limit; then MemoryBudgetError, and the stream stops with an error
        check before the memory is taken."""
        cfg = self.config
        with self._lock:
            entry = self.open.get(sid)
            if entry is None:  # dropped (its lifetime, shutdown) while this check ran
                raise MemoryBudgetError("the stream was closed by the service: it stops")
            reserved = self._reserved()
            others = sum(b for s, b in reserved.items() if s != sid)
            mine = sum(b for s, b in reserved.items() if s != sid and self.open[s].key[0] == principal)
            if others + nbytes > cfg.stream_kv_bytes:
                raise MemoryBudgetError(
                    f"the open streams' decoder caches would take {(others + nbytes) / 2**20:.0f} MiB, over the "
                    f"service's limit of {cfg.stream_kv_bytes / 2**20:.0f} MiB (ServeConfig.stream_kv_bytes): this "
                    "stream stops")
            if cfg.keys() and mine + nbytes > cfg.client_stream_kv_bytes:
                raise MemoryBudgetError(
                    f"this client's open streams' decoder caches would take {(mine + nbytes) / 2**20:.0f} MiB, over "
                    f"one client's limit of {cfg.client_stream_kv_bytes / 2**20:.0f} MiB "
                    "(ServeConfig.client_stream_kv_bytes): this stream stops")
            entry.reserved = nbytes


def check_json(check) -> dict:
    r = check.result
    return {"position": check.position, "verdict": r.verdict, "flagged": r.verdict != "safe", "p_unsafe": r.p_unsafe,
            "categories": [c["code"] for c in r.categories], "stop": check.stop,
            **({"error": r.error} if r.error else {})}
