"""Images: decode, RGB, smart resize (qwen-omni-utils' fetch_image), then the PIL Qwen2-VL image
processor's rescale, normalize and patchify, in numpy. Pillow decodes and resizes: its bicubic filter
is the reference's, so pixel values match it exactly."""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

MAX_RATIO = 200  # qwen-omni-utils refuses more extreme aspect ratios


@dataclass(frozen=True)
class ImageLimits:
    """Pixel budgets. Defaults are the official ones (4..16384 visual tokens per image)."""

    min_pixels: int = 4 * 28 * 28  # after resizing
    max_pixels: int = 16384 * 28 * 28  # after resizing; lower it to bound vision cost (e.g. 1280*28*28)
    min_side: int = 8  # smaller sources (1x1, 2x300 ...) are refused: nothing a guard could judge
    max_source_pixels: int = 100_000_000  # decoded size limit (decompression bombs)

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError("ImageLimits needs 0 < min_pixels <= max_pixels")


@dataclass(frozen=True)
class ImageConfig:
    """Processor constants, read from the bundle's preprocessor_config.json."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    processor_min_pixels: int = 3136
    processor_max_pixels: int = 12845056

    @classmethod
    def from_preprocess(cls, pre: dict) -> ImageConfig:
        return cls(patch_size=pre.get("patch_size", 14), merge_size=pre.get("merge_size", 2),
                   temporal_patch_size=pre.get("temporal_patch_size", 2),
                   mean=tuple(pre.get("image_mean", cls.mean)), std=tuple(pre.get("image_std", cls.std)),
                   rescale_factor=pre.get("rescale_factor", 1 / 255),
                   processor_min_pixels=pre.get("min_pixels", 3136), processor_max_pixels=pre.get("max_pixels", 12845056))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Sides divisible by `factor`, area within [min_pixels, max_pixels], aspect ratio kept (official rule)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"image aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16/32-bit integer and float gray


def _high_bit_to_l(img, label: str = "image"):
    """A 16/32-bit integer or float gray image -> 8-bit 'L', rescaled by its real range (min..max).

    convert('RGB') would clip these (16-bit PNG -> all white above 255, float in [0, 1] -> all black): content
    the guard never sees. A constant image becomes black."""
    from PIL import Image

    x = np.array(img, dtype=np.float32)  # a writable copy
    if not np.isfinite(x).all():
        raise InputError(f"{label}: the float image has NaN or infinite pixels")
    lo, hi = float(x.min()), float(x.max())
    if hi > lo:
        x -= lo
        x *= np.float32(255.0 / (hi - lo))
        np.rint(x, out=x)
        out = x.astype(np.uint8)
    else:
        out = np.zeros(x.shape, np.uint8)
    return Image.fromarray(out, "L")


def to_rgb(img, label: str = "image"):
    """RGBA over white; 16/32-bit integer and float gray rescaled to 8 bits by their range (not clipped);
    everything else PIL's convert('RGB') (as qwen-omni-utils does)."""
    from PIL import Image

    if img.mode in HIGH_BIT_MODES:
        return _high_bit_to_l(img, label).convert("RGB")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.split()[3])
        return background
    return img.convert("RGB")


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # decoders that are tried (no EPS/Ghostscript)
ARRAY_FORMS = "a uint8 array [H, W, 3] (RGB) or [H, W] (gray)"


def check_size(width: int, height: int, label: str, limits: ImageLimits) -> None:
    """Source size checks, run on the header (files) or the shape (arrays) before any pixel is decoded."""
    if width * height > limits.max_source_pixels:
        raise InputError(f"{label}: {width}x{height} exceeds the limit of {limits.max_source_pixels} source pixels "
                         f"(ImageLimits.max_source_pixels)")
    if min(width, height) < limits.min_side:
        raise InputError(f"{label}: {width}x{height} is too small: each side needs >= {limits.min_side} px")
    if max(width, height) / min(width, height) > MAX_RATIO:
        raise InputError(f"{label}: aspect ratio {max(width, height) / min(width, height):.0f} exceeds {MAX_RATIO}")


