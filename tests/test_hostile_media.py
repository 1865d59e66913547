"""Hostile media: every case is refused with an InputError that names the parameter, before work or memory
is spent on it, and nothing blocks (FIFOs), crashes or yields a non-finite feature.

All media are generated here in tmp dirs. "Before work" is checked by counting decoder calls (soundfile
reads, OpenCV frame reads), never by wall-clock time.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib

import numpy as np
import pytest

from omniguard_edge.runtime.errors import InputError
from omniguard_edge.runtime.preprocess import audio as audio_mod
from omniguard_edge.runtime.preprocess import video as video_mod
from omniguard_edge.runtime.preprocess.audio import AudioLimits, audio_features, load_audio
from omniguard_edge.runtime.preprocess.image import ImageLimits, image_pixels
from omniguard_edge.runtime.preprocess.video import VideoLimits, video_pixels

MEL = np.zeros((201, 128))


# -- generated media ---------------------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (crafted by hand: no pixels behind it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_video(path, frames: int, fps: float, size=(32, 32)) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for k in range(frames):
        writer.write(np.full((size[1], size[0], 3), (k * 7) % 255, np.uint8))
    writer.release()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("hostile")
    (d / "dir").mkdir()
    (d / "empty.bin").write_bytes(b"")
    (d / "garbage.bin").write_bytes(os.urandom(4096))
    (d / "text.txt").write_text("just some text, not media\n" * 20)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(d / "ok.png")
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(d / "ok.jpg")
    for name in ("ok.png", "ok.jpg"):
        data = (d / name).read_bytes()
        (d / f"trunc_{name}").write_bytes(data[: len(data) // 2])
    for w, h in [(100000, 100000), (12000, 9000), (20000, 20000), (5, 5), (8, 2000), (1, 100000), (0, 0)]:
        (d / f"claims_{w}x{h}.png").write_bytes(png_header(w, h))
    (d / "image.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n")
    (d / "image.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"/>')
    t = np.arange(16000) / 16000
    sf.write(d / "ok.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    (d / "wav_as.png").write_bytes((d / "ok.wav").read_bytes())
    (d / "trunc.wav").write_bytes((d / "ok.wav").read_bytes()[:44])
    sf.write(d / "huge_float.wav", np.full(44100, 3e38, np.float32), 44100, subtype="FLOAT")
    sf.write(d / "nan.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(d / "inf.wav", np.full(16000, np.inf, np.float32), 16000, subtype="FLOAT")
    sf.write(d / "rate_2000.wav", np.zeros(4000, np.int16), 2000, subtype="PCM_16")
    sf.write(d / "rate_400000.wav", np.zeros(400000, np.int16), 400000, subtype="PCM_16")
    sf.write(d / "channels_65.wav", np.zeros((1600, 65), np.int16), 16000, subtype="PCM_16")
    sf.write(d / "hour.flac", np.zeros(16000 * 3600, np.int16), 16000, subtype="PCM_16")  # ~180 kB
    flac = bytearray((d / "hour.flac").read_bytes())
    assert flac[:4] == b"fLaC"
    flac[21] &= 0xF0  # STREAMINFO total samples (36 bits) = 0: "unknown length"
    flac[22:26] = b"\0\0\0\0"
    (d / "hour_unknown.flac").write_bytes(bytes(flac))
    sf.write(d / "click.wav", np.zeros(100, np.float32), 16000)
    write_video(d / "ok.mp4", 12, 4.0, (64, 48))
    write_video(d / "long_700s.mp4", 700, 1.0)  # 700 frames of 32x32 at 1 fps: over the 600 s limit
    write_video(d / "tiny_6x6.mp4", 8, 4.0, (6, 6))  # under the 8 px minimum side, refused from the metadata
    write_video(d / "one_frame.mp4", 1, 4.0, (64, 48))
    write_video(d / "fps_1000.mp4", 20, 1000.0, (64, 48))
    ok = (d / "ok.mp4").read_bytes()
    (d / "trunc.mp4").write_bytes(ok[: len(ok) // 2])
    return d


# -- the suite -----------------------------------------------------------------------------------------------

def _call(kind, source, **kw):
    if kind == "image":
        return image_pixels(source, limits=kw.get("limits", ImageLimits()))
    if kind == "audio":
        return audio_features(source, MEL, kw.get("sample_rate"), kw.get("limits", AudioLimits()))
    return video_pixels(source, limits=kw.get("limits", VideoLimits()))


def _source_cases():
    """Sources that are not media, for every modality."""
    cases = []
    for kind in ("image", "audio", "video"):
        cases += [
            (kind, lambda d: "", kind), (kind, lambda d: "   ", kind), (kind, lambda d: str(d / "dir"), kind),
            (kind, lambda d: d / "dir", kind), (kind, lambda d: "/dev/null", kind), (kind, lambda d: "/dev/zero", kind),
            (kind, lambda d: "http://example.com/x", kind), (kind, lambda d: "https://example.com/x.png", kind),
            (kind, lambda d: "HTTPS://EXAMPLE.COM/X", kind), (kind, lambda d: "ftp://host/x", kind),
            (kind, lambda d: "data:image/png;base64,iVBORw0KGgo=", kind), (kind, lambda d: "file:///etc/passwd", kind),
            (kind, lambda d: "rtsp://cam/stream", kind), (kind, lambda d: str(d / "missing.bin"), kind),
            (kind, lambda d: str(d / "bad\0name"), kind), (kind, lambda d: d / "empty.bin", kind),
            (kind, lambda d: d / "garbage.bin", kind), (kind, lambda d: d / "text.txt", kind),
            (kind, lambda d: b"", kind), (kind, lambda d: bytearray(), kind), (kind, lambda d: os.urandom(300), kind),
            (kind, lambda d: memoryview(b"not media at all" * 10), kind), (kind, lambda d: io.BytesIO(b""), kind),
            (kind, lambda d: io.BytesIO(os.urandom(500)), kind), (kind, lambda d: io.StringIO("text"), kind),
            (kind, lambda d: open(d / "ok.png", "r"), kind), (kind, lambda d: open(d / "scratch.bin", "wb"), kind),
            (kind, lambda d: _closed(d), kind), (kind, lambda d: open("/dev/zero", "rb"), kind),
            (kind, lambda d: _pipe_reader(), kind), (kind, lambda d: None, kind), (kind, lambda d: 123, kind),
            (kind, lambda d: 1.5, kind), (kind, lambda d: [0, 1, 2], kind), (kind, lambda d: {"path": "x"}, kind),
            (kind, lambda d: True, kind), (kind, lambda d: object(), kind),
        ]
    return cases


def _closed(d):
    f = open(d / "ok.png", "rb")
    f.close()
    return f


def _pipe_reader():
    r, w = os.pipe()
    os.write(w, b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    os.close(w)
    return os.fdopen(r, "rb")


IMAGE_CASES = [
    ("image", lambda d: d / "trunc_ok.png", "image"), ("image", lambda d: d / "trunc_ok.jpg", "image"),
    ("image", lambda d: d / "wav_as.png", "image"), ("image", lambda d: d / "image.eps", "image"),
    ("image", lambda d: d / "image.svg", "image"),
] + [("image", (lambda n: lambda d: d / n)(f"claims_{w}x{h}.png"), "image")
     for w, h in [(100000, 100000), (12000, 9000), (20000, 20000), (5, 5), (8, 2000), (1, 100000), (0, 0)]] + [
    ("image", lambda d: png_header(100000, 100000), "image"),
    ("image", lambda d: io.BytesIO(png_header(100000, 100000)), "image"),
    ("image", lambda d: bytearray(png_header(12000, 9000)), "image"),
    ("image", lambda d: memoryview(png_header(3, 3000)), "image"),
    ("image", lambda d: np.zeros((64, 64, 3), np.float32), "image"),
    ("image", lambda d: np.zeros((64, 64, 3), np.uint16), "image"),
    ("image", lambda d: np.zeros((64, 64, 4), np.uint8), "image"),
    ("image", lambda d: np.zeros((64, 64, 1), np.uint8), "image"),
    ("image", lambda d: np.zeros(64, np.uint8), "image"),
    ("image", lambda d: np.zeros((2, 64, 64, 3), np.uint8), "image"),
    ("image", lambda d: np.zeros((0, 0, 3), np.uint8), "image"),
    ("image", lambda d: np.zeros((1, 1, 3), np.uint8), "image"),
    ("image", lambda d: np.zeros((7, 100, 3), np.uint8), "image"),
    ("image", lambda d: np.zeros((5, 5), np.uint8), "image"),
    ("image", lambda d: np.zeros((8, 2000, 3), np.uint8), "image"),
    ("image", lambda d: np.full((64, 64, 3), np.nan), "image"),
    # 108 M pixels that take no memory: refused from the shape
    ("image", lambda d: np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (12000, 9000, 3)), "image"),
    ("image", lambda d: np.broadcast_to(np.zeros((1, 1), np.uint8), (20000, 20000)), "image"),
]

AUDIO_CASES = [
    ("audio", lambda d: d / "trunc.wav", "audio"), ("audio", lambda d: d / "ok.png", "audio"),
    ("audio", lambda d: d / "huge_float.wav", "audio"),  # 3e38 at 44.1 kHz: NaN/inf after resampling
    ("audio", lambda d: d / "nan.wav", "audio"), ("audio", lambda d: d / "inf.wav", "audio"),
    ("audio", lambda d: d / "rate_2000.wav", "audio"), ("audio", lambda d: d / "rate_400000.wav", "audio"),
    ("audio", lambda d: d / "channels_65.wav", "audio"), ("audio", lambda d: d / "hour.flac", "audio"),
    ("audio", lambda d: d / "hour_unknown.flac", "audio"), ("audio", lambda d: d / "click.wav", "audio"),
    ("audio", lambda d: (d / "hour.flac").read_bytes(), "audio"),
    ("audio", lambda d: io.BytesIO((d / "huge_float.wav").read_bytes()), "audio"),
    ("audio", lambda d: open(d / "hour_unknown.flac", "rb"), "audio"),
    ("audio", lambda d: (d / "trunc.wav").read_bytes(), "audio"),
]
# (array, sample_rate, parameter the message must name)
AUDIO_ARRAYS = [
    (lambda: np.full(16000, 1e39), 16000, "audio"),  # float64 overflowing float32
    (lambda: np.full(44100, 3e38, np.float32), 44100, "audio"),  # finite, but not after resampling
    (lambda: np.full(16000, np.nan, np.float32), 16000, "audio"),
    (lambda: np.r_[np.zeros(15999, np.float32), np.inf], 16000, "audio"),
    (lambda: np.full(16000, -np.inf), 16000, "audio"),
    (lambda: np.zeros(16000, np.int16), 16000, "audio"),
    (lambda: np.zeros(16000, np.complex64), 16000, "audio"),
    (lambda: np.zeros(16000, bool), 16000, "audio"),
    (lambda: np.zeros((16000, 2), np.float32), 16000, "audio"),
    (lambda: np.zeros((1, 16000), np.float32), 16000, "audio"),
    (lambda: np.float32(0.5) * np.ones((), np.float32), 16000, "audio"),
    (lambda: np.zeros(0, np.float32), 16000, "audio"),
    (lambda: np.zeros(100, np.float32), 16000, "audio"),
    (lambda: np.broadcast_to(np.float32(0), (16000 * 301,)), 16000, "audio"),
    (lambda: np.broadcast_to(np.float32(0), (4000 * 325,)), 4000, "audio"),
    (lambda: np.zeros(300_000, np.float32), 1, "sample_rate"),  # 1.2 MB at 1 Hz: never 19 GB
    (lambda: np.zeros(16000, np.float32), None, "sample_rate"),
    (lambda: np.zeros(16000, np.float32), "16000", "sample_rate"),
    (lambda: np.zeros(16000, np.float32), True, "sample_rate"),
    (lambda: np.zeros(16000, np.float32), 16000.0, "sample_rate"),
    (lambda: np.zeros(16000, np.float32), np.float64(16000), "sample_rate"),
    (lambda: np.zeros(16000, np.float32), float("nan"), "sample_rate"),
    (lambda: np.zeros(16000, np.float32), 0, "sample_rate"),
    (lambda: np.zeros(16000, np.float32), -16000, "sample_rate"),
    (lambda: np.zeros(16000, np.float32), 3999, "sample_rate"),
    (lambda: np.zeros(16000, np.float32), 384001, "sample_rate"),
    (lambda: np.zeros(16000, np.float32), 10**12, "sample_rate"),
    (lambda: np.zeros(16000, np.float32), [16000], "sample_rate"),
]

VIDEO_FRAMES = lambda: np.zeros((8, 64, 64, 3), np.uint8)  # noqa: E731
VIDEO_CASES = [
    ("video", lambda d: d / "trunc.mp4", "video"), ("video", lambda d: d / "ok.png", "video"),
    ("video", lambda d: d / "ok.wav", "video"), ("video", lambda d: d / "long_700s.mp4", "video"),
    ("video", lambda d: d / "tiny_6x6.mp4", "video"), ("video", lambda d: d / "one_frame.mp4", "video"),
    ("video", lambda d: d / "fps_1000.mp4", "video"), ("video", lambda d: (d / "long_700s.mp4").read_bytes(), "video"),
    ("video", lambda d: io.BytesIO((d / "tiny_6x6.mp4").read_bytes()), "video"),
    ("video", lambda d: open(d / "long_700s.mp4", "rb"), "video"),
    ("video", lambda d: (d / "trunc.mp4").read_bytes(), "video"),
    ("video", lambda d: np.zeros((8, 64, 64, 3), np.uint8), "video"),  # no fps
    ("video", lambda d: (VIDEO_FRAMES(),), "video"), ("video", lambda d: (VIDEO_FRAMES(), 4.0, 1), "video"),
    ("video", lambda d: (list(VIDEO_FRAMES()), 4.0), "video"), ("video", lambda d: [VIDEO_FRAMES(), 4.0], "video"),
    ("video", lambda d: (VIDEO_FRAMES().astype(np.float32), 4.0), "video"),
    ("video", lambda d: (np.zeros((8, 64, 64), np.uint8), 4.0), "video"),
    ("video", lambda d: (np.zeros((8, 64, 64, 4), np.uint8), 4.0), "video"),
    ("video", lambda d: (np.zeros((1, 64, 64, 3), np.uint8), 4.0), "video"),
    ("video", lambda d: (np.zeros((0, 64, 64, 3), np.uint8), 4.0), "video"),
    ("video", lambda d: (np.zeros((8, 1, 1, 3), np.uint8), 4.0), "video"),
    ("video", lambda d: (np.zeros((8, 4, 64, 3), np.uint8), 4.0), "video"),
    ("video", lambda d: (np.zeros((8, 8, 2000, 3), np.uint8), 4.0), "video"),
    ("video", lambda d: (np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (1401, 32, 32, 3)), 2.0), "video"),
    ("video", lambda d: (np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (4, 9000, 9000, 3)), 2.0), "video"),
] + [("video", (lambda f: lambda d: (VIDEO_FRAMES(), f))(fps), "fps")
     for fps in (-25, 0, 0.0, float("inf"), float("-inf"), float("nan"), 1e300, 241, "25", True, False, None,
                 complex(4, 0), [4.0], np.float64("nan"), np.bool_(True))]

ALL = _source_cases() + IMAGE_CASES + AUDIO_CASES + VIDEO_CASES


@pytest.mark.parametrize("case", ALL, ids=[f"{c[0]}-{i}" for i, c in enumerate(ALL)])
def test_hostile_source_is_refused(case, hostile):
    kind, make, param = case
    source = make(hostile)
    try:
        with pytest.raises(InputError) as err:
            _call(kind, source, sample_rate=16000)
    finally:
        if hasattr(source, "close"):
            source.close()
    assert param in str(err.value), str(err.value)


@pytest.mark.parametrize("make,rate,param", AUDIO_ARRAYS, ids=[f"audio-array-{i}" for i in range(len(AUDIO_ARRAYS))])
def test_hostile_audio_array_is_refused(make, rate, param, monkeypatch):
    calls = []
    real = audio_mod.resample
    monkeypatch.setattr(audio_mod, "resample", lambda w, r: calls.append(len(w)) or real(w, r))
    with pytest.raises(InputError) as err:
        audio_features(make(), MEL, rate)
    assert param in str(err.value), str(err.value)
    assert all(n <= 16000 * 300 for n in calls), "resampled an array over the length limit"


def _outcome_on_fifo(kind: str, fifo, what: str):
    """Call the kind's preprocessing on `fifo` in a thread; its exception (or "returned"). A call still blocked
    after 30 s fails the test (the FIFO is opened for writing once so the reader and the process can end)."""
    outcome = {}

    def target():
        try:
            _call(kind, str(fifo), sample_rate=16000)
            outcome["result"] = "returned"
        except Exception as exc:  # noqa: BLE001 - the caller's assertions say which
            outcome["result"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(timeout=10)
        pytest.fail(f"{kind}: {what}")
    return outcome["result"]


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_fifo_never_blocks(kind, tmp_path):
    """A FIFO path is refused from os.stat, before open (which would block with no writer)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = _outcome_on_fifo(kind, fifo, "a FIFO blocked the call")
    assert isinstance(result, InputError) and kind in str(result)
    assert "FIFO" in str(result)


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_path_swapped_for_a_fifo_after_the_stat_is_refused(kind, tmp_path, monkeypatch):
    """The stat sees a regular file; by the time of the open it is a FIFO: the non-blocking open and fstat
    refuse it (a plain open() would block with no writer)."""
    from omniguard_edge.runtime.preprocess import source as source_mod

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    real = source_mod.check_path
    monkeypatch.setattr(source_mod, "check_path", lambda value, param: real(tmp_path / "fifo_check.bin", param)
                        and str(fifo))
    (tmp_path / "fifo_check.bin").write_bytes(b"regular")
    result = _outcome_on_fifo(kind, fifo, "a FIFO swapped in after the stat blocked the open")
    assert isinstance(result, InputError), result
    assert "not a regular file" in str(result) and kind in str(result)


