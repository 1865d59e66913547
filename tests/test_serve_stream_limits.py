"""The service's per-client stream limits (serve/streams.py, serve/workers.py, serve/app.py): one client cannot
take what the others need (open streams, Guards, cache bytes, the stream workers), a stream's cache is reserved
before it grows, chunks of a stream go one at a time (409), and a request not judged in time is a 504 that says
whether anything was taken."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra (fastapi, uvicorn, prometheus-client)")
pytest.importorskip("uvicorn", reason="the service needs the serve extra")

from test_serve import Server, _free_port  # noqa: E402

from omniguard_edge.runtime.guard import GuardOptions  # noqa: E402
from omniguard_edge.serve.config import ServeConfig, principal_of  # noqa: E402
from omniguard_edge.serve.streams import StreamBusy, StreamLimitError  # noqa: E402
from omniguard_edge.serve.batcher import QueueFull  # noqa: E402
from omniguard_edge.serve.workers import FairWorkers  # noqa: E402

KEYS = {"OMNIGUARD_API_KEYS": "alpha-key, beta-key"}
ALPHA, BETA = ({"Authorization": f"Bearer {k}"} for k in ("alpha-key", "beta-key"))
WORDS = "Here is one more sentence of the reply, long enough to count. " * 6


class InProcess(Server):
    """The service on loopback in this process (uvicorn in a thread), so that a test can reach its state."""

    def __init__(self, bundle, config: ServeConfig):
        import uvicorn

        from omniguard_edge.serve.app import create_app

        self.port = _free_port()
        self.app = create_app(bundle, config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.get("/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the in-process service did not become ready")

    @property
    def service(self):
        return self.app.state.service

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        return 0


def test_one_client_cannot_starve_another(tiny_bundle):
    """alpha opens all the streams and settings one client may: further ones are refused for alpha (429 naming the
    client's limit), while beta still opens streams and gets one-shot answers."""
    s = Server(tiny_bundle, "--client-streams", "3", "--client-guards", "1", env=KEYS)
    try:
        assert s.post("/v1/streams", {"prompt": "a", "categories": ["S1"]}, headers=ALPHA)[0] == 201
        assert s.post("/v1/streams", {"prompt": "b", "categories": ["S1"]}, headers=ALPHA)[0] == 201
        status, body, _ = s.post("/v1/streams", {"prompt": "c", "categories": ["S2"]}, headers=ALPHA)
        assert status == 429 and "settings, the most one client may (1)" in body["error"]["message"]
        assert s.post("/v1/streams", {"prompt": "c", "categories": ["S1"]}, headers=ALPHA)[0] == 201
        status, body, _ = s.post("/v1/streams", {"prompt": "d", "categories": ["S1"]}, headers=ALPHA)
        assert status == 429 and "this client has 3 open streams" in body["error"]["message"]
        status, made, _ = s.post("/v1/streams", {"prompt": "e", "categories": ["S3"]}, headers=BETA)
        assert status == 201, made
        assert s.post(f"/v1/streams/{made['id']}/chunks", {"text": "Fine."}, headers=BETA)[0] == 200
        assert s.post("/v1/guard", {"prompt": "hi", "categories": ["S5"]}, headers=BETA)[0] == 200
        assert s.post("/v1/moderations", {"input": "hi"}, headers=BETA)[0] == 200
    finally:
        assert s.stop() == 0


def test_a_one_shot_request_gets_a_guard_when_streams_hold_all_of_them(tiny_bundle):
    """Every kept Guard serves an open stream: a stream of other settings is refused, a one-shot request gets a
    Guard of its own that is not kept (it used to be a 429 for everyone)."""
    from omniguard_edge.serve.app import Service

    service = Service(tiny_bundle, ServeConfig(guards=1, warmup=False), GuardOptions())
    service.start()
    try:
        service.streams.create({"prompt": "x", "categories": ["S1"]}, "-")
        held = dict(service._guards)
        guard = service.guard_for(("-", "verdict", ("S2",)))
        assert guard.moderate("hi").verdict in ("safe", "unsafe") and dict(service._guards) == held
        with pytest.raises(StreamLimitError, match="serve open streams"):
            service.streams.create({"prompt": "y", "categories": ["S2"]}, "-")
    finally:
        service.stop()


def _service(tiny_bundle, **config):
    from omniguard_edge.serve.app import Service

    service = Service(tiny_bundle, ServeConfig(warmup=False, **config), GuardOptions())
    service.start()
    return service


def _feed(service, sid, principal, text):
    streams = service.streams
    entry = streams.claim(sid, principal)
    try:
        return streams.feed(entry, text)
    finally:
        streams.release(entry)


def test_stream_caches_are_reserved_before_they_grow(tiny_bundle):
    """The service's limit on all streams' caches, and one client's, are checked before a check makes a cache grow:
    the stream that would pass them stops with an error check and the reserved bytes never pass the limit."""
    service = _service(tiny_bundle)
    sid, _ = service.streams.create({"prompt": "x"}, "-")
    assert not _feed(service, sid, "-", WORDS)["stopped"]
    one = service.streams.reserved[sid]
    assert one > 0 and one >= service.streams.open[sid].stream.cache_bytes
    service.stop()

    service = _service(tiny_bundle, stream_kv_bytes=one + one // 2)
    try:
        a, _ = service.streams.create({"prompt": "x"}, "-")
        b, _ = service.streams.create({"prompt": "y"}, "-")
        assert not _feed(service, a, "-", WORDS)["stopped"]
        out = _feed(service, b, "-", WORDS)
        assert out["stopped"] and out["checks"][-1]["verdict"] == "error"
        assert "over the service's limit" in out["checks"][-1]["error"]
        assert service.streams.kv_bytes() == one <= service.config.stream_kv_bytes
    finally:
        service.stop()

    alpha, beta = principal_of(b"alpha-key"), principal_of(b"beta-key")
    service = _service(tiny_bundle, api_keys=("alpha-key", "beta-key"), client_stream_kv_bytes=one + one // 2)
    try:
        a1, _ = service.streams.create({"prompt": "x"}, alpha)
        a2, _ = service.streams.create({"prompt": "y"}, alpha)
        b1, _ = service.streams.create({"prompt": "z"}, beta)
        assert not _feed(service, a1, alpha, WORDS)["stopped"]
        out = _feed(service, a2, alpha, WORDS)
        assert out["stopped"] and "one client's limit" in out["checks"][-1]["error"]
        assert not _feed(service, b1, beta, WORDS)["stopped"]  # beta's share is its own
    finally:
        service.stop()


def test_chunks_of_a_stream_go_one_at_a_time_and_late_ones_are_504(tiny_bundle):
    """A chunk sent while another of its stream is being judged is a 409 (its text not taken); a chunk still waiting
    for a stream worker at its timeout is a 504 that says nothing was taken, and the stream goes on."""
    s = InProcess(tiny_bundle, ServeConfig(timeout_s=1.0, stream_workers=1))
    try:
        status, made, _ = s.post("/v1/streams", {"prompt": "x"})
        sid, streams = made["id"], s.service.streams
        entry = streams.claim(sid, "-")  # as a chunk being judged does
        status, body, _ = s.post(f"/v1/streams/{sid}/chunks", {"text": "Hello there."})
        assert status == 409 and "not taken" in body["error"]["message"]
        with pytest.raises(StreamBusy):
            streams.claim(sid, "-")
        streams.release(entry)

        gate = threading.Event()
        s.service.workers.submit("someone", gate.wait)  # the only worker is busy
        status, body, _ = s.post(f"/v1/streams/{sid}/chunks", {"text": "Hello there."})
        gate.set()
        assert status == 504 and "nothing was taken" in body["error"]["message"]
        assert streams.open[sid].stream.reply == "" and not streams.open[sid].busy
        status, body, _ = s.post(f"/v1/streams/{sid}/chunks", {"text": "Hello there."})
        assert status == 200 and not body["stopped"]
    finally:
        s.stop()


def test_stream_workers_take_the_clients_in_turn():
    """One worker, client a queues five jobs, then b one: b's runs second, not sixth."""
    workers, ran, gate = FairWorkers(1, 16), [], threading.Event()
    try:
        workers.submit("x", gate.wait)
        futures = [workers.submit("a", lambda i=i: ran.append(f"a{i}")) for i in range(5)]
        futures.append(workers.submit("b", lambda: ran.append("b")))
        gate.set()
        for f in futures:
            f.result(10)
        assert ran == ["a0", "b", "a1", "a2", "a3", "a4"]
    finally:
        workers.close()


def test_a_late_answer_is_undone_and_says_so(tiny_bundle):
    """A chunk whose job is running at its timeout: 504 with taken true, and the stream stops once the job ends
    (nobody received its checks); a stream made after its request's timeout is dropped (nobody has its id)."""
    s = InProcess(tiny_bundle, ServeConfig(timeout_s=1.0, stream_workers=1))
    streams = s.service.streams
    gate = threading.Event()
    try:
        sid = s.post("/v1/streams", {"prompt": "x"})[1]["id"]
        feed, create = streams.feed, streams.create
        streams.feed = lambda *a, **k: (gate.wait(), feed(*a, **k))[1]
        status, body, _ = s.post(f"/v1/streams/{sid}/chunks", {"text": "Hello there, all is fine."})
        assert status == 504 and body["error"]["taken"] is True and "stream stops" in body["error"]["message"]
        gate.set()
        for _ in range(100):
            if not streams.open[sid].busy:
                break
            time.sleep(0.05)
        stopped = streams.open[sid].stream.stopped
        assert stopped is not None and stopped.result.verdict == "error" and sid not in streams.reserved
        assert s.post(f"/v1/streams/{sid}/chunks", {"text": "more"})[0] == 400
        streams.feed = feed

        gate.clear()
        streams.create = lambda *a, **k: (gate.wait(), create(*a, **k))[1]
        before = set(streams.open)
        status, body, _ = s.post("/v1/streams", {"prompt": "y"})
        assert status == 504 and body["error"]["taken"] is True
        gate.set()
        time.sleep(0.5)
        assert set(streams.open) == before  # made after the timeout, then dropped
    finally:
        gate.set()
        s.stop()


def test_a_long_chunk_is_judged_in_slices_and_another_client_gets_its_turn(tiny_bundle):
    """One worker. alpha's chunk crosses ~200 check points (slices of 4, about 2.5 s on tiny); beta's chunk, sent
    while alpha's runs, is answered first (in one job it waited for all of alpha's); alpha's answer holds every
    check, equal to a local stream's."""
    from omniguard_edge.runtime.guard import Guard

    s = InProcess(tiny_bundle, ServeConfig(stream_workers=1, api_keys=("alpha-key", "beta-key")))
    text = " ".join(f"w{i % 89}" for i in range(1200))
    try:
        a = s.post("/v1/streams", {"prompt": "p", "every": 16, "hysteresis": 10**6}, headers=ALPHA)[1]["id"]
        b = s.post("/v1/streams", {"prompt": "q", "every": 16}, headers=BETA)[1]["id"]
        done, answers = [], {}

        def send(name, sid, headers, chunk):
            answers[name] = s.post(f"/v1/streams/{sid}/chunks", {"text": chunk}, headers=headers)
            done.append(name)
        slow = threading.Thread(target=send, args=("alpha", a, ALPHA, text))
        slow.start()
        time.sleep(0.3)
        send("beta", b, BETA, "Fine. ")
        slow.join(120)
        assert done == ["beta", "alpha"], done
        status, body, _ = answers["alpha"]
        local = Guard.from_bundle(tiny_bundle, GuardOptions(mode="verdict")).stream("p", every=16,
                                                                                    hysteresis=10**6)
        expected = [c.position for c in local.feed(text)]
        assert status == 200 and len(expected) > 100 and [c["position"] for c in body["checks"]] == expected
    finally:
        s.stop()


def test_one_client_cannot_fill_the_stream_queue():
    workers, gate = FairWorkers(1, 16, per_client=2), threading.Event()
    try:
        workers.submit("x", gate.wait)
        workers.submit("a", lambda: None)
        workers.submit("a", lambda: None)
        with pytest.raises(QueueFull):
            workers.submit("a", lambda: None)
        workers.submit("b", lambda: None)  # another client still gets in
        workers.submit("a", lambda: None, admitted=True)  # the next slice of a request already taken is never refused
    finally:
        gate.set()
        workers.close()


def test_a_chunk_waiting_when_the_workers_close_is_a_503(tiny_bundle):
    """Shutdown closes the stream workers: a chunk still queued is answered 503 with taken false (it was a 500),
    and its stream is released."""
    s = InProcess(tiny_bundle, ServeConfig(stream_workers=1))
    gate, running, answer = threading.Event(), threading.Event(), {}
    try:
        sid = s.post("/v1/streams", {"prompt": "x"})[1]["id"]
        s.service.workers.submit("someone", lambda: (running.set(), gate.wait()))  # the only worker is busy
        assert running.wait(10)
        sender = threading.Thread(target=lambda: answer.update(r=s.post(f"/v1/streams/{sid}/chunks",
                                                                        {"text": "Hello there."})))
        sender.start()
        for _ in range(100):
            if s.service.workers.pending:
                break
            time.sleep(0.02)
        s.service.workers.close()
        sender.join(30)
        status, body, _ = answer["r"]
        assert status == 503 and body["error"]["taken"] is False
        assert not s.service.streams.open[sid].busy and s.service.streams.open[sid].stream.reply == ""
    finally:
        gate.set()
        s.stop()
