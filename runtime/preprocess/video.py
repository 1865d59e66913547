"""Video: decode with OpenCV, sample frames as qwen-omni-utils' fetch_video does (2 fps, an even
number of frames, 4..768), resize every frame to one smart-resized size, normalize and lay out in patches.

Difference from the reference, measured in tests/test_preprocess.py: the official path resizes with
torchvision's antialiased bicubic on float tensors; we resize with Pillow's bicubic on uint8 frames.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .image import MAX_RATIO, ImageConfig, pixel_rows, smart_resize

FRAME_FACTOR = 2  # frames come in pairs (temporal patch)


MAX_FPS = 240.0  # frame rates accepted, arrays and containers: (0, 240]
ARRAY_FORMS = "(frames, fps): an RGB uint8 array [T, H, W, 3] with its frame rate"


@dataclass(frozen=True)
class VideoLimits:
    """Sampling and pixel budgets; defaults are qwen-omni-utils' (VIDEO_MIN/MAX_TOKEN_NUM, FPS...)."""

    fps: float = 2.0  # frames sampled per second of video
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28  # per frame, after resizing
    max_pixels: int = 768 * 28 * 28  # per frame, after resizing
    total_pixels: float = 128000 * 28 * 28 * 0.9  # all frames together
    max_seconds: float = 600.0  # longer videos are refused (from the metadata, and the decode stops there)
    min_side: int = 8  # frames smaller than this are refused, as images are
    max_source_pixels: int = 7680 * 4320  # per decoded frame (8K UHD)
    max_bytes: int = 4 << 30  # bytes / file objects are copied to a temporary file: at most this much

    def __post_init__(self):
        if self.fps <= 0 or self.min_frames < FRAME_FACTOR or self.max_frames < self.min_frames:
            raise ValueError("VideoLimits needs fps > 0 and 2 <= min_frames <= max_frames")


def check_fps(fps, name: str = "fps") -> float:
    """A finite real number in (0, 240] (not a str or bool) -> float; anything else is an InputError."""
    if isinstance(fps, (bool, np.bool_)) or not isinstance(fps, numbers.Real):
        raise InputError(f"{name} must be a real number in (0, {MAX_FPS:g}] frames per second, "
                         f"got {type(fps).__name__} {fps!r:.40}")
    value = float(fps)
    if not math.isfinite(value) or not 0 < value <= MAX_FPS:
        raise InputError(f"{name} must be a finite number in (0, {MAX_FPS:g}] frames per second, got {value!r}")
    return value


def _floor(x: float, f: int) -> int:
    return math.floor(x / f) * f


