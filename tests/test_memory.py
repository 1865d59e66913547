"""Memory: chunked prefill equals one-shot prefill, the estimator's known answers and its calibration on `tiny`,
and RSS returned after a large request (docs/performance.md "Memory"). Runtime-only: tiny_bundle and subprocesses."""

from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from omniguard_edge.runtime.decode import Decoder
from omniguard_edge.runtime.memory import (generation_bytes, kv_bytes, 
    ALLOCATOR_SLACK,
    Geometry,
    MemoryBudget,
    MemoryBudgetError,
    RequestSizes,
    audio_bytes,
    decoder_bytes,
    estimate,
    max_vision_patches,
    parse_bytes,
    plan_request,
    vision_bytes,
)

# --- chunked prefill ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["decoder", "decoder_gqa"])
def decoder_and_prompt(tiny_bundle, request):
    """The tiny decoder (each graph) and a 75-token prompt whose middle is an image placeholder run (grid 1x8x10
    -> 20 tokens with 3-D positions) between random text tokens, with random embeddings."""
    from omniguard_edge.runtime.bundle import SessionOptions, open_bundle
    from omniguard_edge.runtime.decode import FastDecoder
    from omniguard_edge.runtime.positions import RopeIds, rope_index

    b = open_bundle(tiny_bundle, SessionOptions(graphs=("decoder",), decoder_graph=request.param), verify="none")
    m = b.manifest
    sp = m.special_ids
    rng = np.random.default_rng(3)
    text = rng.integers(0, 200, size=55)
    ids = np.concatenate([text[:17], np.full(20, sp["image"]), text[17:]])[None].astype(np.int64)
    rope = RopeIds(sp["image"], sp["video"], sp["audio"], m.vision["spatial_merge_size"], m.decoder["position_id_per_seconds"])
    positions, delta = rope_index(ids, rope, image_grid_thw=[(1, 8, 10)])
    embeds = rng.standard_normal((1, ids.shape[1], m.decoder["hidden_size"])).astype(np.float32)
    if request.param == "decoder_gqa":
        dec = FastDecoder(b.sessions["decoder"], m.decoder, head=b.session("decoder_head"), head_rows=b.head_rows)
    else:
        dec = Decoder(b.sessions["decoder"], m.decoder)
    return dec, embeds, positions, int(delta[0, 0])


@pytest.mark.parametrize("chunk", [1, 7, 16, 20, 32, 74])
def test_chunked_prefill_equals_one_shot(decoder_and_prompt, chunk):
    # 7, 16, 20 and 32 split the placeholder run (tokens 17..36) at different places; 1 is token by token
    dec, embeds, positions, delta = decoder_and_prompt
    ref_logits, ref = dec.prefill(embeds, positions, delta)
    logits, state = dec.prefill(embeds, positions, delta, chunk=chunk)
    assert ref.prefill_runs == 1 and state.prefill_runs == -(-embeds.shape[1] // chunk)
    assert state.length == ref.length == embeds.shape[1]
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert len(state.past) == len(ref.past)
    for got, want in zip(dec.cache(state), dec.cache(ref)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_chunked_generation_continues_like_one_shot(decoder_and_prompt):
    dec, embeds, positions, delta = decoder_and_prompt
    table = np.random.default_rng(4).standard_normal((50, embeds.shape[2])).astype(np.float32)
    kw = dict(embed_tokens=lambda t: table[np.asarray(t) % 50], max_new_tokens=12, eos_ids=set())
    one = dec.generate(embeds, positions, delta, **kw)
    chunked = dec.generate(embeds, positions, delta, prefill_chunk=16, **kw)
    assert one.prefill_chunks == 1 and chunked.prefill_chunks == 5
    np.testing.assert_allclose(chunked.first_logits, one.first_logits, atol=1e-4, rtol=0)
    assert chunked.tokens == one.tokens and len(one.tokens) == 12


def test_prompt_within_one_chunk_is_prefilled_exactly_as_before(decoder_and_prompt):
    dec, embeds, positions, delta = decoder_and_prompt
    geometry = {"num_layers": dec.layers, "num_kv_heads": dec.kv_heads, "head_dim": dec.head_dim,
                "rope_parameters": {"mrope_section": getattr(dec, "sections", [])},
                "rope_inv_freq": getattr(dec, "freqs", None)}
    extra = {"head": dec.head, "head_rows": dec.head_rows} if hasattr(dec, "head") else {}
    default = type(dec)(dec.session, geometry, prefill_chunk=embeds.shape[1], **extra)
    a, sa = dec.prefill(embeds, positions, delta)
    b, sb = default.prefill(embeds, positions, delta)
    assert sb.prefill_runs == 1
    assert np.array_equal(a, b) and all(np.array_equal(x, y) for x, y in zip(dec.cache(sa), default.cache(sb)))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "16", True])
