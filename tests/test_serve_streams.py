"""The service's streams (serve/streams.py), on a server really started on loopback: a stream over HTTP judges as
Guard.stream does, 100 concurrent streams with interleaved chunks never mix their answers, abandoned streams are
dropped with their caches, and the limits answer cleanly."""

from __future__ import annotations

import random
import re
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra (fastapi, uvicorn, prometheus-client)")
pytest.importorskip("uvicorn", reason="the service needs the serve extra")

from test_serve import Server  # noqa: E402  (tests/ is on the path: pytest's rootdir-relative imports)

from omniguard_edge.runtime.guard import Guard, GuardOptions  # noqa: E402

P_TOL = 2.5e-5  # two processes, the same fp32 graphs: P(unsafe) within what 1e-4 on the logits allows
REPLY = "Sure. First take the thing and mix it. Then wait a while! Done? Yes, and that is all there is to it."


@pytest.fixture(scope="module")
def server(tiny_bundle):
    s = Server(tiny_bundle, "--max-streams", "120", "--max-concurrent", "256", "--stream-idle", "3")
    yield s
    s.stop()


def _words(text):
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def _local(tiny_bundle, prompt, chunks, every=16):
    guard = Guard.from_bundle(tiny_bundle, GuardOptions(mode="verdict"))
    stream = guard.stream(prompt, every=every)
    for chunk in chunks:
        stream.feed(chunk)
    stream.close()
    return [(c.position, c.result.verdict, c.result.p_unsafe) for c in stream.checks]


def _remote(server, prompt, chunks, every=16, pause=None):
    status, body, _ = server.post("/v1/streams", {"prompt": prompt, "every": every})
    assert status == 201, body
    sid, checks = body["id"], []
    for chunk in chunks:
        status, out, _ = server.post(f"/v1/streams/{sid}/chunks", {"text": chunk})
        assert status == 200, out
        checks += [(c["position"], c["verdict"], c["p_unsafe"]) for c in out["checks"]]
        if pause:
            time.sleep(pause())
    status, out, _ = server.post(f"/v1/streams/{sid}/close")
    assert status == 200, out
    final = out["result"]
    if not checks or checks[-1][0] != len("".join(chunks)):
        checks.append((len("".join(chunks)), final["verdict"], final["p_unsafe"]))
    return checks


def _same(a, b):
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert all(abs(x[2] - y[2]) <= P_TOL for x, y in zip(a, b))


def test_a_stream_over_http_judges_as_guard_stream(server, tiny_bundle):
    _same(_remote(server, "How do I do it?", _words(REPLY)), _local(tiny_bundle, "How do I do it?", _words(REPLY)))


def test_100_concurrent_streams_with_interleaved_chunks_keep_their_own_answers(server, tiny_bundle):
    prompts = [f"Question number {i}: how would I do task {i * 7 % 13}?" for i in range(100)]
    results, errors = {}, []

    def run(i):
        rng = random.Random(i)
        try:
            results[i] = _remote(server, prompts[i], _words(REPLY), pause=lambda: rng.random() * 0.01)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert errors == [] and len(results) == 100
    for i in range(100):
        _same(results[i], _local(tiny_bundle, prompts[i], _words(REPLY)))


def _metric(server, name) -> float:
    status, text, _ = server.get("/metrics")
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_abandoned_streams_are_dropped_with_their_memory(tiny_bundle):
    """20 streams fed a long reply each, then abandoned: after the idle timeout (15 s here) the service holds no
    stream and no cache, and its RSS is back within 64 MiB of where it was."""
    server = Server(tiny_bundle, "--stream-idle", "15")
    try:
        long_reply = " ".join(f"w{i % 89}" for i in range(800))
        # the baseline after one stream of the same size, closed: the allocators' first growth to that request's size
        # (onnxruntime's arena keeps it) is not what the abandoned streams must give back; their caches are
        assert _remote(server, "warm", [long_reply], every=512)
        before = server.rss_bytes()
        ids, start = [], time.monotonic()
        for i in range(20):
            status, body, _ = server.post("/v1/streams", {"prompt": f"p{i}", "every": 512, "sentences": False})
            assert status == 201
            ids.append(body["id"])
            status, out, _ = server.post(f"/v1/streams/{body['id']}/chunks", {"text": long_reply})
            assert status == 200 and not out["stopped"], out
        assert time.monotonic() - start < 15, "the streams were made too slowly for this test's idle timeout"
        assert _metric(server, "omniguard_open_streams") == 20 and _metric(server, "omniguard_stream_kv_bytes") > 0
        time.sleep(17)
        assert _metric(server, "omniguard_open_streams") == 0 and _metric(server, "omniguard_stream_kv_bytes") == 0
        status, out, _ = server.post(f"/v1/streams/{ids[0]}/chunks", {"text": "more"})
        assert status == 404, out
        assert server.rss_bytes() - before <= 64 << 20
    finally:
        assert server.stop() == 0