def test_url_message_says_what_to_do():
    with pytest.raises(InputError, match="URLs are not supported: download the file and pass its path or bytes"):
        image_pixels("https://example.com/cat.png")


def test_png_bomb_refused_from_header(hostile, monkeypatch):
    """A 12000x9000 IHDR (108 M px, under Pillow's own bomb limit) is refused before any pixel is decoded."""
    from PIL import ImageFile

    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real(self))
    with pytest.raises(InputError, match="exceeds the limit of 100000000 source pixels"):
        image_pixels(hostile / "claims_12000x9000.png")
    assert loads == []


def test_audio_header_claiming_an_hour_is_refused_before_reading(hostile, monkeypatch):
    import soundfile as sf

    reads = []
    real = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    with pytest.raises(InputError, match="claims 3600.0 s"):
        audio_features(hostile / "hour.flac", MEL)
    assert reads == []


def test_audio_of_unknown_length_stops_at_the_limit(hostile, monkeypatch):
    """FLAC of an hour of silence whose header gives no length: read block by block, refused after at most
    max_seconds + one block, never decoded whole."""
    import soundfile as sf

    frames = []
    real = sf.SoundFile.read

    def counting(self, *a, **k):
        out = real(self, *a, **k)
        frames.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", counting)
    with pytest.raises(InputError, match="decoding stopped there"):
        audio_features(hostile / "hour_unknown.flac", MEL, limits=AudioLimits(max_seconds=20))
    assert 20 * 16000 < sum(frames) <= 21 * 16000