def test_bad_chunk_sizes_are_refused(decoder_and_prompt, bad):
    dec, embeds, positions, delta = decoder_and_prompt
    with pytest.raises(ValueError, match="prefill_chunk"):
        dec.prefill(embeds, positions, delta, chunk=bad)


# --- the estimator: answers computed by hand ----------------------------------------------------------------

SMALL = Geometry(layers=1, heads=2, kv_heads=1, head_dim=4, hidden=8, vocab=10, ffn=16, vision_depth=1, vision_width=8,
                 vision_heads=2, vision_ffn=16, vision_out=8, audio_layers=1, audio_width=8, audio_heads=2, audio_ffn=16)


def test_decoder_estimate_known_answers():
    # one shot, 10 tokens: scores 2*2*10*10*4 = 1600, mask 10*10*6 = 600, K/V repeated 2*2*10*4*4 = 640,
    # past+present KV 2*1*1*4*4*(20-10) = 320, activations 10*(4*8+3*16+3*2*4)*4 = 4160, embeddings 10*8*4 = 320,
    # logits 2*10*4 = 80
    assert decoder_bytes(SMALL, 10) == 1600 + 600 + 640 + 320 + 4160 + 320 + 80 == 7720
    # chunks of 4: scores 2*2*4*10*4 = 640, mask 4*10*6 = 240, repeated 640, KV 32*(20-4) = 512,
    # activations 4*104*4 = 1664, embeddings 320, logits 80
    assert decoder_bytes(SMALL, 10, 4) == 640 + 240 + 640 + 512 + 1664 + 320 + 80 == 4096
    assert decoder_bytes(SMALL, 10, 64) == decoder_bytes(SMALL, 10)


def test_vision_and_audio_estimate_known_answers():
    # vision, 10 patches: (2 float + 2 bool biases + 2 score copies of 2 heads) 26 B * 100
    # + (6*8 + 3*16 + 2*1176) * 4 + 2*8*4/4 = 9808 B * 10
    assert vision_bytes(SMALL, 10) == 26 * 100 + 9808 * 10 == 100680
    # audio, 250 frames = 2 chunks: scores 2*2*2*100*100*4 = 320000, conv 2*200*(16+128)*4 = 230400,
    # activations 2*100*(48+48)*4 = 76800, mel 2*128*250*4 = 256000
    assert audio_bytes(SMALL, [250]) == 320000 + 230400 + 76800 + 256000
    est = estimate(SMALL, RequestSizes(10, ((1, 2, 5),), (250,)))
    assert (est.vision, est.audio, est.decoder) == (100680, 883200, 7720)
    assert est.peak == ALLOCATOR_SLACK + 883200