def test_stream_requests_are_checked(server):
    status, body, _ = server.post("/v1/streams", {"prompt": "x", "every": 0})
    assert status == 400 and "every" in body["error"]["message"]
    status, body, _ = server.post("/v1/streams", {"prompt": "x", "every": 4})  # a decoder run per few tokens
    assert status == 400 and "at least 16" in body["error"]["message"]
    status, body, _ = server.post("/v1/streams", {"prompt": "x"})
    status, out, _ = server.post(f"/v1/streams/{body['id']}/chunks", raw=b'{"text": "fine \\ud83d"}')
    assert status == 400 and "surrogate" in out["error"]["message"]  # half an emoji: refused, the stream goes on
    assert server.post(f"/v1/streams/{body['id']}/chunks", {"text": "Fine."})[0] == 200
    assert server.post(f"/v1/streams/{body['id']}/close")[0] == 200
    status, body, _ = server.post("/v1/streams", {"prompt": "x", "colour": "red"})
    assert status == 400 and "unknown field" in body["error"]["message"]
    status, body, _ = server.post("/v1/streams/strm-nope/chunks", {"text": "x"})
    assert status == 404
    status, body, _ = server.post("/v1/streams", {"prompt": "x"})
    sid = body["id"]
    for bad in ({"text": 3}, {"text": "a", "more": 1}, ["text"]):
        status, out, _ = server.post(f"/v1/streams/{sid}/chunks", bad)
        assert status == 400, out
    assert server.post(f"/v1/streams/{sid}/close")[0] == 200
    assert server.post(f"/v1/streams/{sid}/close")[0] == 404


def test_too_many_open_streams_is_a_429(tiny_bundle):
    s = Server(tiny_bundle, "--max-streams", "2")
    try:
        assert s.post("/v1/streams", {"prompt": "a"})[0] == 201
        assert s.post("/v1/streams", {"prompt": "b"})[0] == 201
        status, body, headers = s.post("/v1/streams", {"prompt": "c"})
        assert status == 429 and "2 streams are open" in body["error"]["message"] and headers.get("retry-after")
    finally:
        assert s.stop() == 0


def test_guards_are_bounded_and_thresholds_follow_a_category_subset(tiny_bundle):
    """Rotating (mode, categories) keys never hold more than ServeConfig.guards Guards; a Guard for a subset of
    the categories (renumbered S1.. as asked) keeps the served thresholds of those categories under their new
    codes, and drops the others'."""
    from omniguard_edge.serve.app import ServeConfig, Service

    service = Service(tiny_bundle, ServeConfig(guards=3, warmup=False),
                      GuardOptions(category_thresholds={"S9": 0.3, "S1": 0.7, "S4": 0.2}))
    service.start()
    try:
        guard = service.guard_for(("-", "categories", ("S10", "S9", "S2")))
        assert guard.options.category_thresholds == {"S2": 0.3}
        assert [c.name for c in guard.options.policy.categories][1] == "Indiscriminate Weapons"
        assert service.guard_for(("-", "verdict", ("S3",))).options.category_thresholds is None
        for i in range(12):
            service.guard_for((f"client{i % 2}", "verdict", (f"S{i % 12 + 1}",)))
            assert len(service._guards) <= 3
    finally:
        service.stop()


def test_answers_carry_no_stage_timings_by_default(server, tiny_bundle):
    """Stage timings tell whether a medium was already in the encoder cache (another client sent it): left out of
    answers unless --stage-timings."""
    status, body, _ = server.post("/v1/guard", {"prompt": "hi"})
    assert status == 200 and "timings" not in body and "token_times" not in body
    status, body, _ = server.post("/v1/moderations", {"input": "hi"})
    assert status == 200 and "timings" not in body["results"][0]["omniguard"]
    s = Server(tiny_bundle, "--stage-timings")
    try:
        status, body, _ = s.post("/v1/guard", {"prompt": "hi"})
        assert status == 200 and "total" in body["timings"]
    finally:
        s.stop()


def test_each_api_key_is_its_own_client(tiny_bundle, media_dir):
    """With several keys (OMNIGUARD_API_KEYS), each client has its own Guards: another client's cached image is not
    a cache hit for it (its vision encoder runs: the stage timing says so here), and another client's stream is not
    there for it (404, as for none)."""
    import base64

    image = base64.b64encode((media_dir / "colour_517x333.png").read_bytes()).decode()
    s = Server(tiny_bundle, "--stage-timings", env={"OMNIGUARD_API_KEYS": "alpha-key, beta-key"})
    a, b = ({"Authorization": f"Bearer {k}"} for k in ("alpha-key", "beta-key"))
    body = {"prompt": "Is this fine?", "media": [{"kind": "image", "data": image}]}
    try:
        assert s.post("/v1/guard", body)[0] == 401
        first = s.post("/v1/guard", body, headers=a)
        again = s.post("/v1/guard", body, headers=a)
        other = s.post("/v1/guard", body, headers=b)
        assert first[0] == again[0] == other[0] == 200, (first, other)
        assert "vision" in first[1]["timings"] and "vision" not in again[1]["timings"]  # alpha's cache hit
        assert "vision" in other[1]["timings"]  # beta: its own cache, encoded again
        assert abs(other[1]["p_unsafe"] - first[1]["p_unsafe"]) <= P_TOL
        status, made, _ = s.post("/v1/streams", {"prompt": "x"}, headers=a)
        assert status == 201
        assert s.post(f"/v1/streams/{made['id']}/chunks", {"text": "Hello."}, headers=b)[0] == 404
        assert s.post(f"/v1/streams/{made['id']}/chunks", {"text": "Hello."}, headers=a)[0] == 200
        assert s.post(f"/v1/streams/{made['id']}/close", headers=b)[0] == 404
        assert s.post(f"/v1/streams/{made['id']}/close", headers=a)[0] == 200
    finally:
        assert s.stop() == 0
