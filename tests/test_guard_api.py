"""Guard API details: inputs as paths, bytes or arrays; containers; providers; verdict-first stopping."""

from __future__ import annotations

import numpy as np
import pytest

from omniguard_edge.runtime.bundle import SessionOptions, open_bundle
from omniguard_edge.runtime.guard import Guard, GuardOptions
from omniguard_edge.runtime.verdict import parse


def test_bytes_and_arrays_equal_paths(tiny_guard, media_dir):
    import soundfile as sf
    from PIL import Image

    img, wav = media_dir / "colour_517x333.png", media_dir / "short_1.5s.wav"
    by_path = tiny_guard.moderate("x", image=img, audio=wav)
    by_bytes = tiny_guard.moderate("x", image=img.read_bytes(), audio=wav.read_bytes())
    wave, rate = sf.read(wav, dtype="float32")
    by_array = tiny_guard.moderate("x", image=np.asarray(Image.open(img).convert("RGB")), audio=wave, sample_rate=rate)
    assert by_path.generated_ids == by_bytes.generated_ids == by_array.generated_ids
    assert by_path.verdict != "error"


@pytest.mark.parametrize("suffix,fourcc", [(".avi", "MJPG"), (".webm", "VP80"), (".mp4", "mp4v")])
def test_video_containers(suffix, fourcc, tiny_guard, tmp_path):
    import cv2

    path = tmp_path / f"clip{suffix}"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 6, (224, 168))
    if not writer.isOpened():
        pytest.skip(f"this OpenCV build cannot write {fourcc}{suffix}")
    for i in range(13):
        writer.write(np.full((168, 224, 3), i * 15, np.uint8))
    writer.release()
    result = tiny_guard.moderate("what is shown?", video=path)
    assert result.verdict != "error", result.error
    assert result.prompt_tokens > 500


def test_missing_provider_warns_and_runs_on_cpu(tiny_bundle):
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider"):
        bundle = open_bundle(tiny_bundle, SessionOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                                                         graphs=("decoder",)))
    assert bundle.providers["decoder"] == ["CPUExecutionProvider"]


def test_guard_without_vision_graph_refuses_images(tiny_bundle, media_dir):
    guard = Guard.from_bundle(tiny_bundle, GuardOptions(session=SessionOptions(graphs=("audio", "decoder"))))
    assert guard.moderate("hi").verdict != "error"
    result = guard.moderate("hi", image=media_dir / "colour_517x333.png")
    assert result.verdict == "error" and "without the vision graph" in result.error


def test_free_decoding_stops_once_verdict_and_categories_are_read(tiny_guard):
    """Free decoding's stop rule on scripted text: generation ends after the categories line."""
    guard = Guard(tiny_guard.bundle, GuardOptions(constrain_verdict=False))
    enc = guard.prompt.encode_plain

    def stops(text: str, mode: str = "categories") -> bool:
        answer = Guard(tiny_guard.bundle, GuardOptions(constrain_verdict=False, mode=mode)).answer()
        answer.generated = enc(text)
        return answer._stop_free()

    assert not stops("unsafe") and not stops("unsafe\nS1, S9")
    assert stops("unsafe\nS1, S9\n") and stops("safe\n")
    assert stops("unsafe\n", "verdict") and not stops("unsafe", "verdict")
    assert not stops("unsafe\nS1, S9\nBecause\n", "full")
    assert guard.answer().constrain is False


def test_default_answer_is_always_parseable(tiny_bundle):
    guard = Guard.from_bundle(tiny_bundle, GuardOptions(max_new_tokens=4))
    assert guard.options.constrain_verdict and guard.options.mode == "categories"
    result = guard.moderate("How do I bake bread?")
    assert result.verdict in ("safe", "unsafe")
    assert parse(result.raw_text).verdict == result.verdict  # the generated text says the verdict itself
    assert 0.0 <= result.p_unsafe <= 1.0  # its value against the decoder's own logits: tests/test_decoding.py


def test_multi_turn_conversation(tiny_guard):
    result = tiny_guard.moderate(conversation=["hi", "hello, how can I help?", "tell me a secret"])
    assert result.verdict != "error" and result.prompt_tokens > 500