def test_batched_vision_estimate_known_answers():
    """A bundle whose vision graph attends over padded batches (manifest full_head_chunk > 0): windows cost
    windows x 64^2 per head, full-attention blocks frames x frame^2 per head of one chunk, not patches^2."""
    g = dataclasses.replace(SMALL, vision_head_chunk=1)
    # 16x24 patches: 8x12 merged tokens = 2x3 windows of 64 patches; one frame of 384. Per patch 9808 B (above).
    # windows: scores 2*2*6*64*64*4 = 393216 + q/k/v/out 4*8*6*64*4 = 49152; full: 2*1*1*384^2*4 = 1179648
    # + 4*8*384*4 = 49152: the full block is the peak
    assert vision_bytes(g, [(1, 16, 24)]) == 9808 * 384 + 1179648 + 49152 == 4995072
    assert vision_bytes(SMALL, [(1, 16, 24)]) == 26 * 384**2 + 9808 * 384  # the masked graph, as before
    # a video of 3 such frames: frames are batched, not one 1152-patch segment (9x less than 1152^2)
    assert vision_bytes(g, [(3, 16, 24)]) == 9808 * 1152 + 3 * (2 * 384**2 * 4 + 4 * 8 * 384 * 4)
    # a patch count alone is one square frame, the dearest layout: 100 patches -> 10x10
    assert vision_bytes(g, 100) == vision_bytes(g, [(1, 10, 10)])
    n = max_vision_patches(g, ALLOCATOR_SLACK + 10_000_000)
    assert vision_bytes(g, n) <= 10_000_000 < vision_bytes(g, n + 1)
    assert n > max_vision_patches(SMALL, ALLOCATOR_SLACK + 10_000_000)


def test_batched_vision_estimate_of_7b_at_720p():
    """7B's encoder (16 heads, one head per full-attention chunk) on a 1280x720 image (52x92 patches): a fifth of
    the masked graph (0.66 against 3.34 GiB)."""
    g = dataclasses.replace(SEVEN_B, vision_head_chunk=1)
    batched, masked = vision_bytes(g, [(1, 52, 92)]), vision_bytes(SEVEN_B, [(1, 52, 92)])
    assert batched < masked / 5 and batched < 1 << 30


def test_max_vision_patches_is_the_largest_that_fits():
    budget = ALLOCATOR_SLACK + 10_000_000
    n = max_vision_patches(SMALL, budget)
    assert n > 0
    assert vision_bytes(SMALL, n) + ALLOCATOR_SLACK <= budget < vision_bytes(SMALL, n + 1) + ALLOCATOR_SLACK


SEVEN_B = Geometry(layers=28, heads=28, kv_heads=4, head_dim=128, hidden=3584, vocab=152064, ffn=18944, vision_depth=32,
                   vision_width=1280, vision_heads=16, vision_ffn=3420, vision_out=3584, audio_layers=32,
                   audio_width=1280, audio_heads=20, audio_ffn=5120)


def test_plan_chooses_one_shot_then_chunks_then_refuses():
    budget = MemoryBudget(4 << 30)
    assert plan_request(SEVEN_B, RequestSizes(600), budget).prefill_chunk is None  # a typical guard prompt
    plan = plan_request(SEVEN_B, RequestSizes(8192), budget)
    assert plan.prefill_chunk is not None and plan.prefill_chunk < 8192 and plan.estimate.peak <= 4 << 30
    # the next larger chunk would not have fitted
    assert decoder_bytes(SEVEN_B, 8192, plan.prefill_chunk * 2) + ALLOCATOR_SLACK > 4 << 30
    with pytest.raises(MemoryBudgetError, match=r"exceeds the memory budget of 4\.00 GiB by \d"):
        plan_request(SEVEN_B, RequestSizes(32736), budget)
    with pytest.raises(MemoryBudgetError, match=r"vision encoder.*patches"):
        plan_request(SEVEN_B, RequestSizes(600, ((1, 256, 256),)), budget)


