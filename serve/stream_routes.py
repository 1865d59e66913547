"""The HTTP side of the service's streams (serve/streams.py holds them): the /v1/streams routes and the path every
stream request takes: readiness, a slot of max_concurrent, auth and body as for the one-shot requests, then a job
on the stream workers (serve/workers.py: the clients in turn) within the request's timeout, and the refusals
(400, 404, 409, 410, 429, 503, 504)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations from here
from fastapi.responses import JSONResponse

from ..runtime.errors import InputError
from .batcher import Closed, QueueFull
from .streams import MAX_CHUNK_CHARS, NoStream, StreamBusy, StreamGone, StreamLimitError


def chunk_text(body) -> str:
    if not isinstance(body, dict) or set(body) != {"text"} or not isinstance(body["text"], str):
        raise InputError('the body must be {"text": "<the reply\'s next chunk>"}')
    if len(body["text"]) > MAX_CHUNK_CHARS:
        raise InputError(f"text: {len(body['text'])} characters, more than one chunk may hold ({MAX_CHUNK_CHARS})")
    return body["text"]


SLICE_CHECKS = 4  # checks a chunk's job judges before the next client's turn (the rest: another job, re-queued)


@dataclass
class Work:
    """A stream request's work on the stream workers: `first()`, then `then(answer)` while it gives a next slice;
    `release(stop)` once, when the request is over (`stop`: its chunk was taken and not wholly answered); `abandon(
    answer)` for an answer that came after the request had given up (a stream made for nobody)."""

    first: Callable[[], dict]
    release: Callable[[bool], None] = lambda stop: None
    then: Callable[[dict], Callable[[], dict] | None] = lambda answer: None
    abandon: Callable[[dict], None] = lambda answer: None


def merged(a: dict | None, b: dict) -> dict:
    """A chunk's answer over its slices: their checks in order, the last slice's state."""
    return b if a is None else {**b, "checks": a["checks"] + b["checks"]}


def add_routes(app, service, http):
    """The /v1/streams routes. `http`: the service's admit, release, authorize, body_json and problem (serve/app.py)."""
    streams, config = service.streams, service.config

    async def ask(request: Request, endpoint: str, plan, status: int = 200, empty_body: bool = False):
        """A stream request: readiness, a slot of max_concurrent, auth and body as for the others; then `plan(body,
        client, deadline)` -> Work (it may refuse: 400, 404, 409, 410, 429) run slice by slice on the stream workers
        (each slice queued behind the other clients' turns) within the timeout; its answer, or the refusal."""
        start = time.perf_counter()
        deadline = time.monotonic() + config.timeout_s
        if (refused := http.admit(endpoint)) is not None:
            return refused
        try:
            if empty_body:
                body, refused = None, http.authorize(request, endpoint)
            else:
                body, refused = await http.body_json(request, endpoint)
            if refused is not None:
                return refused
            try:
                work = plan(body, request.state.principal, deadline)
            except Exception as exc:  # noqa: BLE001 (mapped below; anything else is the 500 handler's)
                return refusal(exc, endpoint)
            out = await run(work, request.state.principal, deadline, endpoint)
            if not isinstance(out, dict):
                return out  # a refusal
        finally:
            http.release()
        out.pop("more", None)
        service.metrics.requests.labels(endpoint, str(status)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return JSONResponse(out, status_code=status)

    async def run(work: Work, client: str, deadline: float, endpoint: str):
        """The answer of `work`'s slices, or the refusal. Exactly one `work.release`."""
        answer, job, taken = None, work.first, False
        while True:
            try:
                future = service.workers.submit(client, job, admitted=taken)
            except (QueueFull, Closed) as exc:
                work.release(taken)
                if isinstance(exc, QueueFull):
                    return http.problem(429, "busy", "too many stream requests waiting", endpoint, {"Retry-After": "1"})
                return http.problem(503, "not_ready", "the service is stopping", endpoint, extra={"taken": taken})
            try:
                out = await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()))
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                # this request's task cancelled (its client went away, a forced shutdown), not only its job (the
                # workers closed: that is a 503)
                gone = isinstance(exc, asyncio.CancelledError) and asyncio.current_task().cancelling() > 0
                closed = isinstance(exc, asyncio.CancelledError) and not gone
                if future.cancel():  # not started (or cancelled already): it never will
                    work.release(taken)
                    ended = False
                elif future.done() and not gone:  # it ended in the meantime: its answer stands
                    ended, out = True, future.exception() or future.result()
                else:  # running: settled (the stream stopped, a made stream dropped) once it ends
                    future.add_done_callback(lambda f, prior=taken: _settle(work, f, prior))
                    ended, taken = False, True
                if gone:
                    raise
                if closed and not ended:
                    return http.problem(503, "not_ready", "the service is stopping", endpoint, extra={"taken": taken})
                if not ended:
                    return http.problem(504, "timeout", f"not judged within {config.timeout_s:g} s; " + (
                        "it was taken and is undone: a chunk's stream stops (its checks were not all answered), a "
                        "stream being made is dropped" if taken else "nothing was taken: send it again"), endpoint,
                        extra={"taken": taken})
            except Exception as exc:  # noqa: BLE001
                out = exc
            if isinstance(out, BaseException):
                work.release(taken)
                return refusal(out, endpoint)
            taken, answer = True, merged(answer, out)
            job = work.then(out)
            if job is None:
                work.release(False)
                return answer

    def refusal(exc: Exception, endpoint: str):
        """The answer to a stream request refused or failed with `exc` (re-raised when it is none of these)."""
        if isinstance(exc, InputError):
            return http.problem(400, "invalid_request", str(exc), endpoint)
        if isinstance(exc, StreamLimitError):
            return http.problem(429, "busy", str(exc), endpoint, {"Retry-After": "1"})
        if isinstance(exc, NoStream):
            return http.problem(404, "not_found", "no such stream (closed, timed out or never opened)", endpoint)
        if isinstance(exc, StreamGone):
            return http.problem(410, "gone", "the stream was closed when the service stopped", endpoint)
        if isinstance(exc, StreamBusy):
            return http.problem(409, "conflict", "a chunk of this stream is being judged: send the next one after "
                                "its answer (its text was not taken)", endpoint)
        if isinstance(exc, TimeoutError):  # a stream made after its request's timeout, dropped
            return http.problem(504, "timeout", f"not judged within {config.timeout_s:g} s; the stream made for it "
                                "was dropped", endpoint, extra={"taken": True})
        raise exc

    @app.post("/v1/streams", status_code=201)
    async def create(request: Request):
        def plan(body, principal, deadline):
            streams.admit_client(principal)  # before the body's media are parsed and a worker taken

            def job():
                sid, _ = streams.create(body, principal, deadline)
                return {"id": sid, "idle_timeout_s": config.stream_idle_s, "lifetime_s": config.stream_lifetime_s}
            return Work(job, abandon=lambda answer: streams.drop(answer["id"]))
        return await ask(request, "streams", plan, status=201)

    @app.post("/v1/streams/{sid}/chunks")
    async def chunk(sid: str, request: Request):
        def plan(body, principal, deadline):
            text = chunk_text(body)
            entry = streams.claim(sid, principal)
            return Work(lambda: streams.feed(entry, text, deadline, SLICE_CHECKS),
                        release=lambda stop: streams.release(entry, stop),
                        then=lambda answer: (lambda: streams.resume(entry, deadline, SLICE_CHECKS))
                        if answer["more"] else None)
        return await ask(request, "stream_chunks", plan)

    @app.post("/v1/streams/{sid}/close")
    async def close(sid: str, request: Request):
        def plan(body, principal, deadline):
            entry = streams.claim(sid, principal)
            return Work(lambda: streams.close(entry), release=lambda stop: streams.release(entry))
        return await ask(request, "stream_close", plan, empty_body=True)


def _settle(work: Work, future, prior: bool) -> None:
    """A slice that ended after its request gave up: a made stream goes; a chunk's stream stops (unless this, its
    first slice, refused its text and nothing was taken before); then the release."""
    done = not future.cancelled() and future.exception() is None
    if done:
        work.abandon(future.result())
    work.release(prior or done)