def test_wav_header_claiming_more_frames_than_present(hostile, tmp_path):
    """A data chunk claiming 10^9 frames over 1 s of samples: decoded as the 1 s that is there."""
    data = bytearray((hostile / "ok.wav").read_bytes())
    at = data.find(b"data")
    data[at + 4: at + 8] = struct.pack("<I", 10**9 * 4 % 2**32)
    wave = load_audio(bytes(data))
    assert len(wave) == 16000 and np.isfinite(wave).all()


def test_float64_overflow_is_caught_after_conversion():
    with pytest.raises(InputError, match="after conversion to float32"):
        load_audio(np.full(16000, 1e39), 16000)


def test_huge_float_file_is_refused_before_resampling(hostile):
    """3e38 in a float WAV would overflow to inf in the resampler; the range check refuses it first."""
    with pytest.raises(InputError, match=r"float samples must be in \[-1, 1\]"):
        audio_features(hostile / "huge_float.wav", MEL)


def test_good_sources_in_every_form(hostile):
    """The accepted forms decode to the same result: path, PathLike, bytes, bytearray, memoryview, BytesIO,
    an open 'rb' file; image arrays HxWx3 and HxW."""
    from PIL import Image

    ref_rows, ref_grid = image_pixels(str(hostile / "ok.png"))
    raw = (hostile / "ok.png").read_bytes()
    with open(hostile / "ok.png", "rb") as f:
        forms = [hostile / "ok.png", raw, bytearray(raw), memoryview(raw), io.BytesIO(raw), f,
                 np.asarray(Image.open(hostile / "ok.png").convert("RGB"))]
        for form in forms:
            rows, grid = image_pixels(form)
            assert grid == ref_grid and np.array_equal(rows, ref_rows), type(form)
    gray = np.asarray(Image.open(hostile / "ok.png").convert("L"))
    assert np.array_equal(image_pixels(gray)[0], image_pixels(np.repeat(gray[..., None], 3, -1))[0])

    ref = audio_features(hostile / "ok.wav", MEL)
    wav = (hostile / "ok.wav").read_bytes()
    with open(hostile / "ok.wav", "rb") as f:
        for form in [str(hostile / "ok.wav"), wav, io.BytesIO(wav), f]:
            assert np.array_equal(audio_features(form, MEL), ref)
    import soundfile as sf

    samples, rate = sf.read(hostile / "ok.wav", dtype="float32")
    assert np.array_equal(audio_features(samples, MEL, np.int32(rate)), ref)

    vref = video_pixels(hostile / "ok.mp4")
    vid = (hostile / "ok.mp4").read_bytes()
    with open(hostile / "ok.mp4", "rb") as f:
        for form in [str(hostile / "ok.mp4"), vid, io.BytesIO(vid), f]:
            rows, grid, seconds = video_pixels(form)
            assert grid == vref[1] and seconds == vref[2] and np.array_equal(rows, vref[0])