def test_generation_is_planned_to_its_last_token():
    # last of 4 tokens after a 10-token prompt: a one-token run over 14: scores 2*2*1*14*4 = 224, mask 14*6 = 84,
    # K/V repeated 2*2*14*4*4 = 896, past+present KV 32*(28-1) = 864, activations 104*4 = 416, embeddings
    # 14*8*4 = 448, logits 80
    assert generation_bytes(SMALL, 10, 4) == 224 + 84 + 896 + 864 + 416 + 448 + 80 == 3012
    assert generation_bytes(SMALL, 10, 0) == 0
    assert estimate(SMALL, RequestSizes(10, new_tokens=4)).decoder == decoder_bytes(SMALL, 10)  # prefill larger
    assert estimate(SMALL, RequestSizes(10, new_tokens=40)).decoder == generation_bytes(SMALL, 10, 40)
    # 7B, a 700-token prompt and a 32,000-token critique budget: the cache alone outgrows 4 GiB at the end
    budget = MemoryBudget(4 << 30)
    assert plan_request(SEVEN_B, RequestSizes(700, new_tokens=256), budget).prefill_chunk is None
    assert kv_bytes(SEVEN_B, 32700) > 3 << 30
    with pytest.raises(MemoryBudgetError, match=r"answer budget of 32000 tokens.*critique_max_new_tokens"):
        plan_request(SEVEN_B, RequestSizes(700, new_tokens=32000), budget)
    plan = plan_request(SEVEN_B, RequestSizes(700, new_tokens=32000), MemoryBudget(16 << 30))
    assert plan.estimate.decoder >= kv_bytes(SEVEN_B, 2 * 32700 - 1)


def test_memory_budget_and_sizes_are_checked():
    assert parse_bytes("4GiB") == 4 << 30 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes("6GB") == 6 * 10**9
    for bad in ("lots", "4 GiBs", "-1"):
        with pytest.raises(Exception, match="memory budget"):
            parse_bytes(bad)
    for bad in (0, True, 1.5e9, ALLOCATOR_SLACK):
        with pytest.raises(ValueError, match="MemoryBudget.bytes"):
            MemoryBudget(bad)
    with pytest.raises(ValueError, match="image_policy"):
        MemoryBudget(image_policy="crop")


def test_geometry_from_the_tiny_manifest(tiny_bundle):
    from omniguard_edge.runtime.manifest import load_manifest

    g = Geometry.from_manifest(load_manifest(tiny_bundle, verify="none"))
    # tiny: decoder 2 layers, 4 heads, 2 KV heads, head_dim 16; vision width 32 -> 2 heads of 16 (profile: 2)
    assert (g.layers, g.heads, g.kv_heads, g.head_dim, g.hidden) == (2, 4, 2, 16, 64)
    assert (g.vision_depth, g.vision_width, g.vision_heads, g.audio_heads) == (4, 32, 2, 2)


# --- calibration and memory returned, measured in fresh processes ------------------------------------------

_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from omniguard_edge.runtime.bundle import SessionOptions, open_bundle
    from omniguard_edge.runtime.decode import Decoder
    from omniguard_edge.runtime.encoders import encode_vision

    def rss():
        d = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024

    bundle, kind, a, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bd = open_bundle(bundle, SessionOptions(intra_op_threads=1, decoder_graph="decoder"), verify="none")
    m, rng = bd.manifest, np.random.default_rng(0)
    if kind == "decoder":
        dec = Decoder(bd.sessions["decoder"], m.decoder)
        def run(n, chunk):
            e = rng.standard_normal((1, n, m.decoder["hidden_size"])).astype(np.float32)
            p = np.broadcast_to(np.arange(n), (3, 1, n)).astype(np.int64).copy()
            before = rss()[0]
            dec.prefill(e, p, 0, chunk)
            return before
        run(64, None)
        before = run(a, b or None)
    else:
        def run(h, w):
            rows = rng.standard_normal((h * w, 1176)).astype(np.float32)
            before = rss()[0]
            encode_vision(bd.sessions["vision"], [rows], [(1, h, w)], m.vision)
            return before
        run(8, 8)
        before = run(a, b)
    print(json.dumps({"delta": rss()[1] - before}))
