"""TensorRT engines: optimization profiles from a bundle's manifest and the user's limits, the key an engine is
valid for, and the checks that keep a stale or foreign engine from running.

- `profiles`: the min/opt/max shape of every graph input, from the manifest's symbolic dimensions and the limits
  (the names `plan` uses: max_prompt_tokens, max_image_tokens, max_audio_seconds, new_tokens). A request outside
  them is refused before it runs (`Profile.check`): onnxruntime's TensorRT provider would otherwise build a new
  engine in the middle of the request.
- `EngineKey` / `check_engine`: engines are stored under a key of the graph files' sha256, the GPU's compute
  capability, the TensorRT and onnxruntime versions, the precision and the profile; anything else in the cache is
  refused with what differs (onnxruntime's own cache names only part of this, and rebuilds silently when its name
  changes).

The GPU seam, bottom up: cuda.py (the machine), engines.py, providers.py (provider chains and session options),
engine_build.py (build-engines). None of it has run on a GPU: this project's machines have none.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .decode import SCORE_MARGIN
from .errors import BundleError, EngineError, InputError
from .plan import MEL_FRAMES_PER_SECOND, check_limits

GRAPHS = ("vision", "audio", "decoder")  # a GPU runs the standard-ops decoder: TensorRT parses it
# the opt shapes TensorRT tunes its kernels for: a typical request (each clipped to its limit): a prompt of 256
# tokens after a cached policy prefix of up to 384, a 448x448 image (256 tokens), 5 s of audio
OPT = {"prompt_tokens": 256, "past_tokens": 384, "image_tokens": 256, "audio_seconds": 5.0}
AUDIO_CLIPS = 4  # audio clips of one request (their chunks run in one call) the audio profile has room for
# images and video frames (temporal patches) of one request the vision profile has room for: TensorRT sizes the
# full-attention scores [frames, chunk heads, frame_len, frame_len] at every axis' maximum
VISION_FRAMES = 4
ENGINE_FILE = "engine.json"



# ---------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """One graph's optimization profile: input name -> (min, opt, max) shapes, and for each symbolic dimension the
    limit that bounds it (for the messages)."""

    graph: str
    shapes: dict
    dims: dict = field(default_factory=dict)  # input -> its manifest dimensions (ints and symbols)
    bounds: dict = field(default_factory=dict)  # symbol -> (min, opt, max, the limit that bounds it)
    limits: dict = field(default_factory=dict)  # the checked limits it was made from

    def option_strings(self) -> dict[str, str]:
        """onnxruntime's TensorRT provider options: "name:d0xd1x...,name2:..." for min, opt and max."""
        def fmt(k):
            return ",".join(f"{name}:{'x'.join(str(d) for d in s[k])}" for name, s in self.shapes.items())
        return {"trt_profile_min_shapes": fmt(0), "trt_profile_opt_shapes": fmt(1), "trt_profile_max_shapes": fmt(2)}

    def check(self, feeds) -> None:
        """InputError when a feed's shape is outside the profile (a new engine would be built mid-request)."""
        for name, (lo, _, hi) in self.shapes.items():
            if name not in feeds:
                continue
            shape = getattr(feeds[name], "shape", ())
            shape = tuple(int(d) for d in (shape() if callable(shape) else shape))  # an OrtValue's is a method
            outside = [k for k, (d, a, b) in enumerate(zip(shape, lo, hi)) if not a <= d <= b]
            if len(shape) != len(lo) or outside:
                dims = self.dims.get(name, ())
                symbol = dims[outside[0]] if outside and outside[0] < len(dims) else None
                limit = f" ({symbol}: {self.bounds[symbol][3]})" if symbol in self.bounds else ""
                raise InputError(f"{self.graph} input {name} has shape {list(shape)}, outside its TensorRT "
                                 f"profile {list(lo)}..{list(hi)}{limit}: raise the limit and run build-engines "
                                 "again, or send a smaller request")


class Profiled:
    """A GraphSession whose every run is checked against its TensorRT profile first (`Profile.check`)."""

    def __init__(self, inner, profile: Profile):
        self.inner, self.profile = inner, profile

    def __getattr__(self, name):  # input_names, output_names, providers, options, buffer
        return getattr(self.inner, name)

    def run(self, feeds, outputs=None, run_options=None):
        self.profile.check(feeds)
        return self.inner.run(feeds, outputs, run_options)

    def run_bound(self, inputs, outputs, run_options=None):
        self.profile.check(inputs)
        return self.inner.run_bound(inputs, outputs, run_options)

    def run_device(self, inputs, host_outputs, device_outputs, run_options=None):
        self.profile.check(inputs)
        return self.inner.run_device(inputs, host_outputs, device_outputs, run_options)


def engine_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file of an engine folder but its record: name -> (size, mtime_ns)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name != ENGINE_FILE}


