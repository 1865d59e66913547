"""Memory budget: estimate a request's peak working memory from the manifest's geometry and the request's
sizes, and plan it to fit (chunked prefill, a vision pixel cap) or refuse it up front.

The graphs materialise their attention as plain MatMul/Softmax (docs/design.md "The graphs"): the decoder's scores are
[heads, seq, past+seq]; the vision encoder's are [windows, heads, 64, 64] in the windowed blocks and
[frames, chunk heads, frame, frame] in the full-attention ones (padded batches, export/graphs/vision.py), or, in
bundles exported before those, [heads, patches, patches] in every block plus two [patches, patches] bias
matrices. Those dominate. The
estimate adds up, in float32 bytes, what one graph run holds at its peak; the coefficients were calibrated by
measuring peak RSS deltas on the `tiny` bundle (docs/performance.md "Memory"). It is an upper-bound-leaning estimate, not a
promise of the allocator's behaviour: `ALLOCATOR_SLACK` covers heap fragmentation measured there.

Figures are "working memory beyond the loaded bundle": weights, the embedding table and the tokenizer are not
counted (they are there before any request).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .checked import is_int
from .errors import InputError, MemoryBudgetError  # noqa: F401 (re-exported: callers catch it here too)
from .positions.vision import window_side

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_BUDGET_BYTES = 4 * GiB
# glibc serves blocks under its (dynamic, at most 32 MiB) mmap threshold from the heap, which fragments: on
# `tiny`, runs whose buffers stayed under it peaked up to ~150 MiB above the sum of their tensors.
ALLOCATOR_SLACK = 256 * MiB
DEFAULT_MAX_CHUNK = 2048  # prompts up to this many tokens are prefilled in one run (as before chunking existed)
MIN_CHUNK = 16  # smaller chunks only multiply graph runs; a request that needs less is refused
F32 = 4


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


_UNITS = {"": 1, "b": 1, "k": KiB, "kb": 1000, "kib": KiB, "m": MiB, "mb": 1000**2, "mib": MiB,
          "g": GiB, "gb": 1000**3, "gib": GiB, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'4GiB', '512 MiB', '6G' (binary), '6GB' (decimal), '1073741824' -> bytes (InputError otherwise)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"memory budget {text!r}: give a size such as '4GiB', '512MiB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class MemoryBudget:
    """Working memory one request may use beyond the loaded bundle (default 4 GiB; set it per device).

    image_policy: "downscale" (default: an image or video too large for the vision encoder's budget is
    resized to fit and the result says so) or "refuse" (MemoryBudgetError instead)."""

    bytes: int = DEFAULT_BUDGET_BYTES
    image_policy: str = "downscale"
    max_chunk: int = DEFAULT_MAX_CHUNK  # largest prefill chunk in tokens (a prompt up to it runs in one shot)

    def __post_init__(self):
        if not is_int(self.bytes) or self.bytes <= ALLOCATOR_SLACK:
            raise ValueError(f"MemoryBudget.bytes must be an int above {ALLOCATOR_SLACK} (the allocator slack), "
                             f"not {self.bytes!r}; e.g. MemoryBudget(4 << 30) or MemoryBudget(parse_bytes('4GiB'))")
        if self.image_policy not in ("downscale", "refuse"):
            raise ValueError(f"MemoryBudget.image_policy must be 'downscale' or 'refuse', not {self.image_policy!r}")
        if not is_int(self.max_chunk) or self.max_chunk < MIN_CHUNK:
            raise ValueError(f"MemoryBudget.max_chunk must be an int >= {MIN_CHUNK}, not {self.max_chunk!r}")


@dataclass(frozen=True)
class Geometry:
    """What the estimate needs from a bundle. Fields a manifest does not carry (older exports) fall back to
    Qwen2.5-Omni's ratios: decoder FFN 6 x hidden, vision/audio FFN 4 x width, vision head_dim 80 and audio
    head_dim 64 when the width divides, else 16 (test profiles). Each fallback over- rather than underestimates."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    ffn: int
    vision_depth: int = 0
    vision_width: int = 0
    vision_heads: int = 0
    vision_ffn: int = 0
    vision_out: int = 0
    patch_row: int = 1176  # in_channels * temporal_patch * patch^2
    patch_size: int = 14
    merge: int = 2
    vision_window: int = 4  # merged tokens per window side (window_size // merge // patch_size)
    vision_head_chunk: int = 0  # heads per full-attention chunk; 0: a bundle whose graph masks patches x patches
    audio_layers: int = 0
    audio_width: int = 0
    audio_heads: int = 0
    audio_ffn: int = 0
    audio_bins: int = 128
    audio_window: int = 100  # n_window: chunks of 2 * n_window mel frames

    @classmethod
    def from_manifest(cls, manifest) -> Geometry:
        d, v, a = manifest.decoder, manifest.vision or {}, manifest.audio or {}

        def heads_of(width, head_dim):
            return width // head_dim if width and width % head_dim == 0 else max(1, width // 16)

        vw, aw = v.get("hidden_size", 0), a.get("d_model", 0)
        return cls(
            layers=d["num_layers"], heads=d["num_heads"], kv_heads=d["num_kv_heads"], head_dim=d["head_dim"],
            hidden=d["hidden_size"], vocab=d["vocab_size"], ffn=d.get("intermediate_size", 6 * d["hidden_size"]),
            vision_depth=v.get("depth", 0), vision_width=vw, vision_heads=v.get("num_heads") or heads_of(vw, 80),
            vision_ffn=v.get("intermediate_size") or 4 * vw, vision_out=v.get("out_hidden_size", d["hidden_size"]),
            patch_row=v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2,
            patch_size=v.get("patch_size", 14), merge=v.get("spatial_merge_size", 2),
            vision_window=window_side(v.get("spatial_merge_size", 2), v.get("window_size", 112),
                                      v.get("patch_size", 14)),
            vision_head_chunk=v.get("full_head_chunk", 0),
            audio_layers=a.get("encoder_layers", 0), audio_width=aw,
            audio_heads=a.get("encoder_attention_heads", heads_of(aw, 64)), audio_ffn=a.get("encoder_ffn_dim", 4 * aw),
            audio_bins=a.get("num_mel_bins", 128), audio_window=a.get("n_window", 100),
        )


