"""Benchmark and evaluation media, made on the fly and cached (never committed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np


def image(path: Path, width: int, height: int) -> Path:
    """A structured colour image (gradients, shapes, text-like stripes)."""
    if path.exists():
        return path
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, ((x // 16 + y // 16) % 2) * 200], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for i in range(6):
        draw.rectangle([width * i // 7, height // 3, width * i // 7 + width // 12, height // 2], fill=(20 * i, 40, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def tone_speech(path: Path, seconds: float, rate: int = 16000) -> Path:
    """A speech-like signal (formant-ish harmonics with syllable envelope) of a given length."""
    if path.exists():
        return path
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.2 * wave).astype(np.float32), rate)
    return path


def espeak(path: Path, text: str) -> Path | None:
    """Speech with espeak-ng (22.05 kHz), or None when espeak-ng is not installed."""
    if path.exists():
        return path
    if not shutil.which("espeak-ng"):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def video(path: Path, seconds: float, fps: int = 10, size: tuple[int, int] = (640, 360),
          still: Path | None = None) -> Path:
    """An mp4 (OpenCV, mp4v) panning across a still image or a generated pattern."""
    if path.exists():
        return path
    import cv2

    w, h = size
    still = still if still is not None else image(path.with_suffix(".png"), w, h)
    frame = cv2.resize(cv2.imread(str(still), cv2.IMREAD_COLOR), (w, h))
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for i in range(int(seconds * fps)):
        writer.write(np.roll(frame, i * 4, axis=1))
    writer.release()
    return path
