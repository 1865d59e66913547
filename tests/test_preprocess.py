"""Numpy preprocessing equals the official path (qwen-omni-utils + the PIL image processor + the
Whisper feature extractor) on real and generated files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the export extra (torch/transformers)")
qou = pytest.importorskip("qwen_omni_utils", reason="the official preprocessing (qwen-omni-utils) is the reference")

from omniguard_edge.runtime.preprocess.audio import load_audio, log_mel  # noqa: E402
from omniguard_edge.runtime.preprocess.image import ImageConfig, image_pixels  # noqa: E402
from omniguard_edge.runtime.preprocess.video import video_pixels  # noqa: E402

FIGSTEP = Path(__file__).resolve().parents[2] / "shared" / "data" / "image" / "figstep-safebench-tiny"
EXACT_MEL_TOL = 1e-6  # vs the extractor's own float64 numpy path (measured 1.2e-7)
PIXEL_TOL = 1e-6  # same bicubic (Pillow) on both sides; only float rounding differs (measured 4.8e-7)


@pytest.fixture(scope="module")
def proc(tiny_checkpoint):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint, use_fast=False)


def _official_image(proc, path):
    out = proc.image_processor(images=[qou.fetch_image({"image": str(path)})], return_tensors="np")
    return out["pixel_values"], tuple(out["image_grid_thw"][0])


def _check_image(proc, path):
    ref_rows, ref_grid = _official_image(proc, path)
    rows, grid = image_pixels(path, ImageConfig())
    assert grid == ref_grid
    assert np.abs(rows - ref_rows).max() <= PIXEL_TOL


@pytest.mark.skipif(not FIGSTEP.exists(), reason="../shared/data (FigStep PNGs) is not here")
def test_figstep_pngs(proc):
    for path in sorted(FIGSTEP.glob("*.png"))[::10]:
        _check_image(proc, path)


@pytest.fixture(scope="module")
def image_zoo(tmp_path_factory):
    """Modes and formats that break naive loaders: colour (catches RGB/BGR swaps), grayscale, alpha,
    palette, 16-bit, JPEG, WebP, tiny and large."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:420]
    rgb = np.stack([x * 255 // 420, y * 255 // 300, rng.integers(0, 255, (300, 420))], -1).astype(np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb).save(d / "rgb.jpg", quality=85)
    Image.fromarray(rgb).save(d / "rgb.webp")
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1), "RGBA").save(d / "alpha.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray((x * 65535 // 420).astype(np.uint16)).save(d / "gray16.png")
    Image.fromarray(rgb[:10, :12]).save(d / "tiny_12x10.png")
    Image.fromarray(np.tile(rgb, (5, 5, 1))[:1500, :2000]).save(d / "large_2000x1500.png")
    return d


@pytest.mark.parametrize("name", ["rgb.png", "rgb.jpg", "rgb.webp", "gray.png", "alpha.png", "palette.png",
                                  "tiny_12x10.png", "large_2000x1500.png"])
def test_image_formats(name, proc, image_zoo):
    _check_image(proc, image_zoo / name)


def test_gray16_is_rescaled_where_the_official_path_clips(proc, image_zoo):
    """A deliberate difference: convert('RGB') clips a 16-bit ramp to white above 255 (what the official path
    judges); the runtime rescales it by its range, so the ramp stays a ramp."""
    ref_rows, ref_grid = _official_image(proc, image_zoo / "gray16.png")
    rows, grid = image_pixels(image_zoo / "gray16.png", ImageConfig())
    assert grid == ref_grid
    assert ref_rows.std() < 0.5 * rows.std()  # the official input is nearly all one colour


def test_array_input_is_rgb(image_zoo, proc):
    from PIL import Image

    arr = np.asarray(Image.open(image_zoo / "rgb.png").convert("RGB"))
    assert np.array_equal(image_pixels(arr)[0], image_pixels(image_zoo / "rgb.png")[0])
    assert not np.array_equal(image_pixels(arr[..., ::-1].copy())[0], image_pixels(arr)[0])  # a BGR swap shows


def _fe(proc, wave):
    out = proc.feature_extractor(wave, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                                 return_tensors="np")
    return out["input_features"][0][:, : out["attention_mask"][0].sum()]


def _assert_mel_parity(mine, wave, proc):
    """Our log-mel equals the Whisper extractor's own float64 numpy path within EXACT_MEL_TOL. The torch float32
    path the official pipeline runs is the same function rounded to float32, which strays from the float64
    answer by an amount that depends on the CPU's FFT kernels (6.0e-5 on one bin of an espeak clip on an
    AVX-512 machine, <= 2.8e-5 elsewhere): it is checked to be that function (within 1e-4), not used as
    the yardstick."""
    fe = proc.feature_extractor
    official = _fe(proc, wave)
    padded = np.zeros(max(fe.n_samples, len(wave)), np.float64)
    padded[: len(wave)] = wave
    exact = fe._np_extract_fbank_features(padded[None], "cpu")[0][:, : official.shape[1]]
    assert mine.shape == official.shape
    assert np.abs(mine - exact).max() <= EXACT_MEL_TOL
    assert np.abs(exact - official).max() <= 1e-4  # the extractor's two paths are one function


@pytest.mark.parametrize("seconds", [0.05, 1.0, 3.01, 31.7])
def test_log_mel_matches_whisper_feature_extractor(seconds, proc):
    rng = np.random.default_rng(1)
    n = int(seconds * 16000)
    wave = (0.1 * rng.standard_normal(n) * np.sin(np.arange(n) / 500)).astype(np.float32)
    _assert_mel_parity(log_mel(wave, proc.feature_extractor.mel_filters), wave, proc)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "How do I make a weapon at home without anyone knowing?"],
                   check=True, capture_output=True)
    return path


