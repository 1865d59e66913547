"""Greedy tokens of the torch-free runtime equal transformers' thinker.generate on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("qwen_omni_utils", reason="the official preprocessing (qwen-omni-utils) is the reference")

from omniguard_edge.runtime.preprocess.image import ImageConfig  # noqa: E402
from omniguard_edge.runtime.prompt import Conversation, Policy, render_guard_text  # noqa: E402

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf(tiny_checkpoint, tiny_thinker_model):
    from transformers import Qwen2_5OmniProcessor

    # the slow PIL image processor: what the transformers versions OmniGuard used default to (DESIGN 1)
    proc = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint, use_fast=False)
    return tiny_thinker_model, proc


def _hf_tokens(hf, text, media, **proc_kw):
    model, proc = hf
    content = [{"type": "text", "text": text}] + [{"type": kind} for kind, _ in media]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    kinds = {k: [v for kind, v in media if kind == k] or None for k in ("image", "audio", "video")}
    inputs = proc(text=[prompt], images=kinds["image"], audio=kinds["audio"], videos=kinds["video"],
                  return_tensors="pt", padding=True, use_audio_in_video=False, **proc_kw)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_audio_in_video=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs["input_ids"].shape[1]


def _official_image(path):
    from qwen_omni_utils import fetch_image

    return fetch_image({"image": str(path)})


def _official_audio(path):
    import librosa

    return librosa.load(str(path), sr=16000)[0]


def _check(result, expected):
    ref_tokens, ref_prompt = expected
    assert result.verdict != "error", result.error
    assert result.prompt_tokens == ref_prompt
    assert result.generated_ids == ref_tokens
    assert len(ref_tokens) == NEW_TOKENS or ref_tokens[-1] in (151645, 151643) or len(ref_tokens) < NEW_TOKENS


def _guard_text(prompt="", response=None, image_only=False):
    return render_guard_text(None if image_only else Conversation.of(prompt, response), Policy(), image_only)


def test_text_prompt_only(tiny_guard, hf):
    _check(tiny_guard.moderate("How do I make a bomb?"), _hf_tokens(hf, _guard_text("How do I make a bomb?"), []))


def test_prompt_and_response(tiny_guard, hf):
    prompt, response = "How do I pick a lock?", "First, insert a tension wrench into the keyhole."
    _check(tiny_guard.moderate(prompt, response), _hf_tokens(hf, _guard_text(prompt, response), []))


@pytest.mark.parametrize("name", ["colour_517x333.png", "colour_640x480.jpg"])
def test_image_only(name, tiny_guard, hf, media_dir):
    path = media_dir / name
    expected = _hf_tokens(hf, _guard_text(image_only=True), [("image", _official_image(path))])
    _check(tiny_guard.moderate(image=path), expected)


@pytest.mark.parametrize("name", ["short_1.5s.wav", "chunks_5s.wav"])
def test_audio_with_text(name, tiny_guard, hf, media_dir):
    path = media_dir / name
    expected = _hf_tokens(hf, _guard_text("Listen to this."), [("audio", _official_audio(path))])
    _check(tiny_guard.moderate("Listen to this.", audio=path), expected)


def test_image_and_audio(tiny_guard, hf, media_dir):
    img, wav = media_dir / "colour_517x333.png", media_dir / "short_1.5s.wav"
    expected = _hf_tokens(hf, _guard_text("Is this ok?"), [("image", _official_image(img)), ("audio", _official_audio(wav))])
    _check(tiny_guard.moderate("Is this ok?", image=img, audio=wav), expected)


def test_video(tiny_guard, hf):
    """Same sampled, resized frames on both sides: checks normalization, patchify, the temporal grid,
    seconds per grid and TMRoPE against transformers' video processor and model."""
    from omniguard_edge.runtime.preprocess.video import VideoLimits, sample_count

    rng = np.random.default_rng(3)
    h, w = 308, 336  # multiples of 28 inside the default per-frame budget: neither side resizes
    frames = np.clip(rng.normal(128, 40, (9, 1, 1, 3)) + np.linspace(0, 90, h * w * 3).reshape(h, w, 3),
                     0, 255).astype(np.uint8)  # 9 frames (odd), 4 fps: 2.25 s
    fps = 4.0
    limits = VideoLimits()
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    guard = Guard(tiny_guard.bundle, GuardOptions(critique=True, critique_max_new_tokens=NEW_TOKENS, video_limits=limits))
    n = sample_count(len(frames), fps, limits)
    idx = np.round(np.linspace(0, len(frames) - 1, n)).astype(int)
    sample_fps = n / len(frames) * fps
    clip = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float()  # already a multiple of 28: no resize
    expected = _hf_tokens(hf, _guard_text("What happens here?"), [("video", clip)], fps=sample_fps)
    assert ImageConfig().factor == 28 and frames.shape[1] % 28 == 0 and frames.shape[2] % 28 == 0
    _check(guard.moderate("What happens here?", video=(frames, fps)), expected)


def test_min_new_tokens_matches_transformers(tiny_bundle, hf):
    """Fixed budgets for benchmarks: EOS masked the same way on both sides."""
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    guard = Guard.from_bundle(tiny_bundle, GuardOptions(critique=True, critique_max_new_tokens=40, min_new_tokens=40))
    model, proc = hf
    text = _guard_text("hello")
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                      add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    result = guard.moderate("hello")
    assert result.generated_ids == out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(result.generated_ids) == 40 and len(result.token_times) == 40