""")


def _peak_delta(bundle, *args) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(bundle), *map(str, args)], capture_output=True, text=True,
                         timeout=300, preexec_fn=_cap_address_space)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["delta"]


def _cap_address_space(limit: int = 6 << 30):
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.slow
@pytest.mark.parametrize("kind,a,b", [("decoder", 3000, 0), ("decoder", 6000, 512), ("vision", 64, 64)])
def test_estimate_bounds_the_measured_peak(tiny_bundle, kind, a, b):
    """The estimate (plus the allocator slack) is at least the measured peak RSS increase, and not wildly more
    for a run whose tensors dominate (within 2x + slack)."""
    from omniguard_edge.runtime.manifest import load_manifest

    g = Geometry.from_manifest(load_manifest(tiny_bundle, verify="none"))
    est = decoder_bytes(g, a, b or None) if kind == "decoder" else vision_bytes(g, a * b)
    measured = _peak_delta(tiny_bundle, kind, a, b)
    assert measured > 50 << 20  # the run allocated something sizeable: the comparison means something
    assert measured <= est + ALLOCATOR_SLACK
    assert est <= 2 * measured + ALLOCATOR_SLACK


_RETURN = textwrap.dedent("""
    import json, sys
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    def rss():
        d = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024

    g = Guard.from_bundle(sys.argv[1], GuardOptions(session=SessionOptions(decoder_graph=sys.argv[2])), verify="none")
    g.moderate("hello there")
    before = rss()[0]
    res = g.moderate("the " * 6000)
    after, peak = rss()
    print(json.dumps({"before": before, "after": after, "peak": peak, "verdict": res.verdict,
                      "error": res.error if hasattr(res, "error") else None, "tokens": res.prompt_tokens}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["decoder", "decoder_gqa"])
def test_rss_returns_after_a_6k_token_request(tiny_bundle, graph):
    out = subprocess.run([sys.executable, "-c", _RETURN, str(tiny_bundle), graph], capture_output=True, text=True,
                         timeout=300, preexec_fn=_cap_address_space, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["verdict"] != "error" and r["tokens"] > 6000, r  # the request really ran
    if graph == "decoder":  # materialised 6k x 6k attention scores: far more than the margin below
        assert r["peak"] - r["before"] > 300 << 20, r
    else:  # GroupQueryAttention never holds the whole score matrix (measured: +20 MB on tiny, 1 thread)
        assert r["peak"] - r["before"] < 100 << 20, r
    assert r["after"] - r["before"] < 300 << 20, r


def test_an_image_over_its_vision_share_is_decoded_once_at_the_cap(tiny_bundle, monkeypatch, tmp_path):
    """A large image (2000x1500: 1988x1512 by the official resize rule) under a small budget is preprocessed
    once, at the budget's pixel cap (never at full size first), and the result says it was downscaled; under
    image_policy='refuse' it is refused, also after one reduced decode."""
    from PIL import Image

    import omniguard_edge.runtime.media as media_mod
    from omniguard_edge.runtime.guard import Guard, GuardOptions
    from omniguard_edge.runtime.memory import MemoryBudget

    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)).save(path)
    calls = []
    real = media_mod.image_pixels

    def counting(source, cfg, limits, *rest):
        calls.append(limits.max_pixels)
        return real(source, cfg, limits, *rest)

    monkeypatch.setattr(media_mod, "image_pixels", counting)
    budget = 400 << 20
    g = Guard.from_bundle(tiny_bundle, GuardOptions(memory=MemoryBudget(bytes=budget), constrain_verdict=True))
    r = g.moderate("what is this?", image=path)
    assert r.verdict in ("safe", "unsafe"), r.error
    assert len(calls) == 1 and calls[0] < g.options.image_limits.max_pixels
    assert any(n.startswith("image: downscaled from 1988x1512 to ") for n in r.notes), r.notes
    calls.clear()
    g = Guard.from_bundle(tiny_bundle, GuardOptions(memory=MemoryBudget(bytes=budget, image_policy="refuse")))
    r = g.moderate("what is this?", image=path)
    assert r.verdict == "error" and "exceeds the memory budget" in r.error and len(calls) == 1
    calls.clear()
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(small)
    r = g.moderate("what is this?", image=small)  # under the cap: judged, no note, one call
    assert r.verdict != "error" and r.notes == [] and len(calls) == 1