def test_streamed_resampling_equals_one_shot(hostile, tmp_path):
    """Block-wise soxr resampling of a file gives the samples of one soxr call on the whole clip."""
    import soundfile as sf
    import soxr

    rng = np.random.default_rng(1)
    clip = (0.2 * rng.standard_normal((44100 * 3 + 123, 2))).astype(np.float32)
    sf.write(tmp_path / "s.wav", clip, 44100, subtype="FLOAT")
    whole = soxr.resample(clip.mean(axis=1), 44100, 16000, quality="HQ")
    assert np.array_equal(load_audio(tmp_path / "s.wav"), whole.astype(np.float32))


class _CountingCapture:
    """Wraps cv2.VideoCapture: counts frames advanced (`reads`: grab or read), frames converted (`converted`:
    retrieve or read) and seeks (`seeks`: set), optionally reports a false frame count."""

    def __init__(self, cap, reads, frame_count=None, converted=None, seeks=None):
        self.cap, self.reads, self.frame_count = cap, reads, frame_count
        self.converted = converted if converted is not None else []
        self.seeks = seeks if seeks is not None else []

    def set(self, prop, value):
        self.seeks.append(value)
        return self.cap.set(prop, value)

    def get(self, prop):
        import cv2

        if prop == cv2.CAP_PROP_FRAME_COUNT and self.frame_count is not None:
            return self.frame_count
        return self.cap.get(prop)

    def read(self):
        self.reads.append(1)
        self.converted.append(1)
        return self.cap.read()

    def grab(self):
        self.reads.append(1)
        return self.cap.grab()

    def retrieve(self, *args):
        self.converted.append(1)
        return self.cap.retrieve(*args)

    def __getattr__(self, name):
        return getattr(self.cap, name)


