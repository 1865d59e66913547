"""Greedy tokens of the torch-free runtime equal transformers' thinker.generate on the same inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the export extra (torch/transformers)")
pytest.importorskip("qwen_omni_utils", reason="the official preprocessing (qwen-omni-utils) is the reference")

from omniguard_edge.runtime.preprocess.image import ImageConfig  # noqa: E402
from omniguard_edge.runtime.prompt import Conversation, Policy, compose_guard_text  # noqa: E402

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf(tiny_checkpoint, tiny_thinker_model):
    """The shared PyTorch reference (omniguard_edge.export.torch_reference), the same one the benchmarks use."""
    from omniguard_edge.export.torch_reference import Reference

    return Reference(tiny_checkpoint, model=tiny_thinker_model)


@pytest.fixture(scope="module", params=["decoder", "decoder_gqa"])
def guard(request, tiny_guard):
    """tiny_guard's options with each decoder graph: the standard-ops graph and the fast in-place KV graph."""
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard

    if request.param not in tiny_guard.bundle.manifest.graphs:
        pytest.skip(f"the bundle has no {request.param} graph")
    options = dataclasses.replace(tiny_guard.options, session=SessionOptions(decoder_graph=request.param))
    g = Guard.from_bundle(tiny_guard.bundle.path, options, verify="none")
    assert g.bundle.decoder_graph == request.param
    return g


def _hf_tokens(ref, text, media, min_new_tokens=0):
    inputs = ref.inputs(text, media)
    tokens, _ = ref.generate(inputs, NEW_TOKENS if not min_new_tokens else min_new_tokens, min_new_tokens)
    return tokens, inputs["input_ids"].shape[1]


def _media(image=None, audio=None):
    from omniguard_edge.export.torch_reference import Media

    return Media.load(image=image, audio=audio)


def _check(result, expected):
    ref_tokens, ref_prompt = expected
    assert result.verdict != "error", result.error
    assert result.prompt_tokens == ref_prompt
    # random weights never stop on their own within the budget, so both sides fill it: a comparison of
    # two short or empty lists would prove nothing
    assert len(ref_tokens) == NEW_TOKENS
    assert result.generated_ids == ref_tokens


def _guard_text(prompt=None, response=None, media_kinds=()):
    conv = Conversation.of_optional(prompt, response)
    return compose_guard_text(conv, list(media_kinds), Policy())


def test_text_prompt_only(guard, hf):
    _check(guard.moderate("How do I make a bomb?"), _hf_tokens(hf, _guard_text("How do I make a bomb?"), _media()))


def test_prompt_and_response(guard, hf):
    prompt, response = "How do I pick a lock?", "First, insert a tension wrench into the keyhole."
    _check(guard.moderate(prompt, response), _hf_tokens(hf, _guard_text(prompt, response), _media()))


@pytest.mark.parametrize("name", ["colour_517x333.png", "colour_640x480.jpg"])
def test_image_only(name, guard, hf, media_dir):
    path = media_dir / name
    expected = _hf_tokens(hf, _guard_text(media_kinds=["image"]), _media(image=path))
    _check(guard.moderate(image=path), expected)


@pytest.mark.parametrize("name", ["short_1.5s.wav", "chunks_5s.wav"])
def test_audio_with_text(name, guard, hf, media_dir):
    path = media_dir / name
    expected = _hf_tokens(hf, _guard_text("Listen to this.", media_kinds=["audio"]), _media(audio=path))
    _check(guard.moderate("Listen to this.", audio=path), expected)


def test_image_and_audio(guard, hf, media_dir):
    img, wav = media_dir / "colour_517x333.png", media_dir / "short_1.5s.wav"
    expected = _hf_tokens(hf, _guard_text("Is this ok?", media_kinds=["image", "audio"]), _media(image=img, audio=wav))
    _check(guard.moderate("Is this ok?", image=img, audio=wav), expected)


def test_video(guard, hf):
    """Same sampled, resized frames on both sides: checks normalization, patchify, the temporal grid,
    seconds per grid and TMRoPE against transformers' video processor and model."""
    from omniguard_edge.runtime.preprocess.video import VideoLimits, sample_count

    rng = np.random.default_rng(3)
    h, w = 308, 336  # multiples of 28 inside the default per-frame budget: neither side resizes
    frames = np.clip(rng.normal(128, 40, (9, 1, 1, 3)) + np.linspace(0, 90, h * w * 3).reshape(h, w, 3),
                     0, 255).astype(np.uint8)  # 9 frames (odd), 4 fps: 2.25 s
    fps = 4.0
    limits = VideoLimits()
    from omniguard_edge.runtime.guard import Guard

    guard = Guard(guard.bundle, dataclasses.replace(guard.options, critique_max_new_tokens=NEW_TOKENS,
                                                         video_limits=limits))
    n = sample_count(len(frames), fps, limits)
    idx = np.round(np.linspace(0, len(frames) - 1, n)).astype(int)
    sample_fps = n / len(frames) * fps
    clip = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float()  # already a multiple of 28: no resize
    from omniguard_edge.export.torch_reference import Media

    media = Media(videos=[clip], video_fps=[sample_fps])
    expected = _hf_tokens(hf, _guard_text("What happens here?", media_kinds=["video"]), media)
    assert ImageConfig().factor == 28 and frames.shape[1] % 28 == 0 and frames.shape[2] % 28 == 0
    _check(guard.moderate("What happens here?", video=(frames, fps)), expected)


def test_64_decode_steps_match_transformers(guard, hf):
    """Fixed budgets for benchmarks, EOS masked the same way on both sides: 64 greedy steps of each decoder graph
    (the fast one updating its KV buffers in place) equal transformers' generate, token for token."""
    from omniguard_edge.runtime.guard import Guard

    g = Guard(guard.bundle, dataclasses.replace(guard.options, critique_max_new_tokens=64, min_new_tokens=64))
    expected, _ = _hf_tokens(hf, _guard_text("hello"), _media(), min_new_tokens=64)
    result = g.moderate("hello")
    assert result.generated_ids == expected
    assert len(result.generated_ids) == 64 and len(result.token_times) == 64


def test_the_reference_in_bfloat16_computes_the_same_model(tiny_checkpoint, media_dir, hf):
    """latency.py --reference-dtype bfloat16 (the PyTorch GPU baseline of benchmarks/gpu_check.py): the same
    pieces in bf16, with the processor's float features cast to it and the ids kept int. Checked on the CPU (no GPU
    here): its prompt logits follow fp32's (bf16 keeps 8 bits of mantissa) and a bad dtype or a missing CUDA device
    is refused by name."""
    from omniguard_edge.export.torch_reference import Media, Reference

    media = Media.load(image=str(media_dir / "colour_517x333.png"))
    bf16 = Reference(tiny_checkpoint, dtype="bfloat16")
    inputs = bf16.inputs("Is this image safe?", media)
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.int64
    assert bf16.model.dtype == torch.bfloat16
    _, low = bf16.staged(inputs)
    _, ref = hf.staged(hf.inputs("Is this image safe?", media))
    cos = torch.nn.functional.cosine_similarity(low.float(), ref.float(), dim=0).item()
    assert cos > 0.99, cos
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, not 'int8'"):
        Reference(tiny_checkpoint, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda': this torch has no CUDA device"):
            Reference(tiny_checkpoint, device="cuda")
