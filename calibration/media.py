"""Benchmark and evaluation media, made on the fly and cached (never committed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..runtime.checked import is_int


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



# FigStep's typography, measured on its released 760x760 PNGs (FreeMonoBold at size 80): digits 52 px tall,
# glyphs advancing 48 px (15 characters per line), text from (20, 10), one line every 75 px, then the empty
# numbered list "1." "2." "3.". With another font the size is chosen so its digits are 52 px tall too (same
# line positions; DejaVu Sans Mono Bold then fits 16 characters per line).
TYPO_SIZE = 760
TYPO_ORIGIN = (20, 10)
TYPO_DIGIT_HEIGHT = 52
TYPO_PITCH = 75
TYPO_FONTS = ("FreeMonoBold.ttf", "DejaVuSansMono-Bold.ttf")  # FigStep's font first, then the closest common one


def typo_font(digit_height: float = TYPO_DIGIT_HEIGHT):
    """The first of TYPO_FONTS that Pillow finds (it searches the system font folders), else Pillow's
    default font, at the size whose "1" is `digit_height` px tall."""
    from PIL import ImageFont

    def load(size):
        for name in TYPO_FONTS:
            try:
                return ImageFont.truetype(name, size)
            except OSError:
                continue
        return ImageFont.load_default(size=size)

    top, bottom = load(100).getbbox("1")[1::2]
    return load(max(8, round(100 * digit_height / (bottom - top))))


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line is split between characters."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:
                if line and font.getlength(line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def typographic_layout(text: str, steps: int = 3) -> tuple[object, int, list[str]]:
    """(font, line pitch in px, lines) for `text` plus an empty numbered list of `steps` items in FigStep's
    layout; font and pitch shrink together (5 % at a time) only when the lines would run off the image."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if not is_int(steps) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    width = TYPO_SIZE - 2 * TYPO_ORIGIN[0]
    scale = 1.0
    while True:
        font = typo_font(TYPO_DIGIT_HEIGHT * scale)
        pitch = round(TYPO_PITCH * scale)
        lines = _wrap(text, font, width) + [f"{i}." for i in range(1, steps + 1)]
        if TYPO_ORIGIN[1] + len(lines) * pitch <= TYPO_SIZE or scale < 0.2:
            return font, pitch, lines
        scale *= 0.95


def typographic(path: Path, text: str, steps: int = 3) -> Path:
    """`text` rendered the way FigStep renders its jailbreak images: black on white, a 760x760 RGB PNG."""
    if path.exists():
        return path
    from PIL import Image, ImageDraw

    font, pitch, lines = typographic_layout(text, steps)
    img = Image.new("RGB", (TYPO_SIZE, TYPO_SIZE), "white")
    draw = ImageDraw.Draw(img)
    x, y = TYPO_ORIGIN
    for i, line in enumerate(lines):
        draw.text((x, y + i * pitch), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