def _patch_capture(monkeypatch, reads, frame_count=None, converted=None, seeks=None):
    real = video_mod.open_capture
    monkeypatch.setattr(video_mod, "open_capture",
                        lambda p: _CountingCapture(real(p), reads, frame_count, converted, seeks))


def _counted(source):
    """video_pixels through the counting pass only (every frame grabbed): the reference for the walk."""
    walk = video_mod._sampled_pass
    video_mod._sampled_pass = lambda *args: False
    try:
        return video_pixels(source)
    finally:
        video_mod._sampled_pass = walk


def test_long_video_refused_from_metadata(hostile, monkeypatch):
    reads = []
    _patch_capture(monkeypatch, reads)
    with pytest.raises(InputError, match="claims 700.0 s"):
        video_pixels(hostile / "long_700s.mp4")
    assert reads == []


@pytest.mark.parametrize("claimed", [0, -1, float("nan")])
def test_video_without_a_frame_count_stops_at_the_limit(claimed, hostile, monkeypatch):
    reads = []
    _patch_capture(monkeypatch, reads, claimed)
    with pytest.raises(InputError, match="decoding stopped there"):
        video_pixels(hostile / "long_700s.mp4")
    assert len(reads) == 601  # 600 s at 1 fps, plus the frame that crossed the limit


