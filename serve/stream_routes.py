"""The HTTP side of the service's streams (serve/streams.py holds them): the /v1/streams routes and the path every
stream request takes: readiness, a slot of max_concurrent, auth and body as for the one-shot requests, then a job
on the stream workers (serve/workers.py: the clients in turn) within the request's timeout, and the refusals
(400, 404, 409, 410, 429, 503, 504)."""

from __future__ import annotations

import asyncio
import time

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


def add_routes(app, service, http):
    """The /v1/streams routes. `http`: the service's admit, release, authorize, body_json and problem (serve/app.py)."""
    streams = service.streams

    async def ask(request: Request, endpoint: str, plan, status: int = 200, empty_body: bool = False):
        """A stream request: readiness, a slot of max_concurrent, auth and body as for the others; then `plan(body,
        client, deadline)` -> (job, release) (it may refuse: 400, 404, 409, 410, 429), `job()` on the stream workers
        within the timeout, `release()` once it is over or will never run; its dict, or the refusal."""
        start = time.perf_counter()
        deadline = time.monotonic() + service.config.timeout_s
        if (refused := http.admit(endpoint)) is not None:
            return refused
        try:
            if empty_body:
                refused = http.authorize(request, endpoint)
                body = None
            else:
                body, refused = await http.body_json(request, endpoint)
            if refused is not None:
                return refused
            try:
                job, done = plan(body, request.state.principal, deadline)
            except Exception as exc:  # noqa: BLE001 (mapped below; anything else is the 500 handler's)
                return stream_refusal(exc, endpoint)

            def run():
                try:
                    return job()
                finally:
                    done()
            try:
                future = service.workers.submit(request.state.principal, run)
            except QueueFull:
                done()
                return http.problem(429, "busy", "too many stream requests waiting", endpoint, {"Retry-After": "1"})
            except Closed:
                done()
                return http.problem(503, "not_ready", "the service is stopping", endpoint)
            # a job cancelled before it started (its request timed out or went away, the workers closed) never runs
            # `run`: its release comes from here, exactly once either way
            future.add_done_callback(lambda f: done() if f.cancelled() else None)
            try:
                out = await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()))
            except asyncio.CancelledError:
                if not future.cancelled():  # this request's task was cancelled (the client went away): not ours
                    raise
                return http.problem(503, "not_ready", "the service is stopping", endpoint)  # the workers were closed
            except asyncio.TimeoutError:
                started = not future.cancel()
                return http.problem(504, "timeout", f"not judged within {service.config.timeout_s:g} s: " + (
                    "its checks had started, so the stream stops at its next check point" if started else
                    "it had not started, and nothing was taken"), endpoint)
            except Exception as exc:  # noqa: BLE001
                return stream_refusal(exc, endpoint)
        finally:
            http.release()
        service.metrics.requests.labels(endpoint, str(status)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return JSONResponse(out, status_code=status)

    def stream_refusal(exc: Exception, endpoint: str):
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
        if isinstance(exc, TimeoutError):
            return http.problem(504, "timeout", f"not judged within {service.config.timeout_s:g} s", endpoint)
        raise exc

    @app.post("/v1/streams", status_code=201)
    async def create(request: Request):
        def plan(body, principal, deadline):
            def job():
                sid, _ = streams.create(body, principal, deadline)
                return {"id": sid, "idle_timeout_s": service.config.stream_idle_s,
                        "lifetime_s": service.config.stream_lifetime_s}
            return job, lambda: None
        return await ask(request, "streams", plan, status=201)

    @app.post("/v1/streams/{sid}/chunks")
    async def chunk(sid: str, request: Request):
        def plan(body, principal, deadline):
            text = chunk_text(body)
            entry = streams.claim(sid, principal)
            return (lambda: streams.feed(entry, text, deadline)), (lambda: streams.release(entry))
        return await ask(request, "stream_chunks", plan)

    @app.post("/v1/streams/{sid}/close")
    async def close(sid: str, request: Request):
        def plan(body, principal, deadline):
            entry = streams.claim(sid, principal)
            return (lambda: streams.close(entry)), (lambda: streams.release(entry))
        return await ask(request, "stream_close", plan, empty_body=True)
