"""Memory plan for a device: does the guard fit, at which recipe and limits.

The weights of every graph follow from the model's geometry alone (a checkpoint's config.json, a reference profile,
or a bundle's own files), at the precision each recipe gives each graph (runtime/recipes.py). The request's
working memory is the runtime's own estimate (runtime/memory.py: KV cache, the decoder's, vision encoder's and
audio encoder's peaks at the given limits). What the device adds (CUDA context, TensorRT workspace, the process) are
constants, stated with where they come from in DEVICE_COSTS. Everything is in one pool: a Jetson's CPU and GPU share
its memory, next to what the OS keeps (`reserve`).

Figures lean upward: fp32 activations (the runtime's estimate is for fp32 graphs), fp32 scales, norms and biases at
fp32 in every recipe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .devices import DEFAULT_RESERVE_GB, DEVICE_COSTS, DEVICES
from .errors import InputError
from .memory import GiB, Geometry, RequestSizes, estimate, square_grid
from .positions.vision import head_chunk, window_side
from .recipes import RECIPES

# default limits of a plan (the same names as build-engines' options)
DEFAULT_LIMITS = {"max_prompt_tokens": 2048, "max_image_tokens": 1024, "max_audio_seconds": 30.0, "new_tokens": 32}
SUGGEST_FLOOR = {"max_image_tokens": 256, "max_prompt_tokens": 512}  # the lowest limits `suggest` tries
MEL_FRAMES_PER_SECOND = 100  # Whisper-style features: hop 160 at 16 kHz


@dataclass(frozen=True)
class Shapes:
    """The widths and counts that size the weights: the text, vision and audio configs' fields."""

    text: dict
    vision: dict
    audio: dict
    source: str

    @classmethod
    def from_profile(cls, name: str) -> Shapes:
        from .profiles import PROFILES

        if name not in PROFILES:
            raise InputError(f"--profile must be one of {', '.join(PROFILES)}, not {name!r}")
        p = PROFILES[name]
        text = dict(p.text)
        if text.get("vocab_size") is None:  # tiny: the vocabulary of its reference tokenizer
            text["vocab_size"] = 832
        return cls(text, dict(p.vision), dict(p.audio), f"profile {name}")

    @classmethod
    def from_checkpoint(cls, path) -> Shapes:
        path = Path(path)
        config = path / "config.json"
        if not config.is_file():
            raise InputError(f"--checkpoint {path}: no config.json there")
        try:
            raw = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--checkpoint {path}: config.json is not readable JSON ({exc})") from None
        thinker = raw.get("thinker_config", raw)
        try:
            return cls(dict(thinker["text_config"]), dict(thinker["vision_config"]), dict(thinker["audio_config"]),
                       f"checkpoint {path}")
        except (KeyError, TypeError):
            raise InputError(f"--checkpoint {path}: config.json has no text_config, vision_config and audio_config "
                             "(a Qwen2.5-Omni / OmniGuard checkpoint has them under thinker_config)") from None