def _shrink(img, target: tuple[int, int]):
    """Decode at reduced size for a target far below the source (JPEG: draft, i.e. DCT scaling; others: an
    integer box reduce right after decoding), keeping at least twice the target per side for the bicubic
    resize that follows. Only used when the caller lowered max_pixels (parity holds for the defaults)."""
    h, w = target
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        img.draft(img.mode, (2 * w, 2 * h))  # decodes at 1/2, 1/4 or 1/8 scale, never below the request
    img.load()
    factor = min(img.width // (2 * w), img.height // (2 * h))
    if factor >= 2:
        try:
            img = img.reduce(factor)
        except ValueError:  # modes without reduce (P, I;16 ...): converted at full size as before
            pass
    return img


def open_image(source, limits: ImageLimits = ImageLimits(), target=None):
    """A path, bytes, a binary file object, or a uint8 [H, W, 3] / [H, W] array -> RGB PIL image.

    Size, minimum side and aspect ratio are checked from the header (Pillow's lazy open) before decoding.
    `target(height, width) -> (h, w)`, when given, is the size the caller will resize to, computed from the
    header: the image is then decoded once at a reduced size (see _shrink) before it is converted.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    from .source import media_source

    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] != 3):
            raise InputError(f"image arrays must be {ARRAY_FORMS}, got {source.dtype} {source.shape}")
        check_size(source.shape[1], source.shape[0], "image array", limits)
        if source.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(source), "L").convert("RGB")
        return Image.fromarray(np.ascontiguousarray(source), "RGB")
    src = media_source(source, "image", ARRAY_FORMS)
    stream = src.open()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            try:
                Image.init()  # registers every plugin; `formats` then limits which decoders are tried
                img = Image.open(stream, formats=IMAGE_FORMATS)
            except Image.DecompressionBombError as exc:
                raise InputError(f"{src.label}: the header claims more than the limit of {limits.max_source_pixels} "
                                 f"source pixels ({exc})") from exc
            check_size(img.width, img.height, src.label, limits)
            animated = getattr(img, "is_animated", None)  # cheap (GIF: looks for a 2nd frame, not all of them)
            if animated is None:
                animated = getattr(img, "n_frames", 1) > 1
            if animated:
                raise InputError(f"{src.label}: has more than one frame (animated GIF/PNG/WebP or multi-page TIFF); "
                                 f"only the first would be judged: pass the frames as a video ((frames, fps) "
                                 f"array) or each frame as its own image")
            if target is not None:
                img = _shrink(img, target(img.height, img.width))
            img.load()
        return to_rgb(img, src.label)
    except InputError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
            KeyError, TypeError, ZeroDivisionError, MemoryError) as exc:
        raise InputError(f"{src.label}: cannot decode image ({type(exc).__name__}: {exc}); png, jpeg, webp, gif, "
                         f"bmp and tiff are supported") from exc
    finally:
        if src.file is None:
            stream.close()


@functools.lru_cache(maxsize=8)
def _normalize_table(rescale: float, mean: tuple, std: tuple) -> np.ndarray:
    """[3 * 256] float32: each uint8 value of each channel rescaled and normalized, by the same float32 operations
    as the PIL image processor's (so a lookup gives the same bits)."""
    x = np.arange(256, dtype=np.float32)[:, None] * np.float32(rescale)
    return np.ascontiguousarray(((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).T).reshape(-1)


def pixel_rows(frames: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """RGB uint8 [T, H, W, 3] (or [H, W, 3]) -> rows [grid_t*grid_h*grid_w, C*tp*P*P] float32 in merge-block order,
    rescaled and normalized as the PIL image processor does. The patch layout is built on the uint8 values (a
    quarter of the bytes to move) and each value then looked up in a per-channel table: the processor's bits."""
    x = frames[None] if frames.ndim == 3 else frames
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if x.shape[0] % tp:  # repeat the last frame to fill the temporal patch
        x = np.concatenate([x, np.repeat(x[-1:], tp - x.shape[0] % tp, 0)])
    t, h, w, c = x.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    index = np.ascontiguousarray(x, dtype=np.uint16).reshape(gt * gh * gw, c, tp * p * p)
    index += (np.arange(c, dtype=np.uint16) * 256)[:, None]  # channel k's values at k * 256 in the table
    table = _normalize_table(float(cfg.rescale_factor), tuple(cfg.mean), tuple(cfg.std))
    return np.take(table, index, mode="clip").reshape(gt * gh * gw, c * tp * p * p)


def image_pixels(source, cfg: ImageConfig = ImageConfig(), limits: ImageLimits = ImageLimits(),
                 info: dict | None = None):
    """-> (pixel rows [patches, C*T*P*P] float32, grid (1, h, w) in patches). `info`, when given, receives
    "source_size": the source's (height, width) as its header states it (before any reduced decode)."""
    from PIL import Image

    header = {}

    def target(height, width):  # the resize target, from the header's size
        header["source"] = (height, width)
        header["size"] = smart_resize(height, width, cfg.factor, limits.min_pixels, limits.max_pixels)
        return header["size"]

    lowered = limits.max_pixels < ImageLimits.max_pixels  # below the official default: parity is not at stake
    img = open_image(source, limits, target if lowered and not isinstance(source, np.ndarray) else None)
    if info is not None:
        info["source_size"] = header.get("source", (img.height, img.width))
    h, w = header.get("size") or smart_resize(img.height, img.width, cfg.factor, limits.min_pixels,
                                               limits.max_pixels)
    img = img.resize((w, h), Image.Resampling.BICUBIC)  # fetch_image's resize
    # The processor resizes again to its own budget; a no-op unless its limits are tighter.
    h2, w2 = smart_resize(h, w, cfg.factor, cfg.processor_min_pixels, cfg.processor_max_pixels)
    if (h2, w2) != (h, w):
        img = img.resize((w2, h2), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    rows = pixel_rows(arr, cfg)
    if not np.isfinite(rows).all():  # only a bundle with a zero std could do this: never feed it to a graph
        raise InputError("image: preprocessing produced non-finite pixel values (check image_std in the bundle)")
    return rows, (1, arr.shape[0] // cfg.patch_size, arr.shape[1] // cfg.patch_size)
