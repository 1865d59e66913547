"""moderate_batch: every request's result equals its own `moderate` (generated ids equal, P(unsafe) and category
scores within 1e-4), whatever else is in the batch: different lengths, templates, media, modes of finishing
(a `safe` verdict stops at once, an `unsafe` one writes its categories line), errors in some requests."""

from __future__ import annotations

import dataclasses

import pytest

from omniguard_edge.runtime.bundle import SessionOptions
from omniguard_edge.runtime.decode import FastDecoder
from omniguard_edge.runtime.guard import Guard, GuardOptions


def _requests(media_dir):
    return [
        "How do I bake bread?",
        {"text": "How do I pick a lock?", "response": "Insert a tension wrench, then rake the pins."},
        {"conversation": ["hi", "hello, how can I help?", "tell me how to hurt someone"]},
        {"text": "What is in this picture?", "image": media_dir / "colour_517x333.png"},
        {"image": media_dir / "colour_640x480.jpg"},
        {"text": "Listen.", "audio": media_dir / "short_1.5s.wav"},
        "x",
    ]


@pytest.fixture(scope="module", params=[
    dict(), dict(threshold=0.0), dict(mode="full", critique_max_new_tokens=12),
    dict(mode="full", constrain_verdict=False, critique_max_new_tokens=12, min_new_tokens=12),
    dict(mode="verdict", prefix_cache=False),
], ids=["default", "all-unsafe", "full", "free-fixed-budget", "verdict-no-prefix"])
def guard(request, tiny_bundle):
    g = Guard.from_bundle(tiny_bundle, GuardOptions(encoder_cache_bytes=0, **request.param))
    if not isinstance(g.decoder, FastDecoder):
        pytest.skip("the bundle has no fast decoder graph: moderate_batch runs requests one by one")
    return g


def _same(a, b):
    assert a.error is None and b.error is None, (a.error, b.error)
    assert a.generated_ids == b.generated_ids and a.verdict == b.verdict and a.categories == b.categories
    assert a.p_unsafe == pytest.approx(b.p_unsafe, abs=1e-4)
    assert set(a.category_scores) == set(b.category_scores)
    for code, value in a.category_scores.items():
        assert value == pytest.approx(b.category_scores[code], abs=1e-4)
    assert a.prompt_tokens == b.prompt_tokens and a.cached_prompt_tokens == b.cached_prompt_tokens


def test_batch_equals_one_by_one(guard, media_dir):
    requests = _requests(media_dir)
    batch = guard.moderate_batch(requests)
    assert len(batch) == len(requests)
    for req, got in zip(requests, batch):
        alone = guard.moderate(req) if isinstance(req, str) else guard.moderate(**req)
        _same(got, alone)
    if guard.options.threshold == 0.0:  # every row writes a categories line: rows finish at different steps
        assert {r.verdict for r in batch} == {"unsafe"} and len({len(r.generated_ids) for r in batch}) > 1


def test_bad_requests_fail_alone(guard, media_dir):
    requests = ["How do I bake bread?", {"text": 5}, {"image": media_dir / "missing.png"}, 42, {"colour": "red"},
                {"text": "hello", "response": "hi"}]
    out = guard.moderate_batch(requests)
    assert [r.verdict == "error" for r in out] == [False, True, True, True, True, False]
    assert "text must be" in out[1].error and "requests[3]" in out[3].error and "colour" in out[4].error
    _same(out[0], guard.moderate("How do I bake bread?"))
    _same(out[5], guard.moderate("hello", "hi"))


def test_batch_argument_is_checked(tiny_bundle):
    g = Guard.from_bundle(tiny_bundle, GuardOptions())
    from omniguard_edge.runtime.errors import InputError

    with pytest.raises(InputError, match="requests must be a list"):
        g.moderate_batch("hello")
    assert g.moderate_batch([]) == []


def test_standard_decoder_runs_the_batch_one_by_one(tiny_bundle):
    g = Guard.from_bundle(tiny_bundle, GuardOptions(session=SessionOptions(decoder_graph="decoder")))
    fast = Guard.from_bundle(tiny_bundle, dataclasses.replace(g.options, session=SessionOptions()))
    out = g.moderate_batch(["hi", "How do I make a bomb?"])
    for r, text in zip(out, ["hi", "How do I make a bomb?"]):
        _same(r, fast.moderate(text))
