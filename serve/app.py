"""`omniguard-edge serve`: the guard as an HTTP service (FastAPI on uvicorn, Prometheus metrics).

- POST /v1/moderations: OpenAI's moderation API shape (serve/inputs.py); POST /v1/guard: the native request and
  the full result; GET /health (the process answers), /ready (200 once warm: bundle open, policy prefix built),
  /metrics (Prometheus text).
- Fail closed: a result that is not `safe` is flagged; bad input is a 4xx with the reason, never a 500 with a
  traceback; a request over a limit is refused before any work (body bytes, inputs, parts; the Guard's own limits
  on pixels, seconds and frames); a full queue is 429 with Retry-After; a request past its timeout is 504.
- Requests are queued (bounded) and judged in micro-batches by one thread (serve/batcher.py); shutdown finishes
  the queued ones. User content is never logged. An API key (constant-time comparison) is required when one is set,
  and a non-loopback bind needs one unless explicitly disabled.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import signal
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations from here

from ..runtime.errors import InputError, describe

from . import inputs
from .batcher import Batcher, Closed, QueueFull
from .metrics import Metrics
from .config import ServeConfig, is_loopback, principal_of
from .stream_routes import add_routes
from .streams import Streams
from .workers import FairWorkers

log = logging.getLogger("omniguard_edge.serve")
# the Guard's errors that are the request's fault: a 400 with the reason
CLIENT_ERRORS = ("InputError", "MemoryBudgetError")


class Service:
    """The Guard(s), the batcher and the metrics of one served bundle."""

    def __init__(self, bundle: Path, config: ServeConfig, guard_options=None):
        self.bundle, self.config = Path(bundle), config
        self.guard_options = guard_options
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.inflight = 0
        self._lock = threading.Lock()
        self._guards: OrderedDict = OrderedDict()
        self.base = None
        self.batcher: Batcher | None = None
        self.streams = Streams(self.guard_for, config)
        self.workers: FairWorkers | None = None  # stream requests; one open stream has at most one queued

    def start(self) -> None:
        from ..runtime.guard import Guard, GuardOptions

        self.base = Guard.from_bundle(self.bundle, self.guard_options or GuardOptions())
        self._guards[(principal_of(None), self.base.options.mode, None)] = self.base
        self.batcher = Batcher(self.guard_for, self.config.max_batch, self.config.batch_wait_s,
                               self.config.queue_size, on_batch=lambda n, s: self.metrics.batch.observe(n))
        # one request at a time per stream, so a client waits on at most its streams' and its creations' requests
        cfg = self.config
        self.workers = FairWorkers(cfg.stream_workers, cfg.max_streams + cfg.queue_size,
                                   2 * cfg.client_streams if cfg.keys() else None)
        threading.Thread(target=self._reap, name="stream-reaper", daemon=True).start()
        if self.config.warmup:  # builds the policy prefix, runs every session once
            result = self.base.moderate(text="warm-up")
            if result.verdict not in ("safe", "unsafe"):  # a service that cannot judge is not ready
                raise RuntimeError(f"the warm-up moderation gave {result.verdict}: {result.error}")
        self.ready.set()

    def _reap(self) -> None:
        """Drops abandoned streams (idle or past their lifetime) with their caches, without waiting for a request."""
        while not self.streams.stopping:
            self.streams.reap()
            time.sleep(min(1.0, self.config.stream_idle_s / 4))

    def stop(self) -> None:
        self.ready.clear()
        self.streams.stop()
        if self.workers is not None:
            self.workers.close()
        if self.batcher is not None:
            self.batcher.close(drain=True)

    def guard_for(self, key: tuple):
        """The Guard for (client, mode, categories): the served one's options with that mode and policy subset; each
        client its own Guard (own encoder cache: one client cannot time another's cached media). The service keeps
        `guards` of them, least recently used dropped first; a Guard an open stream holds is kept. When every kept
        Guard serves open streams, a request of other settings gets a Guard of its own, not kept: a one-shot request
        uses it for its batch (its policy prefix built again: slower, never refused); a stream of other settings was
        refused before (Streams: the same bound, each client holding at most `client_guards`)."""
        import dataclasses

        from ..runtime.guard import Guard
        from ..runtime.prompt.policy import Policy

        with self._lock:
            if key in self._guards:
                self._guards.move_to_end(key)
                return self._guards[key]
            _, mode, codes = key
            base = self.base.options
            options = dataclasses.replace(base, mode=mode)
            if codes:  # the subset is renumbered S1.. in the order asked: the thresholds follow their categories
                limits = base.category_thresholds or {}
                renamed = {f"S{i}": limits[c] for i, c in enumerate(codes, 1) if c in limits}
                options = dataclasses.replace(options, policy=Policy.subset(list(codes)),
                                              category_thresholds=renamed or None)
            in_use = self.streams.in_use()
            full = key not in in_use and len(in_use) >= self.config.guards
            guard = Guard(self.base.bundle, options)  # the same sessions: only the prompt and the budget differ
            if full:
                return guard
            self._guards[key] = guard
            # the least recently used go first; a Guard an open stream holds stays (it counts against the bound)
            for old in [k for k in self._guards if k not in in_use and k != key]:
                if len(self._guards) <= self.config.guards:
                    break
                del self._guards[old]
            return guard


def create_app(bundle, config: ServeConfig | None = None, guard_options=None):
    from contextlib import asynccontextmanager

    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    config = config or ServeConfig()
    service = Service(bundle, config, guard_options)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(service.start)
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="omniguard-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def problem(status: int, kind: str, message: str, endpoint: str, headers=None, extra: dict | None = None):
        service.metrics.errors.labels(kind).inc()
        service.metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse({"error": {"type": kind, "message": message, **(extra or {})}}, status_code=status,
                            headers=headers)

    def public(result: dict) -> dict:
        """A result as answered: without stage timings and token times unless ServeConfig.stage_timings."""
        if not config.stage_timings:
            result.pop("timings", None)
            result.pop("token_times", None)
        return result

    service.streams.public = public

    accepted = [k.encode() for k in config.keys()]

    def authorize(request: Request, endpoint: str):
        """None when the request may proceed (its client in `request.state.principal`), else the 401 that refuses
        it. Every key is compared, in constant time each: the time taken does not tell which one matched."""
        request.state.principal = principal_of(None)
        if accepted:
            given = request.headers.get("authorization", "")
            token = (given[7:] if given.lower().startswith("bearer ") else "").encode()
            match = None
            for key in accepted:
                if hmac.compare_digest(token, key):
                    match = key
            if match is None:
                return problem(401, "unauthorized", "a valid `Authorization: Bearer <key>` is required",
                               endpoint, {"WWW-Authenticate": "Bearer"})
            request.state.principal = principal_of(match)
        return None

    async def body_json(request: Request, endpoint: str):
        """The parsed JSON body, or the 4xx response that refuses it (checked in this order: auth, type, size,
        JSON)."""
        if (refused := authorize(request, endpoint)) is not None:
            return None, refused
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return None, problem(415, "unsupported_media_type",
                                 f"Content-Type must be application/json, not {ctype or 'none'!r}", endpoint)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > config.max_body_bytes):
            return None, problem(413, "too_large", f"the body is over {config.max_body_bytes} bytes", endpoint)
        raw = bytearray()
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > config.max_body_bytes:
                return None, problem(413, "too_large", f"the body is over {config.max_body_bytes} bytes", endpoint)
        try:
            return await asyncio.to_thread(json.loads, bytes(raw)), None  # off the event loop: up to the body limit
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
            return None, problem(400, "invalid_json", f"the body is not valid JSON ({type(exc).__name__})", endpoint)

    async def judge(key: tuple, requests: list, endpoint: str):
        """The Guard's results for `requests`, through the queue; or the response that says why not."""
        try:
            future = service.batcher.submit(key, requests)
        except QueueFull:
            return None, problem(429, "busy", "the queue is full", endpoint, {"Retry-After": "1"})
        except Closed:
            return None, problem(503, "not_ready", "the service is stopping", endpoint)
        service.metrics.queue.set(service.batcher.depth)
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(future), config.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            return None, problem(504, "timeout", f"not judged within {config.timeout_s:g} s", endpoint)
        except InputError as exc:  # the request's settings cannot be served (e.g. a budget over the engines')
            return None, problem(400, "invalid_request", str(exc), endpoint)
        except Exception as exc:  # the Guard failed as a whole: fail closed; the details stay in the log
            log.error("guard failure: %s", describe(exc))
            return None, problem(500, "guard_failure", "the guard failed on this request; nothing was judged",
                                 endpoint)
        bad = next((r for r in results if r.error and r.error.split(":")[0] in CLIENT_ERRORS), None)
        if bad is not None:
            return None, problem(400, "invalid_request", bad.error, endpoint)
        for r in results:
            service.metrics.verdicts.labels(r.verdict).inc()
            for stage, seconds in (r.timings or {}).items():
                if isinstance(seconds, (int, float)):
                    service.metrics.stages.labels(stage).observe(seconds)
        return results, None

    def admit(endpoint: str):
        """None when a request may enter the service (a slot of max_concurrent taken: `release()` gives it back),
        else the 503 (not ready) or 429 (full) that refuses it."""
        if not service.ready.is_set():
            return problem(503, "not_ready", "the service is starting or stopping", endpoint, {"Retry-After": "1"})
        with service._lock:
            full = service.inflight >= config.max_concurrent
            if not full:
                service.inflight += 1
        return problem(429, "busy", "too many requests in the service", endpoint, {"Retry-After": "1"}) if full \
            else None

    def release() -> None:
        with service._lock:
            service.inflight -= 1

    async def answer(request: Request, endpoint: str, parse):
        """The results of a request whose body `parse` turns into (Guard key, requests); or the refusal. A slot of
        max_concurrent is taken before the body is read, so no more than that many bodies are ever held."""
        start = time.perf_counter()
        if (refused := admit(endpoint)) is not None:
            return None, refused
        try:
            body, refused = await body_json(request, endpoint)
            if refused is not None:
                return None, refused
            try:
                key, requests = await asyncio.to_thread(parse, body)  # base64 decoding: off the event loop
                key = (request.state.principal, *key)  # each client its own Guards: its own encoder cache
            except InputError as exc:
                return None, problem(400, "invalid_request", str(exc), endpoint)
            results, refused = await judge(key, requests, endpoint)
        finally:
            release()
        if refused is None:
            service.metrics.requests.labels(endpoint, "200").inc()
            service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return results, refused

    add_routes(app, service, SimpleNamespace(admit=admit, release=release, authorize=authorize,
                                             body_json=body_json, problem=problem))

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        results, refused = await answer(request, "moderations", lambda body: (
            (service.base.options.mode, None), inputs.moderation_requests(body)))
        if refused is not None:
            return refused
        m = service.base.bundle.manifest
        return {"id": f"modr-{uuid.uuid4().hex}", "model": f"{m.source.get('checkpoint', 'omniguard')} ({m.precision})",
                "results": [inputs.openai_result(r, config.stage_timings) for r in results]}

    def native(body):
        req, mode, codes = inputs.guard_request(body)
        return (mode, codes), [req]

    @app.post("/v1/guard")
    async def guard(request: Request):
        results, refused = await answer(request, "guard", native)
        if refused is not None:
            return refused
        out = public(results[0].to_dict())
        out["flagged"] = results[0].verdict != "safe"  # fail closed: unknown and error are flagged
        return out

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if service.ready.is_set() and service.batcher is not None and service.batcher.alive:
            return {"status": "ready"}
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics(request: Request):
        peer = request.client.host if request.client else ""
        try:
            scraper = any(ipaddress.ip_address(peer) in net for net in config.metrics_from)
        except ValueError:
            scraper = False
        if not scraper and (refused := authorize(request, "metrics")) is not None:
            return refused
        if service.batcher is not None:
            service.metrics.queue.set(service.batcher.depth)
        service.metrics.streams.set(len(service.streams.open))
        service.metrics.stream_kv.set(service.streams.kv_bytes())
        return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # never a traceback to the client
        service.metrics.errors.labels("internal").inc()
        log.error("unexpected failure on %s: %s", request.url.path, describe(exc))
        return JSONResponse({"error": {"type": "internal", "message": "the service failed on this request"}},
                            status_code=500)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        service.metrics.errors.labels("invalid_request").inc()
        return JSONResponse({"error": {"type": "invalid_request", "message": str(exc)}}, status_code=400)

    return app


def serve(bundle, host: str = "127.0.0.1", port: int = 8080, config: ServeConfig | None = None,
          insecure_no_auth: bool = False, guard_options=None) -> None:
    """Run the service until SIGINT/SIGTERM (uvicorn's), then finish the queued requests."""
    import uvicorn

    config = config or ServeConfig()
    if not is_loopback(host) and not config.keys() and not insecure_no_auth:
        raise InputError(f"--host {host} is not loopback: set an API key (OMNIGUARD_API_KEY) or pass "
                         "--insecure-no-auth")
    app = create_app(bundle, config, guard_options)
    _Server = _uvicorn_server()
    # access log off: a request's path and status are in the metrics; no user content is ever logged
    # graceful shutdown waits as long as a request may: the queued ones are answered, not cut off. Connections are
    # not limited here: past max_concurrent a request is answered 429 before its body is read
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=int(config.timeout_s) + 5))
    server.run()


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM (an orchestrator's stop) ends in exit status 0 once the in-flight requests
        are answered and the queue drained: uvicorn would re-raise the signal after its graceful shutdown."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
                captured.remove(sig)

    return Server
