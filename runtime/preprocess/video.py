"""Video: decode with OpenCV, sample frames as qwen-omni-utils' fetch_video does (2 fps, an even
number of frames, 4..768), resize every frame to one smart-resized size, normalize, patchify.

Difference from the reference, measured in tests/test_preprocess.py: the official path resizes with
torchvision's antialiased bicubic on float tensors; we resize with Pillow's bicubic on uint8 frames.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .image import ImageConfig, normalize, patchify, smart_resize

FRAME_FACTOR = 2  # frames come in pairs (temporal patch)


@dataclass(frozen=True)
class VideoLimits:
    """Sampling and pixel budgets; defaults are qwen-omni-utils' (VIDEO_MIN/MAX_TOKEN_NUM, FPS...)."""

    fps: float = 2.0  # frames sampled per second of video
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28  # per frame, after resizing
    max_pixels: int = 768 * 28 * 28  # per frame, after resizing
    total_pixels: float = 128000 * 28 * 28 * 0.9  # all frames together
    max_seconds: float = 600.0  # longer videos are refused

    def __post_init__(self):
        if self.fps <= 0 or self.min_frames < FRAME_FACTOR or self.max_frames < self.min_frames:
            raise ValueError("VideoLimits needs fps > 0 and 2 <= min_frames <= max_frames")


def _floor(x: float, f: int) -> int:
    return math.floor(x / f) * f


def sample_count(total: int, video_fps: float, limits: VideoLimits) -> int:
    """Number of frames to sample (qwen-omni-utils' smart_nframes with `fps`)."""
    min_frames = math.ceil(limits.min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = _floor(min(limits.max_frames, total), FRAME_FACTOR)
    n = total / video_fps * limits.fps
    n = _floor(min(min(max(n, min_frames), max_frames), total), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total:
        raise InputError(f"video has {total} frames: at least {FRAME_FACTOR} are needed")
    return n


def read_frames(source) -> tuple[list[np.ndarray], float]:
    """All frames as RGB uint8 [H, W, 3] and the container's fps. Accepts a path or bytes."""
    import cv2

    tmp = None
    if isinstance(source, (bytes, bytearray)):
        fd, tmp = tempfile.mkstemp(suffix=".video")
        with os.fdopen(fd, "wb") as f:
            f.write(source)
        path = tmp
    else:
        path = str(Path(source))
        if not Path(path).is_file():
            raise InputError(f"{path}: no such video file")
    try:
        cap = cv2.VideoCapture(path)
        fps = cap.get(cv2.CAP_PROP_FPS)
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        cap.release()
    finally:
        if tmp:
            os.unlink(tmp)
    if not frames:
        raise InputError(f"{'video bytes' if tmp else path}: cannot decode any frame (mp4, webm and avi are supported)")
    if not fps or fps <= 0 or not math.isfinite(fps):
        raise InputError(f"{'video bytes' if tmp else path}: the container reports no frame rate")
    return frames, float(fps)


def video_pixels(source, cfg: ImageConfig = ImageConfig(), limits: VideoLimits = VideoLimits()):
    """A path, bytes, or (RGB uint8 [T, H, W, 3] array, fps) -> (rows, grid (t, h, w), seconds per grid)."""
    from PIL import Image

    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        arr, fps = source
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
            raise InputError(f"video arrays must be RGB uint8 [T, H, W, 3], got {arr.dtype} {arr.shape}")
        frames, fps = list(arr), float(fps)
    elif isinstance(source, np.ndarray):
        raise InputError("a video array needs its frame rate: pass (frames, fps)")
    else:
        frames, fps = read_frames(source)
    total = len(frames)
    if total / fps > limits.max_seconds:
        raise InputError(f"video of {total / fps:.0f} s exceeds the limit of {limits.max_seconds:.0f} s")
    n = sample_count(total, fps, limits)
    idx = np.round(np.linspace(0, total - 1, n)).astype(int)
    sample_fps = n / max(total, 1e-6) * fps
    h, w = frames[0].shape[:2]
    max_pixels = max(min(limits.max_pixels, limits.total_pixels / n * FRAME_FACTOR), int(limits.min_pixels * 1.05))
    rh, rw = smart_resize(h, w, cfg.factor, limits.min_pixels, max_pixels)
    chw = [normalize(np.asarray(Image.fromarray(frames[i]).resize((rw, rh), Image.Resampling.BICUBIC)), cfg) for i in idx]
    rows = patchify(np.stack(chw), cfg)
    grid = (n // cfg.temporal_patch_size, rh // cfg.patch_size, rw // cfg.patch_size)
    return rows, grid, cfg.temporal_patch_size / sample_fps