def sample_count(total: int, video_fps: float, limits: VideoLimits) -> int:
    """Number of frames to sample (qwen-omni-utils' smart_nframes with `fps`)."""
    video_fps = check_fps(video_fps)
    if total < FRAME_FACTOR:
        raise InputError(f"video has {total} frames: at least {FRAME_FACTOR} are needed")
    min_frames = math.ceil(limits.min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = _floor(min(limits.max_frames, total), FRAME_FACTOR)
    n = total / video_fps * limits.fps
    n = _floor(min(min(max(n, min_frames), max_frames), total), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total:
        raise InputError(f"video has {total} frames: at least {FRAME_FACTOR} are needed")
    return n


def _check_frame_size(width: int, height: int, label: str, limits: VideoLimits) -> None:
    if min(width, height) < limits.min_side:
        raise InputError(f"{label}: frames of {width}x{height} are too small: each side needs >= {limits.min_side} px")
    if width * height > limits.max_source_pixels:
        raise InputError(f"{label}: frames of {width}x{height} exceed the limit of {limits.max_source_pixels} pixels "
                         f"(VideoLimits.max_source_pixels)")
    if max(width, height) / min(width, height) > MAX_RATIO:
        raise InputError(f"{label}: aspect ratio {max(width, height) / min(width, height):.0f} exceeds {MAX_RATIO}")


def _check_duration(total: int, fps: float, label: str, limits: VideoLimits, claimed: bool = False) -> None:
    if total / fps > limits.max_seconds:
        raise InputError(f"{label} {'claims' if claimed else 'is'} {total / fps:.1f} s: longer than the limit of "
                         f"{limits.max_seconds:g} s (VideoLimits.max_seconds)")


def open_capture(path: str):
    """cv2.VideoCapture on a checked path (one place, so tests can count what is decoded)."""
    import cv2

    # FFmpeg only (no image-sequence backend reading "%d" patterns), on an absolute path (no "proto:" prefix)
    return cv2.VideoCapture(os.path.abspath(path), cv2.CAP_FFMPEG)


class _Resized:
    """Keeps only the sampled frames, resized as soon as they are decoded (memory: the sampled output)."""

    def __init__(self, total: int, fps: float, width: int, height: int, cfg: ImageConfig, limits: VideoLimits):
        self.total, self.width, self.height = total, width, height
        self.n = sample_count(total, fps, limits)
        self.idx = np.round(np.linspace(0, total - 1, self.n)).astype(int)
        self.wanted = {}
        for k, i in enumerate(self.idx):
            self.wanted.setdefault(int(i), []).append(k)
        self.size = target_size(height, width, self.n, cfg, limits)
        self.frames = [None] * self.n

    def offer(self, i: int, rgb: np.ndarray) -> None:
        for k in self.wanted.get(i, ()):
            self.frames[k] = _resize(rgb, self.size)

    def grid(self, cfg: ImageConfig) -> tuple[int, int, int]:
        """The vision grid (t, h, w) in patches these frames will make."""
        return self.n // cfg.temporal_patch_size, self.size[0] // cfg.patch_size, self.size[1] // cfg.patch_size


def target_size(h: int, w: int, n: int, cfg: ImageConfig, limits: VideoLimits) -> tuple[int, int]:
    max_pixels = max(min(limits.max_pixels, limits.total_pixels / n * FRAME_FACTOR), int(limits.min_pixels * 1.05))
    return smart_resize(h, w, cfg.factor, limits.min_pixels, max_pixels)


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    rh, rw = size
    return np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.Resampling.BICUBIC))


class _Walker:
    """Moves through a capture to given frames, decoding as little as it can. Every frame is grabbed until two
    keyframes have been seen; after that a frame further ahead than the longest keyframe interval seen is reached
    by seeking (the decoder restarts at a keyframe past the current position), a nearer one by grabbing forward.
    A seek counts only if the capture reports the frame asked for; `ok` turns False on any inconsistency."""

    def __init__(self, cap):
        import cv2

        self.cap, self.pos, self.ok = cap, 0, True  # pos: the index of the frame the next grab returns
        self._type = getattr(cv2, "CAP_PROP_FRAME_TYPE", None)  # OpenCV >= 4.9; without it: never seek
        self._pos_prop = cv2.CAP_PROP_POS_FRAMES
        self._last_key, self.gap = None, None  # the longest keyframe interval seen

    def grab(self) -> bool:
        if not self.cap.grab():
            return False
        if self._type is not None and self.cap.get(self._type) == ord("I"):
            if self._last_key is not None:
                self.gap = max(self.gap or 0, self.pos - self._last_key)
            self._last_key = self.pos
        self.pos += 1
        return True

    def advance_to(self, i: int) -> bool:
        """Position so that the next grab returns frame i (i >= pos)."""
        while self.ok and self.pos < i:
            if self.gap is not None and i - self.pos > self.gap:
                self.ok = bool(self.cap.set(self._pos_prop, i)) and int(self.cap.get(self._pos_prop)) == i
                self.pos, self._last_key = i, None  # the keyframes skipped over are not seen
            elif not self.grab():
                self.ok = False
        return self.ok