@pytest.mark.parametrize("claimed", [None, 0, 9, 30])
def test_wrong_frame_count_still_samples_like_the_truth(claimed, hostile, monkeypatch):
    """Metadata that lies about the count (or has none) costs a counting pass, never a different result: the true
    count (12) is walked in fewer grabs than its 12 frames + the end-of-stream read; any other count is found out
    (a seek past the real end, or a frame after the claimed end) and counted first."""
    truth = _counted(hostile / "ok.mp4")
    reads = []
    _patch_capture(monkeypatch, reads, claimed)
    rows, grid, seconds = video_pixels(hostile / "ok.mp4")
    assert grid == truth[1] and seconds == truth[2] and np.array_equal(rows, truth[0])
    assert len(reads) < 13 if claimed is None else len(reads) > 13


@pytest.fixture(scope="module")
def fast_clip(tmp_path_factory):
    """60 s at 240 fps, 32x32 frames: 14,400 frames of which 2 fps samples 120."""
    path = tmp_path_factory.mktemp("fast") / "fast_240fps.mp4"
    write_video(path, 14400, 240.0)
    return path, _counted(path)


@pytest.mark.parametrize("claimed", [None, 0, 7200, 20000])
def test_long_high_fps_clip_reads_only_its_sampled_frames(claimed, fast_clip, monkeypatch):
    """With its true frame count, a 60 s 240 fps clip (mp4v: every frame a keyframe) is walked: its 120 sampled
    frames grabbed and converted, seeks between them, frame 1 (a second keyframe: the interval) and one grab past
    the end, nothing else. A count that is missing, too low (later frames hidden from the sampling) or too high
    costs one counting pass that grabs every frame (14,400 and the end-of-stream read), then the walk; the result
    is always the counting pass's."""
    path, truth = fast_clip
    reads, converted, seeks = [], [], []
    _patch_capture(monkeypatch, reads, claimed, converted, seeks)
    rows, grid, seconds = video_pixels(path)
    assert grid == truth[1] == (60, 24, 24) and seconds == truth[2] and np.array_equal(rows, truth[0])
    walk = 120 + 2
    if claimed is None:
        assert len(reads) == walk and len(converted) == 120 and len(seeks) == 119
    else:
        assert 14401 + walk <= len(reads) <= 14401 + 2 * walk and len(converted) >= 121


VIDEO_CODECS = {  # name: (frames per second, ffmpeg's encoder arguments): inter-frame codecs with B-frames
    "h264-gop250.mp4": (30, ["-c:v", "libx264", "-bf", "3"]),
    "h264-gop12.mp4": (240, ["-c:v", "libx264", "-g", "12", "-bf", "2"]),
    "vp9-gop60.webm": (240, ["-c:v", "libvpx-vp9", "-g", "60", "-deadline", "realtime"]),
}


@pytest.mark.parametrize("name", list(VIDEO_CODECS))
def test_walk_equals_the_counting_pass_on_inter_frame_codecs(name, tmp_path, monkeypatch):
    """Seeks land on the frame asked for with B-frames and long keyframe intervals too: the walk's rows equal the
    counting pass's. A keyframe interval longer than the sampling stride (H.264's default 250 at 30 fps, 2 fps
    sampled) is walked by grabbing, never by seeking (a seek would decode up to the interval)."""
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (.ci/run installs it): no H.264 or VP9 encoder to make the clips")
    fps, args = VIDEO_CODECS[name]
    path = tmp_path / name
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size=64x48:rate={fps}:duration=10",
                    *args, "-pix_fmt", "yuv420p", str(path)], check=True, timeout=120)
    truth = _counted(path)
    reads, seeks = [], []
    _patch_capture(monkeypatch, reads, None, None, seeks)
    rows, grid, seconds = video_pixels(path)
    assert grid == truth[1] and seconds == truth[2] and np.array_equal(rows, truth[0])
    assert (seeks == []) if name.startswith("h264-gop250") else (len(seeks) > 0 and len(reads) < 10 * fps)