def check_limits(limits: dict | None) -> dict:
    """DEFAULT_LIMITS updated by `limits`, each checked (InputError naming the option): the limits of a plan, of
    build-engines' optimization profiles and of a GPU session, under the same names."""
    lim = {**DEFAULT_LIMITS, **(limits or {})}
    for key, value in lim.items():
        if key not in DEFAULT_LIMITS:
            raise InputError(f"unknown limit {key!r} (known: {', '.join(DEFAULT_LIMITS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**31 or \
                (key != "max_audio_seconds" and value != int(value)):
            raise InputError(f"--{key.replace('_', '-')} must be a whole number >= 0, not {value!r}"
                             if key != "max_audio_seconds" else f"--max-audio-seconds must be a number of seconds "
                             f">= 0, not {value!r}")
    return lim


def _get(section: dict, key: str, default=None):
    value = section.get(key, default)
    if value is None:
        raise InputError(f"the model's config lacks {key}")
    return value


def _patch_row(v: dict) -> int:
    """Values in one vision patch: channels x temporal patch x patch^2 (1176 for Qwen2.5-Omni)."""
    return v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2


def matrices(s: Shapes) -> dict[str, dict]:
    """Per graph: `mm`, the constant MatMul weights as (K, N, count) (what the recipes quantize), and `other`, the
    count of every other parameter (norms, biases, convolutions, the audio positions). The decoder graph holds its
    output layer; the embedding table is a file of its own (`embedding`)."""
    t, v, a = s.text, s.vision, s.audio
    h, layers, heads = _get(t, "hidden_size"), _get(t, "num_hidden_layers"), _get(t, "num_attention_heads")
    kv = _get(t, "num_key_value_heads") * (h // heads)
    ffn, vocab = _get(t, "intermediate_size"), _get(t, "vocab_size")
    decoder = {"mm": [(h, h, layers), (h, kv, 2 * layers), (h, h, layers), (h, ffn, 2 * layers), (ffn, h, layers),
                      (h, vocab, 1)],
               "other": layers * (h + 2 * kv + 2 * h) + h}  # q/k/v biases, two norms per layer; the final norm
    c, f, depth = _get(v, "hidden_size"), _get(v, "intermediate_size"), _get(v, "depth")
    merged = c * v.get("spatial_merge_size", 2) ** 2
    patch = _patch_row(v)
    out = v.get("out_hidden_size", h)
    vision = {"mm": [(c, c, 4 * depth), (c, f, 2 * depth), (f, c, depth), (merged, merged, 1), (merged, out, 1)],
              "other": c * patch + depth * (4 * c + 2 * f + c + 2 * c) + c + merged + out}
    w, ffa, n = _get(a, "d_model"), _get(a, "encoder_ffn_dim"), _get(a, "encoder_layers")
    bins, positions, out_a = a.get("num_mel_bins", 128), a.get("max_source_positions", 1500), a.get("output_dim", h)
    audio = {"mm": [(w, w, 4 * n), (w, ffa, n), (ffa, w, n), (w, out_a, 1)],
             "other": (w * bins * 3 + w) + (w * w * 3 + w) + positions * w
             + n * (3 * w + 4 * w + ffa + w) + 2 * w + out_a}
    return {"vision": vision, "audio": audio, "decoder": decoder, "embedding": {"mm": [], "other": vocab * h}}


def params(m: dict) -> int:
    return sum(k * n * count for k, n, count in m["mm"]) + m["other"]


def weight_bytes(m: dict, method: str) -> int:
    """Bytes of one graph's weights under a recipe method (keep/fp32, fp16, int8-dyn, qdq-int8, int4-block,
    int4-qdq); other parameters are counted at fp32 (fp16 keeps norms in fp32; an upper bound for the rest)."""
    other = m["other"] * 4
    total = 0
    for k, n, count in m["mm"]:
        if method in ("keep", "fp32"):
            b = 4 * k * n
        elif method == "fp16":
            b = 2 * k * n
        elif method in ("int8-dyn", "qdq-int8"):
            b = k * n + 5 * n  # int8 weights, a scale and a zero point per output channel
        elif method in ("int4-block", "int4-qdq"):
            b = (k * n + 1) // 2 + 4 * n * -(-k // 32)  # two per byte, an fp32 scale per block of 32
        else:
            raise ValueError(f"no weight size for method {method!r}")
        total += b * count
    return total + other


@dataclass(frozen=True)
class BundleShapes:
    """A bundle as a plan's source: its files are its weights (the graphs a GPU runtime loads: vision, audio, the
    standard decoder; and the embedding table), its manifest's geometry sizes the working memory."""

    weights: dict
    geometry: Geometry
    recipe: str
    source: str

    @classmethod
    def from_bundle(cls, path) -> BundleShapes:
        from .manifest import load_manifest

        m = load_manifest(path, verify="none")
        if "decoder" not in m.graphs:
            raise InputError(f"--bundle {path}: it has no standard-ops decoder (a CPU recipe's bundle): plan the fp32 "
                             "bundle or a GPU recipe's")
        weights = {}
        for g in ("vision", "audio", "decoder"):
            spec = m.graphs.get(g)
            if spec is not None:
                files = [f for f in (spec.file, spec.data_file) if f]
                weights[f"weights {g} ({spec.precision})"] = sum(m.files[f].size for f in files if f in m.files)
        emb = m.embedding
        weights[f"embedding table ({emb.get('dtype', 'float32')})"] = m.files[emb["file"]].size
        recipe = m.recipe["name"] if m.recipe else "fp32"
        return cls(weights, Geometry.from_manifest(m), recipe, f"bundle {path}")


def geometry(s: Shapes) -> Geometry:
    """The runtime's memory Geometry from the same shapes."""
    t, v, a = s.text, s.vision, s.audio
    h, heads = _get(t, "hidden_size"), _get(t, "num_attention_heads")
    return Geometry(layers=_get(t, "num_hidden_layers"), heads=heads, kv_heads=_get(t, "num_key_value_heads"),
                    head_dim=h // heads, hidden=h, vocab=_get(t, "vocab_size"), ffn=_get(t, "intermediate_size"),
                    vision_depth=_get(v, "depth"), vision_width=_get(v, "hidden_size"),
                    vision_heads=_get(v, "num_heads"), vision_ffn=_get(v, "intermediate_size"),
                    vision_out=v.get("out_hidden_size", h), patch_row=_patch_row(v),
                    patch_size=v.get("patch_size", 14), merge=v.get("spatial_merge_size", 2),
                    vision_window=window_side(v.get("spatial_merge_size", 2), v.get("window_size", 112),
                                              v.get("patch_size", 14)),
                    vision_head_chunk=head_chunk(_get(v, "num_heads")),  # the graph this package exports
                    audio_layers=_get(a, "encoder_layers"), audio_width=_get(a, "d_model"),
                    audio_heads=_get(a, "encoder_attention_heads"), audio_ffn=_get(a, "encoder_ffn_dim"),
                    audio_bins=a.get("num_mel_bins", 128), audio_window=a.get("n_window", 100))


@dataclass
class DevicePlan:
    device: str
    recipe: str
    memory: int  # the device's bytes
    reserve: int
    items: dict = field(default_factory=dict)  # name -> bytes
    limits: dict = field(default_factory=dict)

    @property
    def needed(self) -> int:
        return sum(self.items.values())

    @property
    def available(self) -> int:
        return self.memory - self.reserve

    @property
    def fits(self) -> bool:
        return self.needed <= self.available

    def to_dict(self) -> dict:
        return {"device": self.device, "recipe": self.recipe, "fits": self.fits, "needed_bytes": self.needed,
                "available_bytes": self.available, "device_bytes": self.memory, "reserve_bytes": self.reserve,
                "items_bytes": dict(self.items), "limits": dict(self.limits)}


GPU_RECIPES = ("fp32", "gpu-fp16", "trt-int8", "orin")


def plan(s, recipe: str, device: str, limits: dict | None = None, reserve_gb: float = DEFAULT_RESERVE_GB,
         device_memory_gb: float | None = None, embed_dtype: str = "float32") -> DevicePlan:
    """The memory plan of `recipe` ("fp32" or a GPU recipe's name) on `device` at `limits`. `s`: Shapes, or a
    BundleShapes (a bundle's own files give its weights)."""
    if device not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    if recipe not in GPU_RECIPES:
        raise InputError(f"--recipe must be one of {', '.join(GPU_RECIPES)} (GPU plans; the CPU recipes ship the "
                         f"onnxruntime-only fast decoder), not {recipe!r}")
    if not (isinstance(reserve_gb, (int, float)) and 0 <= reserve_gb < 1024):
        raise InputError(f"--reserve-gb must be a number of GB in [0, 1024), not {reserve_gb!r}")
    if device_memory_gb is not None and not (isinstance(device_memory_gb, (int, float)) and 0 < device_memory_gb < 4096):
        raise InputError(f"--device-memory must be a number of GB in (0, 4096), not {device_memory_gb!r}")
    lim = check_limits(limits)
    memory = int((device_memory_gb if device_memory_gb is not None else DEVICES[device][1]) * GiB)
    out = DevicePlan(device, recipe, memory, int(reserve_gb * GiB), limits=lim)
    if isinstance(s, BundleShapes):
        if recipe != s.recipe:
            raise InputError(f"--recipe {recipe}: the bundle is {s.recipe}; plan another recipe from its bundle, or "
                             "from --checkpoint or --profile")
        out.items.update(s.weights)
        g = s.geometry
    else:
        mats = matrices(s)
        methods = {g: "fp32" for g in ("vision", "audio", "decoder")}
        if recipe != "fp32":
            methods.update({g: p.method for g, p in RECIPES[recipe].graphs.items() if g in methods})
        for g, method in methods.items():
            out.items[f"weights {g} ({method})"] = weight_bytes(mats[g], method)
        table_bytes = mats["embedding"]["other"] * (2 if embed_dtype == "float16" else 4)
        out.items[f"embedding table ({embed_dtype})"] = table_bytes
        g = geometry(s)
    merge2 = g.merge ** 2
    image = int(lim["max_image_tokens"]) * merge2  # patches, as one square image: the dearest layout
    sizes = RequestSizes(prompt_tokens=int(lim["max_prompt_tokens"]),
                         vision_grids=tuple(square_grid(g, image)) if image else (),
                         audio_frames=(int(lim["max_audio_seconds"] * MEL_FRAMES_PER_SECOND),) if lim["max_audio_seconds"] else (),
                         new_tokens=int(lim["new_tokens"]))
    est = estimate(g, sizes)
    out.items["working memory (runtime estimate: KV cache, activations)"] = est.peak
    for name, (nbytes, _) in DEVICE_COSTS.items():
        out.items[name.replace("_", " ")] = nbytes
    return out


def suggest(s: Shapes, device: str, limits: dict | None = None, **kw) -> DevicePlan | None:
    """The first plan that fits: recipes from the most to the least precise, each with an fp32 then an fp16
    embedding table (`export --embed-dtype float16`), then the image and prompt limits halved (down to
    SUGGEST_FLOOR). None when nothing fits."""
    lim = {**DEFAULT_LIMITS, **(limits or {})}
    kw.pop("embed_dtype", None)
    while True:
        for recipe in GPU_RECIPES:
            for embed in ("float32", "float16"):
                p = plan(s, recipe, device, lim, embed_dtype=embed, **kw)
                if p.fits:
                    return p
        if lim["max_image_tokens"] > SUGGEST_FLOOR["max_image_tokens"]:
            lim["max_image_tokens"] //= 2
        elif lim["max_prompt_tokens"] > SUGGEST_FLOOR["max_prompt_tokens"]:
            lim["max_prompt_tokens"] //= 2
        else:
            return None


def table(plans: list[DevicePlan]) -> str:
    def gb(n):
        return f"{n / GiB:.2f}"

    lines = ["| device | recipe | embedding | needed GiB | available GiB | fits | limits |",
             "|---|---|---|---|---|---|---|"]
    for p in plans:
        lim = ", ".join(f"{k} {v:g}" for k, v in p.limits.items())
        embed = next((k.split("(")[1].rstrip(")") for k in p.items if k.startswith("embedding")), "-")
        lines.append(f"| {p.device} | {p.recipe} | {embed} | {gb(p.needed)} | {gb(p.available)} | "
                     f"{'yes' if p.fits else 'no'} | {lim} |")
    return "\n".join(lines)


__all__ = ["DEVICES", "DEVICE_COSTS", "DEFAULT_LIMITS", "Shapes", "check_limits", "matrices", "params", "weight_bytes", "plan",
           "suggest", "table"]