@dataclass(frozen=True)
class RequestSizes:
    """A request's sizes: prompt tokens (media placeholders included), the vision grids (t, h, w) in patches
    of every image and video (they run in one vision call), the mel frames of each audio clip, and the token
    budget of the answer (`new_tokens`: the KV cache grows by one token per generated token)."""

    prompt_tokens: int
    vision_grids: tuple = ()
    audio_frames: tuple = ()
    new_tokens: int = 0

    @property
    def vision_patches(self) -> int:
        return sum(t * h * w for t, h, w in self.vision_grids)


def kv_bytes(g: Geometry, tokens: int) -> int:
    """The KV cache of `tokens` tokens (float32, every layer, keys and values)."""
    return 2 * g.layers * g.kv_heads * g.head_dim * F32 * tokens


def decoder_bytes(g: Geometry, tokens: int, chunk: int | None = None) -> int:
    """Peak of prefilling `tokens` tokens in chunks of `chunk` (None: one run). The last chunk is the
    largest run: scores [heads, chunk, tokens], twice (an op's input and output live together, measured),
    the mask (float bias + two bool maps), grouped K/V repeated to all heads, the past and the present KV
    cache side by side, the layer activations, the prompt's embeddings and the logits."""
    c = tokens if chunk is None else min(chunk, tokens)
    t = tokens
    scores = 2 * g.heads * c * t * F32
    mask = c * t * (F32 + 2)
    repeated = 2 * g.heads * t * g.head_dim * F32 if g.heads != g.kv_heads else 0
    kv = kv_bytes(g, 2 * t - c)
    act = c * (4 * g.hidden + 3 * g.ffn + 3 * g.heads * g.head_dim) * F32
    embeds = t * g.hidden * F32
    return scores + mask + repeated + kv + act + embeds + 2 * g.vocab * F32