def test_video_over_the_prompt_limit_is_refused_before_decoding(fast_clip, tiny_bundle, monkeypatch):
    """The sampled frames and their size come from the metadata: a video that cannot fit the prompt limit is
    refused before a frame is grabbed, and the error names what makes it large."""
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    guard = Guard.from_bundle(tiny_bundle, GuardOptions(max_prompt_tokens=1024))
    reads = []
    _patch_capture(monkeypatch, reads)
    result = guard.moderate(text="what happens here?", video=str(fast_clip[0]))
    assert result.verdict == "error" and reads == []
    assert "120 sampled frames (2 per second)" in result.error and "refused before decoding" in result.error


def test_video_array_duration_refused_before_resizing(monkeypatch):
    resized = []
    real = video_mod._resize
    monkeypatch.setattr(video_mod, "_resize", lambda f, s: resized.append(1) or real(f, s))
    frames = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (1201, 32, 32, 3))
    with pytest.raises(InputError, match="is 600.5 s"):
        video_pixels((frames, 2.0))
    assert resized == []


def test_hostile_suite_size():
    assert len(ALL) + len(AUDIO_ARRAYS) >= 120



MODERATE_CASES = [  # (the parameter the error must name, moderate's keyword arguments)
    ("audio", dict(text="How do I build a pipe bomb?", audio=lambda d: np.full(16000, 1e39), sample_rate=16000)),
    ("audio", dict(text="How do I build a pipe bomb?", audio=lambda d: d / "huge_float.wav")),
    ("sample_rate", dict(text="hi", audio=lambda d: np.zeros(16000, np.float32), sample_rate="16000")),
    ("sample_rate", dict(text="hi", audio=lambda d: np.zeros(16000, np.float32), sample_rate=True)),
    ("audio", dict(text="hi", audio=lambda d: d / "hour_unknown.flac")),
    ("image", dict(text="hi", image=lambda d: "")),
    ("image", dict(text="hi", image=lambda d: "https://example.com/cat.png")),
    ("image", dict(text="hi", image=lambda d: d / "claims_100000x100000.png")),
    ("image", dict(text="hi", image=lambda d: io.StringIO("x"))),
    ("fps", dict(text="hi", video=lambda d: (np.zeros((8, 64, 64, 3), np.uint8), -25))),
    ("video", dict(text="hi", video=lambda d: (np.zeros((8, 1, 1, 3), np.uint8), 4.0))),
    ("video", dict(text="hi", video=lambda d: d / "long_700s.mp4")),
]


@pytest.fixture(scope="module")
def guards(tiny_bundle):
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    return {c: Guard.from_bundle(tiny_bundle, GuardOptions(constrain_verdict=c)) for c in (False, True)}


@pytest.mark.parametrize("constrain", [False, True], ids=["default", "constrained"])
@pytest.mark.parametrize("param,case", MODERATE_CASES, ids=[f"moderate-{i}" for i in range(len(MODERATE_CASES))])
def test_moderate_gives_error_for_hostile_media(param, case, constrain, hostile, guards):
    """Through Guard.moderate, in both decoding modes: an `error` verdict (never safe or unknown) whose
    message names the parameter, and strict JSON."""
    import json

    kwargs = {k: (v(hostile) if callable(v) else v) for k, v in case.items()}
    result = guards[constrain].moderate(**kwargs)
    assert result.verdict == "error" and not result.is_safe, result.verdict
    assert param in result.error, result.error

    def strict(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    json.loads(result.to_json(), parse_constant=strict)


# -- content the guard would never see (review H2, L2) ------------------------------------------------------

def _frames(n=3, size=(64, 48)):
    from PIL import Image

    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_multi_frame_images_are_refused(fmt, tmp_path):
    """Animated GIF/APNG/WebP and multi-page TIFF: only frame 0 would be judged; refused, pointing to video."""
    first, *rest = _frames()
    path = tmp_path / f"anim.{fmt.lower()}"
    first.save(path, format=fmt, save_all=True, append_images=rest, duration=100, loop=0)
    with pytest.raises(InputError, match=r"^image .*more than one frame.*as a video"):
        image_pixels(path)
    for source in (path.read_bytes(), io.BytesIO(path.read_bytes())):
        with pytest.raises(InputError, match="more than one frame"):
            image_pixels(source)
    first.save(tmp_path / f"still.{fmt.lower()}", format=fmt)  # one frame of the same format still works
    assert image_pixels(tmp_path / f"still.{fmt.lower()}")[1] == (1, 4, 4)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_gray_images_keep_their_content(mode, tmp_path):
    """16-bit, 32-bit int and float gray: rescaled to 8 bits by their range, not clipped to white/black."""
    from PIL import Image

    ramp = np.tile(np.linspace(0, 1, 112, dtype=np.float64), (84, 1))
    scale = {"I;16": 65535, "I": 1 << 20, "F": 1.0}[mode]
    data = (ramp * scale).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    img = Image.fromarray(data, mode) if mode != "I;16" else Image.fromarray(data)
    assert img.mode == mode
    path = tmp_path / ("g.png" if mode == "I;16" else "g.tiff")
    img.save(path)
    rows, grid = image_pixels(path)
    expected, grid8 = image_pixels(np.rint(ramp * 255).astype(np.uint8))  # the same ramp as an 8-bit image
    assert grid == grid8
    assert np.abs(rows - expected).max() <= 0.02  # 8-bit rounding of one grey level at most
    assert rows.std() > 0.5  # a full ramp, not one clipped colour


def test_eight_bit_modes_are_still_convert_rgb(tmp_path):
    """Parity: 8-bit modes go through convert('RGB') exactly as before."""
    from PIL import Image

    from omniguard_edge.runtime.preprocess.image import to_rgb

    rng = np.random.default_rng(2)
    for img in (Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)),
                Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert("P"),
                Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert("CMYK")):
        assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(img.convert("RGB")))