def _sampled_pass(cap, keep: "_Resized", label: str, limits: VideoLimits) -> bool:
    """Reads only the planned frames (see _Walker), then checks that nothing follows the claimed last frame. False
    when the container does not hold exactly what it claims (a frame missing, a seek off, a frame of another size,
    frames past the claimed count: a container hiding later frames from the sampling): the caller then counts."""
    import cv2

    walk = _Walker(cap)
    for i in sorted(keep.wanted):
        if not walk.advance_to(i) or not walk.grab():
            return False
        ok, frame = cap.retrieve()
        if not ok or frame is None or frame.ndim != 3 or frame.shape[2] != 3:
            return False
        if i == 0:
            _check_frame_size(frame.shape[1], frame.shape[0], label, limits)
        if frame.shape[:2] != (keep.height, keep.width):
            return False
        keep.offer(i, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return walk.advance_to(keep.total) and not walk.grab()


def _decode(path: str, label: str, cfg: ImageConfig, limits: VideoLimits, claimed: int | None, check=None):
    """Sample the video for a frame count of `claimed` (else the container's). With a count, the sampling is planned
    before any frame is decoded (`check(grid)` may refuse it there) and only the sampled frames are read
    (_sampled_pass); otherwise, or when the container turns out not to hold what it claims, one streaming pass
    grabs every frame (demuxed and decoded, as inter-frame codecs need), counts them (stopping past the duration
    limit), and converts and resizes only the sampled ones. -> (frames counted, fps, the _Resized or None)."""
    import cv2

    cap = open_capture(path)
    try:
        if not cap.isOpened():
            raise InputError(f"{label}: cannot decode the video (mp4, webm and avi are supported)")
        raw_fps = cap.get(cv2.CAP_PROP_FPS)
        try:
            fps = check_fps(raw_fps, f"{label}: the container's frame rate")
        except InputError as exc:
            raise InputError(f"{exc} (the container reports {raw_fps!r})") from exc
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width > 0 and height > 0:
            _check_frame_size(width, height, label, limits)  # from the metadata, before decoding
        if claimed is None:
            meta = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            if math.isfinite(meta) and meta > 0:
                _check_duration(meta, fps, label, limits, claimed=True)  # refused before decoding
                claimed = int(meta)

        def planned(w: int, h: int) -> _Resized:
            """The sampling of `claimed` frames of w x h, checked against the caller's limits (before decoding)."""
            plan = _Resized(claimed, fps, w, h, cfg, limits)
            if check is not None:
                check(plan.grid(cfg))
            return plan

        sampled = claimed is not None and claimed >= FRAME_FACTOR
        keep = planned(width, height) if sampled and width > 0 and height > 0 else None
        if keep is not None:
            if _sampled_pass(cap, keep, label, limits):
                return claimed, fps, keep
            cap.release()
            cap = open_capture(path)
            keep = planned(width, height)
        max_total = math.floor(limits.max_seconds * fps)
        count = 0
        while cap.grab():
            wanted = keep is not None and count in keep.wanted
            if count == 0 or wanted:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                if count == 0:
                    if frame.ndim != 3 or frame.shape[2] != 3:
                        raise InputError(f"{label}: decoded frames have shape {frame.shape}, not [H, W, 3]")
                    _check_frame_size(frame.shape[1], frame.shape[0], label, limits)
                    size = (frame.shape[1], frame.shape[0])
                    if sampled and size != (width, height):
                        keep = planned(*size)  # no or wrong size metadata
                        wanted = 0 in keep.wanted
                if wanted:
                    keep.offer(count, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            count += 1
            if count > max_total:  # the metadata lied or had no count: stop at the limit
                raise InputError(f"{label} is longer than the limit of {limits.max_seconds:g} s "
                                 f"(VideoLimits.max_seconds); decoding stopped there")
        return count, fps, keep
    finally:
        cap.release()


def container(head: bytes) -> str | None:
    """The container named by a file's first bytes, if it is one we accept (mp4/mov, webm/mkv, avi)."""
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def _read_file(source, cfg: ImageConfig, limits: VideoLimits, check=None):
    """Path, bytes or binary file object -> (resized sampled RGB frames, n, total frames, fps)."""
    from .source import copy_to, media_source

    src = media_source(source, "video", ARRAY_FORMS)
    tmp = None
    try:
        if src.path is not None:
            path = src.path
        else:
            if src.data is not None and len(src.data) > limits.max_bytes:
                raise InputError(f"{src.label}: larger than the limit of {limits.max_bytes} bytes "
                                 f"(VideoLimits.max_bytes)")
            fd, tmp = tempfile.mkstemp(suffix=".video")
            with os.fdopen(fd, "wb") as f:
                if src.data is not None:
                    f.write(src.data)
                else:
                    copy_to(src.file, f, limits.max_bytes, src.label)
            path = tmp
        # FFmpeg would also read text (tty), playlists (m3u8: more files) ...: check the container first, on a
        # descriptor opened non-blocking and fstat'ed (a path swapped for a FIFO after the stat is still refused)
        with (src.open() if tmp is None else open(path, "rb")) as f:
            head = f.read(12)
        if container(head) is None:
            raise InputError(f"{src.label}: cannot decode the video: not an mp4/mov, webm/mkv or avi container")
        count, fps, keep = _decode(path, src.label, cfg, limits, None, check)
        if count == 0:
            raise InputError(f"{src.label}: cannot decode any frame (mp4, webm and avi are supported)")
        if count < FRAME_FACTOR:
            raise InputError(f"{src.label} has {count} frame: at least {FRAME_FACTOR} are needed")
        if keep is None or keep.total != count:
            # the metadata's frame count was wrong or missing: a second pass with the counted one
            count2, fps, keep = _decode(path, src.label, cfg, limits, count, check)
            if keep is None or count2 != count:
                raise InputError(f"{src.label}: two decodes gave {count} and {count2} frames; cannot sample it")
        if any(f is None for f in keep.frames):
            raise InputError(f"{src.label}: the sampled frames could not all be decoded")
        return keep.frames, keep.n, count, fps
    finally:
        if tmp:
            os.unlink(tmp)


def _from_array(source, cfg: ImageConfig, limits: VideoLimits, check=None):
    arr, fps = source
    if not isinstance(arr, np.ndarray):
        raise InputError(f"video: {ARRAY_FORMS}; the frames are a {type(arr).__name__}, not a numpy array")
    fps = check_fps(fps)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise InputError(f"video arrays must be RGB uint8 [T, H, W, 3], got {arr.dtype} {arr.shape}")
    total = arr.shape[0]
    _check_duration(total, fps, "video", limits)
    if total < FRAME_FACTOR:
        raise InputError(f"video has {total} frames: at least {FRAME_FACTOR} are needed")
    _check_frame_size(arr.shape[2], arr.shape[1], "video", limits)
    keep = _Resized(total, fps, arr.shape[2], arr.shape[1], cfg, limits)  # the sampling the decoder path uses
    if check is not None:
        check(keep.grid(cfg))
    for i in keep.wanted:
        keep.offer(i, np.ascontiguousarray(arr[i]))
    return keep.frames, keep.n, total, fps


def video_pixels(source, cfg: ImageConfig = ImageConfig(), limits: VideoLimits = VideoLimits(), check=None):
    """A path, bytes, a binary file object, or (RGB uint8 [T, H, W, 3] array, fps)
    -> (rows, grid (t, h, w), seconds per grid).

    Before decoding: fps, frame size and the claimed duration from the container's metadata, and from them the
    sampled frames and their size: `check(grid)` (the caller's limits: prompt tokens) may refuse the video there,
    before a frame is decoded. Then only the sampled frames are read (seeking where keyframes allow) and resized. A
    container without a frame count, or whose count or frames turn out not to be what it claims, costs a counting
    pass first (every frame grabbed, stopping at the duration limit); the result is the same either way.
    """
    if isinstance(source, tuple):
        if len(source) != 2:
            raise InputError(f"video: {ARRAY_FORMS}; got a tuple of {len(source)} items")
        frames, n, total, fps = _from_array(source, cfg, limits, check)
    elif isinstance(source, np.ndarray):
        raise InputError("video: a video array needs its frame rate: pass (frames, fps)")
    else:
        frames, n, total, fps = _read_file(source, cfg, limits, check)
    sample_fps = n / total * fps
    rows = pixel_rows(np.stack(frames), cfg)
    if not np.isfinite(rows).all():
        raise InputError("video: preprocessing produced non-finite pixel values (check image_std in the bundle)")
    rh, rw = frames[0].shape[:2]
    grid = (n // cfg.temporal_patch_size, rh // cfg.patch_size, rw // cfg.patch_size)
    return rows, grid, cfg.temporal_patch_size / sample_fps
