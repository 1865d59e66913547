"""Bad input gets a typed error with a clear message, and through `moderate` an `error` verdict: never safe."""

from __future__ import annotations

import numpy as np
import pytest

from omniguard_edge.runtime.errors import InputError
from omniguard_edge.runtime.preprocess.audio import AudioLimits, audio_features, load_audio
from omniguard_edge.runtime.preprocess.image import ImageLimits, image_pixels
from omniguard_edge.runtime.preprocess.video import video_pixels


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, media_dir):
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    (d / "empty.png").write_bytes(b"")
    (d / "garbage.png").write_bytes(b"\x89PNG not really a png at all" * 10)
    good = (media_dir / "colour_517x333.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (1, 1)).save(d / "one_pixel.png")
    Image.new("RGB", (4000, 10)).save(d / "extreme_ratio.png")
    (d / "empty.wav").write_bytes(b"")
    wav = (media_dir / "short_1.5s.wav").read_bytes()
    (d / "truncated.wav").write_bytes(wav[:30])
    (d / "text.mp4").write_bytes(b"this is not a video")
    import soundfile as sf

    sf.write(d / "zero.wav", np.zeros(0, np.float32), 16000)
    sf.write(d / "click.wav", np.zeros(200, np.float32), 16000)  # 12.5 ms
    sf.write(d / "long.wav", np.zeros(16000 * 12, np.float32), 16000)
    return d


@pytest.mark.parametrize("name,message", [
    ("empty.png", "cannot decode image"), ("garbage.png", "cannot decode image"),
    ("truncated.png", "cannot decode image"), ("one_pixel.png", "too small"), ("extreme_ratio.png", "aspect ratio"),
])
def test_bad_images(name, message, bad_files):
    with pytest.raises(InputError, match=message):
        image_pixels(bad_files / name)


def test_oversized_image_is_refused(bad_files, tmp_path):
    from PIL import Image

    Image.new("RGB", (3000, 3000)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="exceeds the limit"):
        image_pixels(tmp_path / "big.png", limits=ImageLimits(max_source_pixels=4_000_000))


def test_bad_arrays():
    with pytest.raises(InputError, match="uint8 array"):
        image_pixels(np.zeros((20, 20, 4), np.uint8))
    with pytest.raises(InputError, match="sample_rate"):
        load_audio(np.zeros(100, np.float32))
    with pytest.raises(InputError, match="mono"):
        load_audio(np.zeros((100, 2), np.float32), 16000)
    with pytest.raises(InputError, match="NaN"):
        load_audio(np.full(1000, np.nan, np.float32), 16000)
    with pytest.raises(InputError, match="frame rate"):
        video_pixels(np.zeros((4, 56, 56, 3), np.uint8))


@pytest.mark.parametrize("name,message", [
    ("empty.wav", "cannot decode audio"), ("truncated.wav", "cannot decode audio"),
    ("zero.wav", "too short"), ("click.wav", "too short"),
])
def test_bad_audio(name, message, bad_files):
    with pytest.raises(InputError, match=message):
        audio_features(bad_files / name, np.zeros((201, 128)))


def test_audio_length_limit(bad_files):
    with pytest.raises(InputError, match="longer than the limit of 10 s"):
        audio_features(bad_files / "long.wav", np.zeros((201, 128)), limits=AudioLimits(max_seconds=10))


def test_bad_video(bad_files):
    with pytest.raises(InputError, match="cannot decode"):
        video_pixels(bad_files / "text.mp4")
    with pytest.raises(InputError, match="no such file"):
        video_pixels(bad_files / "missing.mp4")


@pytest.mark.parametrize("kwargs", [
    dict(image="empty.png"), dict(image="one_pixel.png"), dict(audio="zero.wav"), dict(video="text.mp4"),
    dict(text="hello", audio="truncated.wav"), dict(image="missing.png"),
])
def test_moderate_fails_closed(kwargs, tiny_guard, bad_files):
    resolved = {k: (bad_files / v if k != "text" else v) for k, v in kwargs.items()}
    result = tiny_guard.moderate(**resolved)
    assert result.verdict == "error" and not result.is_safe
    assert result.error.startswith("InputError:")


def test_moderate_rejects_non_utf8_and_empty(tiny_guard):
    bad = tiny_guard.moderate(b"caf\xe9")
    assert bad.verdict == "error" and "not valid UTF-8" in bad.error
    assert tiny_guard.moderate().verdict == "error"
    assert tiny_guard.moderate(123).verdict == "error"
    assert tiny_guard.moderate("café".encode()).generated_ids == tiny_guard.moderate("café").generated_ids


def test_too_long_prompt_is_refused_not_truncated(tiny_bundle):
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    guard = Guard.from_bundle(tiny_bundle, GuardOptions(max_prompt_tokens=600))
    result = guard.moderate("word " * 400)
    assert result.verdict == "error" and "exceeds the limit of 600" in result.error


def test_unexpected_failure_is_an_error_result(tiny_guard, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("decoder crashed")

    monkeypatch.setattr(tiny_guard.decoder, "generate", explode)
    result = tiny_guard.moderate("hello")
    assert result.verdict == "error" and result.error == "RuntimeError: decoder crashed"