def test_float_image_with_nan_is_refused(tmp_path):
    from PIL import Image

    data = np.ones((40, 40), np.float32)
    data[3, 3] = np.nan
    Image.fromarray(data, "F").save(tmp_path / "nan.tiff")
    with pytest.raises(InputError, match="^image .*NaN"):
        image_pixels(tmp_path / "nan.tiff")


def test_stereo_channels_that_cancel_are_refused(tmp_path):
    """One channel inverted: the mono mix is silence; refused instead of judged as silence."""
    import soundfile as sf

    t = np.arange(16000) / 16000
    speech = 0.5 * np.sin(2 * np.pi * 300 * t) * np.sin(2 * np.pi * 3 * t)
    sf.write(tmp_path / "cancel.wav", np.stack([speech, -speech], 1), 16000, subtype="PCM_16")
    sf.write(tmp_path / "near.wav", np.stack([speech, -0.95 * speech], 1), 16000, subtype="PCM_16")
    sf.write(tmp_path / "ok.wav", np.stack([speech, 0.3 * speech], 1), 16000, subtype="PCM_16")
    sf.write(tmp_path / "one.wav", np.stack([speech, 0 * speech], 1), 16000, subtype="PCM_16")
    for name in ("cancel.wav", "near.wav"):
        with pytest.raises(InputError, match=r"^audio .*channels cancel each other in the mono mix"):
            load_audio(tmp_path / name)
    for name in ("ok.wav", "one.wav"):  # a quiet or silent second channel is fine
        assert np.abs(load_audio(tmp_path / name)).max() > 0.2


@pytest.mark.parametrize("peak", [32767.0, 1e30, 1.01, -2.0])
def test_audio_arrays_outside_unit_range_are_refused(peak):
    wave = np.zeros(16000, np.float32)
    wave[100] = peak
    with pytest.raises(InputError, match=r"^audio: .*float samples must be in \[-1, 1\]"):
        load_audio(wave, 16000)


def test_audio_rounding_overshoot_is_accepted():
    wave = np.zeros(16000, np.float32)
    wave[100], wave[200] = 1.0009, -1.0009
    assert len(load_audio(wave, 16000)) == 16000


def test_float_wav_outside_unit_range_is_refused(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "loud.wav", np.full(16000, 32767.0, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(InputError, match=r"float samples must be in \[-1, 1\]"):
        load_audio(tmp_path / "loud.wav")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_lowered_max_pixels_decodes_once_at_reduced_size(fmt, tmp_path, monkeypatch):
    """Review M1: with a lower max_pixels the target comes from the header and the image is converted at a
    reduced size, not at 4000x3000; the defaults still convert at full size (parity)."""
    from PIL import Image

    from omniguard_edge.runtime.preprocess import image as image_mod
    from omniguard_edge.runtime.preprocess.image import smart_resize

    y, x = np.mgrid[0:3000, 0:4000]
    Image.fromarray(np.stack([x % 251, y % 241, (x + y) % 239], -1).astype(np.uint8)).save(
        tmp_path / "big", format=fmt)
    seen = []
    real = image_mod.to_rgb
    monkeypatch.setattr(image_mod, "to_rgb", lambda img, *a: seen.append(img.size) or real(img, *a))
    limits = ImageLimits(max_pixels=256 * 28 * 28)
    rows, grid = image_pixels(tmp_path / "big", limits=limits)
    h, w = smart_resize(3000, 4000, 28, limits.min_pixels, limits.max_pixels)
    assert grid == (1, h // 14, w // 14) and rows.shape[0] == grid[1] * grid[2]
    assert seen[-1][0] * seen[-1][1] <= 4000 * 3000 // 4, seen
    assert seen[-1][0] >= 2 * w and seen[-1][1] >= 2 * h  # still at least twice the target per side
    image_pixels(tmp_path / "big")
    assert seen[-1] == (4000, 3000)