def generation_bytes(g: Geometry, prompt: int, new_tokens: int) -> int:
    """Peak of the last step of generating `new_tokens` tokens after a prompt of `prompt`: a one-token run
    over a cache of prompt + new_tokens - 1 tokens, past and present side by side (0 when nothing is generated)."""
    if new_tokens <= 0:
        return 0
    return decoder_bytes(g, prompt + new_tokens, 1)


def _vision_linear(g: Geometry) -> int:
    """Bytes per patch that every vision block holds whatever its attention: activations, MLP, patch rows."""
    lin = (6 * g.vision_width + 3 * g.vision_ffn + 2 * g.patch_row) * F32
    return lin + 2 * g.vision_out * F32 // max(1, g.merge**2)


def square_grid(g: Geometry, patches: int) -> list[tuple[int, int, int]]:
    """One frame of at least `patches` patches, as square as the merge allows: for a patch count alone, the
    layout whose full-attention blocks cost most."""
    side = math.isqrt(max(1, patches))
    side += side * side < patches
    side = -(-side // g.merge) * g.merge
    return [(1, side, side)]


def vision_bytes(g: Geometry, grids) -> int:
    """Peak of one vision call: `grids` the (t, h, w) patch grids of all images and videos of the request, or a
    patch count (one square frame, the dearest layout of that many patches)."""
    if isinstance(grids, int):
        if grids <= 0:
            return 0
        patches, grids = grids, square_grid(g, grids)
    else:
        patches = sum(int(t) * int(h) * int(w) for t, h, w in grids)
    if patches <= 0 or not g.vision_depth:
        return 0
    lin = _vision_linear(g) * patches
    if not g.vision_head_chunk:  # masked patches x patches in every block: two float biases, two bool maps,
        return (2 * (F32 + 1) + 2 * g.vision_heads * F32) * patches * patches + lin  # scores twice
    side, unit = g.vision_window, g.merge
    windows = sum(int(t) * -(-(int(h) // unit) // side) * -(-(int(w) // unit) // side) for t, h, w in grids)
    longest = max(int(h) * int(w) for _, h, w in grids)
    frames = sum(int(t) for t, _, _ in grids)
    window_len = min((side * unit) ** 2, longest)
    # scores and their softmax per batch, plus the gathered q, k, v and the padded output ([slots, width] each)
    window_block = 2 * g.vision_heads * windows * window_len**2 * F32 + 4 * g.vision_width * windows * window_len * F32
    full_block = 2 * g.vision_head_chunk * frames * longest**2 * F32 + 4 * g.vision_width * frames * longest * F32
    return lin + max(window_block, full_block)


def max_vision_patches(g: Geometry, budget: int) -> int:
    """The most patches one vision call may have for its peak to fit `budget` bytes (allocator slack taken), as
    one square frame (the dearest layout of a patch count)."""
    room = budget - ALLOCATOR_SLACK
    if room <= 0 or vision_bytes(g, 1) > room:
        return 0
    lo, hi = 1, 2
    while vision_bytes(g, hi) <= room:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # vision_bytes(lo) fits, vision_bytes(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if vision_bytes(g, mid) <= room else (lo, mid)
    return lo


def audio_bytes(g: Geometry, frames: tuple | list) -> int:
    """Peak of one audio call: attention is per chunk of 2 * n_window mel frames, so it grows linearly."""
    if not frames or not g.audio_layers:
        return 0
    size = 2 * g.audio_window
    chunks = sum(-(-int(f) // size) for f in frames)
    n = g.audio_window  # frames of a chunk after the stride-2 convolution
    scores = 2 * g.audio_heads * chunks * n * n * F32
    conv = chunks * size * (2 * g.audio_width + g.audio_bins) * F32
    act = chunks * n * (6 * g.audio_width + 3 * g.audio_ffn) * F32
    mel = 2 * g.audio_bins * sum(int(f) for f in frames) * F32
    return scores + conv + act + mel


@dataclass(frozen=True)
class Estimate:
    """Estimated peak working memory of each stage (bytes); `peak` is the request's."""

    vision: int
    audio: int
    decoder: int
    slack: int = ALLOCATOR_SLACK

    @property
    def peak(self) -> int:
        return self.slack + max(self.vision, self.audio, self.decoder)

    def to_dict(self) -> dict:
        return {"vision": self.vision, "audio": self.audio, "decoder": self.decoder, "slack": self.slack,
                "peak": self.peak}


def estimate(g: Geometry, sizes: RequestSizes, chunk: int | None = None) -> Estimate:
    decoder = max(decoder_bytes(g, sizes.prompt_tokens, chunk),
                  generation_bytes(g, sizes.prompt_tokens, int(sizes.new_tokens)))
    return Estimate(vision_bytes(g, list(sizes.vision_grids)), audio_bytes(g, sizes.audio_frames), decoder)


@dataclass(frozen=True)
class Plan:
    """How a request runs within the budget."""

    prefill_chunk: int | None  # None: the prompt is prefilled in one run
    estimate: Estimate  # at that chunk size


def _geometry(source) -> Geometry:
    return source if isinstance(source, Geometry) else Geometry.from_manifest(source)


def plan_request(source, sizes: RequestSizes, budget: MemoryBudget | int = MemoryBudget()) -> Plan:
    """Pick the largest prefill chunk (one run up to `budget.max_chunk` tokens) whose estimated peak fits the
    budget; MemoryBudgetError (saying by how much it exceeds) when nothing fits. `source`: a Manifest or
    Geometry. Call it before any graph runs, with sizes known from preprocessing (grids, mel frames) and the
    prompt's token count."""
    g = _geometry(source)
    limit = budget.bytes if isinstance(budget, MemoryBudget) else int(budget)
    max_chunk = budget.max_chunk if isinstance(budget, MemoryBudget) else DEFAULT_MAX_CHUNK
    s, n = int(sizes.prompt_tokens), int(sizes.new_tokens)
    if s < 0 or n < 0:
        raise InputError(f"prompt_tokens and new_tokens must be >= 0, not {s} and {n}")
    vision, audio = vision_bytes(g, list(sizes.vision_grids)), audio_bytes(g, sizes.audio_frames)
    for stage, need in (("the vision encoder", vision), ("the audio encoder", audio)):
        if need + ALLOCATOR_SLACK > limit:
            cap = max_vision_patches(g, limit)
            extra = (f" (at most {cap} patches, about {cap * g.patch_size**2} pixels per image "
                     "for a single image: lower the resolution)" if stage == "the vision encoder" else "")
            raise MemoryBudgetError(
                f"request exceeds the memory budget of {_fmt(limit)} by {_fmt(need + ALLOCATOR_SLACK - limit)}: "
                f"{stage} needs an estimated {_fmt(need + ALLOCATOR_SLACK)}{extra}")
    generation = generation_bytes(g, s, n)  # the last generated token's run: the KV cache at its largest
    if generation + ALLOCATOR_SLACK > limit:
        raise MemoryBudgetError(
            f"request exceeds the memory budget of {_fmt(limit)} by {_fmt(generation + ALLOCATOR_SLACK - limit)}: a "
            f"prompt of {s} tokens and an answer budget of {n} tokens need an estimated "
            f"{_fmt(generation + ALLOCATOR_SLACK)} at the last generated token (KV cache {_fmt(kv_bytes(g, s + n))}); "
            "lower max_new_tokens / critique_max_new_tokens, shorten the input or raise the budget")
    candidates = ([None] if s <= max_chunk else []) + [c for c in _chunks(max_chunk) if c < s]
    best = None
    for chunk in candidates:
        est = estimate(g, sizes, chunk)
        if est.peak <= limit:
            return Plan(chunk, est)
        best = est
    need = (best if best is not None else estimate(g, sizes, MIN_CHUNK)).peak
    raise MemoryBudgetError(
        f"request exceeds the memory budget of {_fmt(limit)} by {_fmt(need - limit)}: a prompt of {s} tokens needs "
        f"an estimated {_fmt(need)} even prefilled in chunks of {MIN_CHUNK} tokens (KV cache "
        f"{_fmt(kv_bytes(g, s))}); shorten the input or raise the budget")


def _chunks(max_chunk: int) -> list[int]:
    out, c = [], max_chunk
    while c >= MIN_CHUNK:
        out.append(c)
        c //= 2
    return out