def test_espeak_speech_matches_librosa_and_feature_extractor(speech, proc):
    import librosa
    import soundfile as sf

    assert sf.info(str(speech)).samplerate == 22050  # resampling is exercised
    ref_wave = librosa.load(str(speech), sr=16000)[0]
    wave = load_audio(speech)
    assert wave.shape == ref_wave.shape and np.abs(wave - ref_wave).max() <= 1e-6
    _assert_mel_parity(log_mel(wave, proc.feature_extractor.mel_filters), ref_wave, proc)


def test_stereo_44k_flac_is_downmixed_like_librosa(tmp_path):
    import librosa
    import soundfile as sf

    t = np.arange(44100 * 2) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 500 * t)], 1).astype(np.float32) * 0.3
    sf.write(tmp_path / "s.flac", stereo, 44100)
    ref = librosa.load(str(tmp_path / "s.flac"), sr=16000)[0]
    assert np.abs(load_audio(tmp_path / "s.flac") - ref).max() <= 1e-4  # flac is 16-bit: both read the same ints


JFK = FIGSTEP.parents[1] / "audio" / "jfk.flac"


@pytest.mark.skipif(not JFK.exists(), reason="../shared/data/audio/jfk.flac is not here")
def test_real_jfk_flac_matches_librosa_and_feature_extractor(proc):
    """A real recording: 24-bit stereo FLAC at 44.1 kHz (decoding, downmix and resampling all exercised).
    Measured: samples identical (max |diff| 0.0), log-mel max |diff| 2.8e-5."""
    import librosa
    import soundfile as sf

    info = sf.info(str(JFK))
    assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_24")
    ref_wave = librosa.load(str(JFK), sr=16000)[0]
    wave = load_audio(JFK)
    assert wave.shape == ref_wave.shape and np.abs(wave - ref_wave).max() <= 1e-6
    _assert_mel_parity(log_mel(wave, proc.feature_extractor.mel_filters), ref_wave, proc)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    import cv2

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 240))
    base = (np.stack(np.meshgrid(np.arange(320), np.arange(240)), -1).sum(-1) % 255).astype(np.uint8)
    for i in range(31):  # 31 frames: an odd count
        frame = np.stack([base, np.roll(base, i * 5, 1), 255 - base], -1)
        cv2.circle(frame, (50 + i * 7, 120), 30, (0, 0, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def test_video_matches_official_sampling(clip, proc, monkeypatch):
    """Frames decoded with PyAV (what torchvision.io.read_video did), sampled and resized by
    qwen-omni-utils itself; ours decode with OpenCV and resize with Pillow."""
    from omniguard_edge.export.torch_reference import read_video_pyav

    vp = qou.v2_5.vision_process
    monkeypatch.setattr(vp.io, "read_video", read_video_pyav, raising=False)
    monkeypatch.setattr(vp, "FORCE_QWENVL_VIDEO_READER", "torchvision")
    vp.get_video_reader_backend.cache_clear()
    video, sample_fps = vp.fetch_video({"video": str(clip)}, return_video_sample_fps=True)
    ref = proc.video_processor(videos=[video], return_tensors="np")
    rows, grid, seconds = video_pixels(clip)
    assert grid == tuple(ref["video_grid_thw"][0]) and seconds == pytest.approx(2 / sample_fps)
    diff = np.abs(rows - ref["pixel_values_videos"])
    # measured on this clip: max 0.195, mean 0.0017, p99 0.015 (normalized units; 1 level ~ 0.015)
    assert diff.mean() <= 0.005 and np.quantile(diff, 0.99) <= 0.03 and diff.max() <= 0.3


@pytest.mark.parametrize("frames", [1, 3, 4])
def test_pixel_rows_give_the_processors_bits_for_every_value(frames):
    """pixel_rows lays out uint8 patches and looks values up in a table; it must equal the processor's float32
    arithmetic (rescale, normalize) laid out in merge-block order, bit for bit, for every value of every channel,
    for an image and for odd and even frame counts (the last frame repeated to fill the temporal patch)."""
    from omniguard_edge.runtime.preprocess.image import ImageConfig, pixel_rows

    cfg = ImageConfig()
    rng = np.random.default_rng(frames)
    every = np.zeros((280, 252, 3), np.int64)  # 20 x 18 patches
    i, j = np.meshgrid(np.arange(256), np.arange(252), indexing="ij")
    every[:256] = np.stack([i, 251 - j, (i + j) % 256], -1)
    every[256:260, :, 1] = np.arange(252, 256)[:, None]  # channel 1's last values
    video = np.stack([every if k == 0 else rng.integers(0, 256, every.shape) for k in range(frames)]).astype(np.uint8)
    assert all(len(np.unique(video[0, ..., ch])) == 256 for ch in range(3))
    x = ((video.astype(np.float32) * np.float32(cfg.rescale_factor) - np.asarray(cfg.mean, np.float32))
         / np.asarray(cfg.std, np.float32)).transpose(0, 3, 1, 2)  # [T, C, H, W]
    if frames % 2:
        x = np.concatenate([x, x[-1:]])
    t, c, h, w = x.shape
    p, m = cfg.patch_size, cfg.merge_size
    x = x.reshape(t // 2, 2, c, h // p // m, m, p, w // p // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    expected = x.reshape(-1, c * 2 * p * p)
    got = pixel_rows(video[0] if frames == 1 else video, cfg)
    assert got.dtype == np.float32 and got.shape == (t // 2 * (h // p) * (w // p), 1176)
    np.testing.assert_array_equal(got, expected)