def check_unchanged(folder: Path, before: dict, graph: str) -> None:
    """EngineError when opening the session wrote into the engine folder: onnxruntime found its cached engine
    unusable for this onnxruntime, TensorRT or CUDA (its own cache name covers what our key may not) and built a
    new one."""
    after = {n: v for n, v in engine_files(folder).items() if n.endswith(".engine")}
    before = {n: v for n, v in before.items() if n.endswith(".engine")}
    if after != before:
        changed = sorted(n for n in set(after) | set(before) if after.get(n) != before.get(n))
        raise EngineError(f"{folder}: onnxruntime built a new {graph} engine as the session opened ({', '.join(changed)}"
                          "): the engines there do not match this onnxruntime, TensorRT or CUDA; run build-engines "
                          "--rebuild on this machine")


def _symbols(manifest, lim: dict) -> dict[str, dict]:
    """graph -> symbolic dimension -> (min, opt, max, limit name). min/opt/max are each consistent across inputs
    (a decoder's total is past + seq at all three), as TensorRT checks every layer at each of them."""
    from .positions.audio import MIN_FRAMES, audio_output_length

    out: dict[str, dict] = {}
    merge2 = int(manifest.vision.spatial_merge_size) ** 2
    img = int(lim["max_image_tokens"])
    if img:
        o = min(OPT["image_tokens"], img)
        why = f"--max-image-tokens {img}"
        window = (int(manifest.vision.window_size) // int(manifest.vision.patch_size)) ** 2  # patches per window
        frames = f"{why}, in up to {VISION_FRAMES} images or video frames"
        # windows: at least one merged token each (the edge windows), so at most one per token
        out["vision"] = {"patches": (merge2, o * merge2, img * merge2, why), "tokens": (1, o, img, why),
                         "windows": (1, -(-o * merge2 // window), img, why),
                         "window_len": (merge2, min(window, o * merge2), min(window, img * merge2), why),
                         "frames": (1, 1, VISION_FRAMES, frames),
                         "frame_len": (merge2, o * merge2, img * merge2, why)}
    secs = float(lim["max_audio_seconds"])
    frames = math.ceil(secs * MEL_FRAMES_PER_SECOND)
    if frames >= MIN_FRAMES:
        size = 2 * int(manifest.audio.n_window)
        opt_frames = min(frames, math.ceil(OPT["audio_seconds"] * MEL_FRAMES_PER_SECOND))
        # the clips of a request run in one call: sum of ceil(n_i / size) <= ceil(frames / size) + clips - 1
        chunks = math.ceil(frames / size) + AUDIO_CLIPS - 1
        why = f"--max-audio-seconds {secs:g} in up to {AUDIO_CLIPS} clips"
        # tokens over clips that share the frames: sum of audio_output_length(n_i) <= frames // 4 + one per chunk
        out["audio"] = {"chunks": (1, math.ceil(opt_frames / size), chunks, why),
                        "frames": (MIN_FRAMES, min(size, opt_frames), min(size, frames), why),
                        "tokens": (audio_output_length(MIN_FRAMES), audio_output_length(opt_frames),
                                   frames // 4 + chunks, why)}
    p, n = int(lim["max_prompt_tokens"]), int(lim["new_tokens"])
    if p < 1:
        raise InputError("--max-prompt-tokens must be >= 1 for a decoder profile")
    if n < 1:
        raise InputError("--new-tokens must be >= 1 for a decoder profile")
    # the answer's budget, and the category scores' continuation past it (decode.SCORE_MARGIN rows)
    n += SCORE_MARGIN
    seq_o, past_o = min(OPT["prompt_tokens"], p), min(OPT["past_tokens"], p + n - 1)
    why_p, why_k = f"--max-prompt-tokens {p}", f"--max-prompt-tokens {p} + --new-tokens {n - SCORE_MARGIN}"
    out["decoder"] = {"batch": (1, 1, 1, "one request per decoder run"), "seq": (1, seq_o, p, why_p),
                      "past": (0, past_o, p + n - 1, why_k), "total": (1, seq_o + past_o, p + (p + n - 1), why_k)}
    return out


def profiles(manifest, limits: dict | None = None) -> dict[str, Profile]:
    """Each GPU graph's profile (vision and audio only when their limit is above 0). BundleError when a graph input
    has a symbolic dimension this package does not know (the manifest and the runtime disagree)."""
    lim = check_limits(limits)
    if "decoder" not in manifest.graphs:
        raise BundleError("the bundle has no standard-ops decoder graph, which the GPU providers run (a CPU recipe's "
                          "bundle): use the fp32 bundle or a GPU recipe's (gpu-fp16, trt-int8, orin)")
    out = {}
    for graph, symbols in _symbols(manifest, lim).items():
        spec = manifest.graphs.get(graph)
        if spec is None:
            continue
        shapes, names = {}, {}
        for inp in spec.inputs:
            names[inp.name] = tuple(inp.shape)
            dims = []
            for d in inp.shape:
                if isinstance(d, int):
                    dims.append((d, d, d))
                elif d in symbols:
                    dims.append(symbols[d][:3])
                else:
                    raise BundleError(f"{spec.file}: input {inp.name} has a dimension {d!r} no profile bounds "
                                      f"(known for {graph}: {', '.join(symbols)})")
            shapes[inp.name] = tuple(tuple(x[k] for x in dims) for k in range(3))
        out[graph] = Profile(graph, shapes, names, dict(symbols), dict(lim))
    return out


def graph_precision(spec) -> str:
    """fp32 | fp16 | int8 | int4: the precision a recipe gave the graph (its manifest entry)."""
    if spec.precision not in ("fp32", "fp16", "int8", "int4"):
        raise BundleError(f"{spec.file}: precision {spec.precision!r} is none of fp32, fp16, int8, int4")
    return spec.precision


# ---------------------------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class EngineKey:
    """What an engine is valid for. Any field that differs makes it stale (the bundle or the limits changed) or
    foreign (another GPU, TensorRT, onnxruntime)."""

    graph: str
    onnx_sha256: str  # of the graph file and its external data, from the manifest
    compute_capability: str  # "8.7" (Jetson Orin), "8.9", ...
    tensorrt: str
    onnxruntime: str
    precision: str
    profile: dict  # input -> [min, opt, max]

    @property
    def folder(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.graph}-{self.precision}-sm{self.compute_capability.replace('.', '')}-trt{self.tensorrt}-{digest}"

    def to_json(self) -> dict:
        return {**asdict(self), "folder": self.folder}


def graph_sha256(manifest, graph: str) -> str:
    spec = manifest.graphs[graph]
    files = [f for f in (spec.file, spec.data_file) if f]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}:{manifest.files[f].sha256}\n".encode())
    return h.hexdigest()


def engine_key(manifest, graph: str, profile: Profile, compute_capability: str, tensorrt: str,
               onnxruntime: str) -> EngineKey:
    spec = manifest.graphs[graph]
    shapes = {k: [list(s) for s in v] for k, v in profile.shapes.items()}
    return EngineKey(graph, graph_sha256(manifest, graph), compute_capability, tensorrt, onnxruntime,
                     graph_precision(spec), shapes)


def default_cache(bundle: Path) -> Path:
    """Engines and timing caches beside the bundle, never inside it (its manifest lists every file it holds)."""
    bundle = Path(bundle)
    return bundle.parent / f"{bundle.name}.engines"


def engine_records(cache: Path, graph: str) -> list[tuple[Path, dict | None]]:
    """(folder, its engine.json or None when unreadable) of every engine folder of `graph` under `cache`."""
    out = []
    for p in sorted(Path(cache).glob(f"{graph}-*/{ENGINE_FILE}")) if Path(cache).is_dir() else []:
        try:
            out.append((p.parent, json.loads(p.read_text())))
        except (OSError, ValueError):
            out.append((p.parent, None))
    return out


def check_engine(cache: Path, key: EngineKey) -> Path:
    """The folder of `key`'s engine under `cache`, checked: EngineError when it is missing, or when the graph's
    engines there were built for something else (listing what differs)."""
    folder = Path(cache) / key.folder
    record = folder / ENGINE_FILE
    if record.is_file():
        try:
            stored = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"{record}: unreadable ({exc}); run build-engines --rebuild") from None
        diff = [k for k, v in key.to_json().items() if stored.get(k) != v]
        if diff:
            raise EngineError(f"{record}: built for another {', '.join(diff)}; run build-engines --rebuild")
        files = stored.get("files")
        have = {n: size for n, (size, _) in engine_files(folder).items()}
        if not isinstance(files, dict) or not files or have != files:
            raise EngineError(f"{folder}: its engine files are not the ones built ({sorted(have)} against "
                              f"{sorted(files) if isinstance(files, dict) else files}); run build-engines --rebuild")
        return folder
    others = engine_records(cache, key.graph)
    if others:
        diffs = []
        for folder_, stored in others:
            if stored is None:
                diffs.append(f"{folder_.name} (unreadable)")
                continue
            changed = [k for k, v in key.to_json().items() if k != "folder" and stored.get(k) != v]
            diffs.append(f"{folder_.name} (differs in {', '.join(changed) or 'its folder name'})")
        raise EngineError(f"{cache}: no {key.graph} engine for this bundle, GPU (sm {key.compute_capability}), "
                          f"TensorRT {key.tensorrt}, onnxruntime {key.onnxruntime}, precision {key.precision} and "
                          f"limits; refused, not rebuilt: {'; '.join(diffs)}. Build it with `omniguard-edge "
                          "build-engines` (same limits)")
    raise EngineError(f"{cache}: no {key.graph} engine built; build them first with `omniguard-edge build-engines "
                      "--bundle B` (engines are built on the target GPU, ahead of time, never mid-request)")
