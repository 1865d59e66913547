"""GPU targets: onnxruntime's CUDA and TensorRT execution providers behind the backend seam, TensorRT engines built
ahead of time on the target, and what keeps a stale or foreign engine from running.

- `PROVIDERS`: the one option (`--provider cpu|cuda|tensorrt`) as onnxruntime provider chains.
- `profiles`: TensorRT optimization profiles (min/opt/max shape of every graph input), from the bundle's manifest
  (its symbolic dimensions) and the user's limits (the names `plan` uses: max_prompt_tokens, max_image_tokens,
  max_audio_seconds, new_tokens). A request outside them is refused before it runs (`Profile.check`): onnxruntime's
  TensorRT provider would otherwise build a new engine in the middle of the request.
- `provider_options`: the providers' options per graph (precision flags, engine and timing caches, profiles).
- `EngineKey` / `check_engines`: engines are stored under a key of the graph files' sha256, the GPU's compute
  capability, the TensorRT and onnxruntime versions, the precision and the profile; anything else in the cache is
  refused with what differs (onnxruntime's own cache names only part of this, and rebuilds silently when its name
  changes).
- `probe_gpu`, `tensorrt_version`: what the machine has, or a GpuError saying what to install.

None of this has run on a GPU: this project's machines have none (README, "Jetson and GPU"). The tests check
everything that needs no GPU: profiles against manifests and limits, option strings, keys, refusals, error paths.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BundleError, EngineError, GpuError, InputError
from .decode import SCORE_MARGIN
from .plan import DEVICE_COSTS, MEL_FRAMES_PER_SECOND, check_limits

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    # experimental, never run: build-engines --native's plans through TensorRT's Python API (runtime/trt_native.py)
    "tensorrt-native": ("TensorrtNative", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
GRAPHS = ("vision", "audio", "decoder")  # a GPU runs the standard-ops decoder: TensorRT parses it
# the opt shapes TensorRT tunes its kernels for: a typical request (each clipped to its limit): a prompt of 256
# tokens after a cached policy prefix of up to 384, a 448x448 image (256 tokens), 5 s of audio
OPT = {"prompt_tokens": 256, "past_tokens": 384, "image_tokens": 256, "audio_seconds": 5.0}
AUDIO_CLIPS = 4  # audio clips of one request (their chunks run in one call) the audio profile has room for
# images and video frames (temporal patches) of one request the vision profile has room for: TensorRT sizes the
# full-attention scores [frames, chunk heads, frame_len, frame_len] at every axis' maximum
VISION_FRAMES = 4
TENSORRT_SUPPORTED = "TensorRT 10.3 or later 10.x (JetPack 6.1/6.2 ship 10.3), or 11.x"
ENGINE_FILE = "engine.json"


def provider_chain(provider: str) -> tuple[str, ...]:
    if provider not in PROVIDERS:
        raise InputError(f"--provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    return PROVIDERS[provider]


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


@dataclass
class GpuSetup:
    """What open_bundle needs under a GPU provider, per manifest graph: the providers argument, the TensorRT profile
    to check runs against, and the engine folder whose files must not change when the session opens."""

    providers: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    folders: dict = field(default_factory=dict)
    native: bool = False  # the graphs with a folder run its TensorRT plan (runtime/trt_native.py)


def _opened(manifest, options) -> list[str]:
    """The manifest graphs open_bundle may open for options.graphs (the decoder role: either decoder graph and the
    fast one's output layer)."""
    roles = {"vision": ("vision",), "audio": ("audio",), "decoder": ("decoder", "decoder_gqa", "decoder_gqa_head")}
    return [g for role in options.graphs for g in roles.get(role, ()) if g in manifest.graphs]


def session_providers(manifest, cache: Path, options) -> GpuSetup:
    """For open_bundle, when the first of options.providers that this onnxruntime has is a GPU one: providers with
    their options for every graph it may open. Under TensorRT, the graphs with a profile (vision, audio and the
    standard decoder, at limits above 0) get their engines, checked here before any session opens (EngineError
    when missing, stale or foreign); a graph without one runs on CUDA. Empty on the CPU path; a provider this build
    lacks is skipped (open_session warns, as for any unavailable provider)."""
    import onnxruntime as ort

    from .trt_native import NAME as NATIVE

    available = set(ort.get_available_providers()) | {NATIVE}
    chain = [p for p in options.providers if p in available]
    kind = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda",
            NATIVE: "tensorrt-native"}.get(chain[0] if chain else "")
    setup = GpuSetup(native=kind == "tensorrt-native")
    if kind is None:
        return setup
    graphs = _opened(manifest, options)
    cuda = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    for g in graphs:
        setup.providers[g] = provider_options(cuda, g, graph_precision(manifest.graphs[g]),
                                              device_id=options.device_id)
    if kind == "cuda":
        return setup
    profs = {g: p for g, p in profiles(manifest, options.limits).items() if g in graphs}
    if not profs:
        return setup
    gpu, trt_version = probe_gpu(options.device_id), tensorrt_version()
    for g, prof in profs.items():
        key = engine_key(manifest, g, prof, gpu.compute_capability, trt_version, ort.__version__)
        setup.folders[g] = check_engine(cache, key)
        setup.profiles[g] = prof
        if setup.native:
            if not (setup.folders[g] / f"{g}.plan").is_file():
                raise EngineError(f"{setup.folders[g]}: no native TensorRT plan ({g}.plan); build it with "
                                  "`omniguard-edge build-engines --native --rebuild`")
            continue
        setup.providers[g] = provider_options("tensorrt", g, key.precision, prof, setup.folders[g],
                                              options.device_id)
        if cuda == "cpu":  # an onnxruntime with TensorRT but no CUDA provider: TensorRT, then the CPU
            setup.providers[g] = [setup.providers[g][0], setup.providers[g][2]]
    return setup


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


# ---------------------------------------------------------------------------------------------- options


def graph_precision(spec) -> str:
    """fp32 | fp16 | int8 | int4: the precision a recipe gave the graph (its manifest entry)."""
    if spec.precision not in ("fp32", "fp16", "int8", "int4"):
        raise BundleError(f"{spec.file}: precision {spec.precision!r} is none of fp32, fp16, int8, int4")
    return spec.precision


def provider_options(provider: str, graph: str, precision: str, profile: Profile | None = None,
                     cache: Path | None = None, device_id: int = 0) -> list:
    """onnxruntime's `providers` argument for one graph: [(name, options), ...] in preference order.

    TensorRT: the graphs carry their precision in their types (fp16 tensors, Q/DQ nodes, INT4 DequantizeLinear), so
    no precision flag lets TensorRT lower an fp32 island (norms, softmax) to fp16; INT8 Q/DQ graphs set
    trt_int8_enable, which onnxruntime's TensorRT provider documents for Q/DQ models (no calibration table). Engines
    and the timing cache go to `cache` (required). CUDA: exact fp32 (no TF32, so an fp32 bundle keeps parity with
    the CPU), arena grown by what is asked (a Jetson shares its memory), heuristic convolution search."""
    chain = provider_chain(provider)
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise InputError(f"--device-id must be an int >= 0, not {device_id!r}")
    cuda = {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": True, "use_tf32": False}
    out = []
    for name in chain:
        if name == "TensorrtExecutionProvider":
            if profile is None or cache is None:
                raise ValueError("the TensorRT provider needs the graph's profile and an engine cache folder")
            opts = {"device_id": device_id, "trt_max_workspace_size": DEVICE_COSTS["trt_workspace"][0],
                    "trt_fp16_enable": False, "trt_int8_enable": precision == "int8",
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                    "trt_builder_optimization_level": 3, **profile.option_strings()}
            out.append((name, opts))
        elif name == "CUDAExecutionProvider":
            out.append((name, dict(cuda)))
        else:
            out.append((name, {}))
    return out


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


# ---------------------------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str
    memory_bytes: int | None
    source: str


def _gpu_info(name: str, capability: str, memory: int | None, source: str) -> GpuInfo:
    """GpuError unless `capability` reads as MAJOR.MINOR (it names engine folders: nothing else may get in)."""
    if not re.fullmatch(r"\d{1,2}\.\d{1,2}", capability):
        raise GpuError(f"{source} gives the GPU's compute capability as {capability!r}, not MAJOR.MINOR: install "
                       "cuda-python (pip install cuda-python), which reads it from the driver")
    return GpuInfo(name, capability, memory, source)


def cuda_runtime():
    """cuda-python's runtime module (`cuda.bindings.runtime`, or `cuda.cudart` in older releases), or None."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 12.x
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart


def probe_gpu(device_id: int = 0) -> GpuInfo:
    """The GPU at `device_id`: through cuda-python when installed, else nvidia-smi. GpuError when neither finds
    one (Jetson: nvidia-smi may be absent; `pip install cuda-python` gives the first way)."""
    tried = []
    cudart = cuda_runtime()
    if cudart is not None:
        try:
            err, count = cudart.cudaGetDeviceCount()
            if int(err) == 0 and count > device_id:
                attr = cudart.cudaDeviceAttr
                _, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device_id)
                _, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device_id)
                _, props = cudart.cudaGetDeviceProperties(device_id)
                name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) \
                    else str(props.name)
                return _gpu_info(name, f"{int(major)}.{int(minor)}", int(props.totalGlobalMem), "cuda-python")
            tried.append(f"cuda-python: {count if int(err) == 0 else 'error ' + str(err)} device(s)")
        except GpuError:
            raise
        except Exception as exc:  # a driver or binding failure is a missing GPU to this check, said as such
            tried.append(f"cuda-python: {type(exc).__name__}: {exc}")
    else:
        tried.append("cuda-python: not installed")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            got = subprocess.run([smi, f"--id={device_id}", "--query-gpu=name,compute_cap,memory.total",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"nvidia-smi: {exc}")
        else:
            parts = [p.strip() for p in got.stdout.strip().split(",")]
            if got.returncode == 0 and len(parts) == 3 and parts[1]:
                mem = int(float(parts[2]) * 2**20) if parts[2].replace(".", "").isdigit() else None
                return _gpu_info(parts[0], parts[1], mem, "nvidia-smi")
            tried.append(f"nvidia-smi: exit {got.returncode} {got.stderr.strip()[:200]}")
    else:
        tried.append("nvidia-smi: not found")
    raise GpuError(f"no NVIDIA GPU {device_id} found ({'; '.join(tried)}): the cuda and tensorrt providers need one "
                   "(on a Jetson: pip install cuda-python)")


def check_tensorrt_version(version: str) -> str:
    """`version` when this package supports it, else GpuError naming what is."""
    try:
        major, minor = (int(x) for x in str(version).split(".")[:2])
    except ValueError:
        raise GpuError(f"TensorRT version {version!r} is not a version number") from None
    if (major == 10 and minor >= 3) or major == 11:
        return str(version)
    raise GpuError(f"TensorRT {version} is not supported: {TENSORRT_SUPPORTED} (strongly typed networks, explicit "
                   "quantization; implicit INT8 calibrators are deprecated)")


def tensorrt_version() -> str:
    """The installed TensorRT's version (its Python bindings), checked; GpuError when absent or unsupported."""
    try:
        import tensorrt
    except ImportError:
        raise GpuError("TensorRT's Python bindings are not installed: on a Jetson they come with JetPack "
                       "(apt install nvidia-jetpack, or its TensorRT packages); elsewhere pip install "
                       "'tensorrt>=10.3,<12'") from None
    return check_tensorrt_version(tensorrt.__version__)


def check_provider(provider: str) -> None:
    """GpuError when this onnxruntime build lacks the provider (the CPU wheel has neither GPU provider), or for the
    native backend when cuda-python or TensorRT is missing."""
    import onnxruntime as ort

    if provider == "tensorrt-native":
        from .trt_native import _cudart

        _cudart()
        tensorrt_version()
        return
    wanted = provider_chain(provider)[0]
    if wanted not in ort.get_available_providers():
        raise GpuError(f"onnxruntime {ort.__version__} here has no {wanted} (available: "
                       f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu (Jetson: NVIDIA's "
                       "aarch64 build for JetPack 6, README \"Jetson and GPU\") in place of onnxruntime")


def environment_error(provider: str) -> str | None:
    """Why `provider` cannot run here, or None (for tests and gpu_check: the same checks as at use)."""
    try:
        check_provider(provider)
        if provider != "cpu":
            probe_gpu()
        if provider.startswith("tensorrt"):
            tensorrt_version()
    except GpuError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------- build-engines


def build_engines(bundle, out=None, limits: dict | None = None, native: bool = False, rebuild: bool = False,
                  device_id: int = 0, dry_run: bool = False, progress: bool = True) -> list[dict]:
    """Build every GPU graph's TensorRT engine for this machine, ahead of time: through onnxruntime's TensorRT
    provider (its engine and timing caches, in the key's folder under `out`, default `default_cache(bundle)`), and
    with `native` also as a TensorRT plan through TensorRT's Python API (experimental). One record per graph.

    Refuses (EngineError) when the cache already holds the graph's engines for another key, unless `rebuild`, which
    removes them first. `dry_run`: only the profiles and options, checking nothing of the machine (no GPU needed)."""
    from tqdm import tqdm

    from .manifest import load_manifest

    bundle = Path(bundle)
    m = load_manifest(bundle, verify="none" if dry_run else "full")
    profs = profiles(m, limits)
    cache = Path(out) if out is not None else default_cache(bundle)
    if cache.resolve() == bundle.resolve() or bundle.resolve() in cache.resolve().parents:
        raise InputError(f"--out {cache}: engines go beside the bundle, not inside it (its manifest lists its files)")
    if dry_run:
        return [{"graph": g, "precision": graph_precision(m.graphs[g]), "cache": str(cache),
                 "onnx_sha256": graph_sha256(m, g), "profile": p.option_strings(),
                 "providers": provider_options("tensorrt", g, graph_precision(m.graphs[g]), p, cache / "<key>",
                                               device_id)} for g, p in profs.items()]
    check_provider("tensorrt")
    gpu = probe_gpu(device_id)
    trt_version = tensorrt_version()
    import onnxruntime as ort

    keys = {g: engine_key(m, g, p, gpu.compute_capability, trt_version, ort.__version__) for g, p in profs.items()}
    here = str(bundle.resolve())
    todo = {}
    for graph, key in keys.items():  # every graph is checked before anything is built or removed
        if (cache / key.folder / ENGINE_FILE).is_file() and not rebuild:
            check_engine(cache, key)  # raises when its files are not the ones built
            continue
        found = engine_records(cache, graph)
        if found and not rebuild:
            check_engine(cache, key)  # raises: the other keys' engines, and what differs
        # --rebuild replaces this bundle's engines (by its path), never another bundle's in a shared folder; and
        # whatever a stopped build left in this key's folder
        todo[graph] = {f for f, rec in found if rec is None or rec.get("bundle") == here} | {cache / key.folder}
    records = [{**keys[g].to_json(), "status": "up to date"} for g in keys if g not in todo]
    for graph in tqdm(list(todo), desc="engines", unit="graph", disable=not progress):
        key, prof, spec = keys[graph], profs[graph], m.graphs[graph]
        for old in todo[graph]:
            shutil.rmtree(old, ignore_errors=True)
        folder = cache / key.folder
        folder.mkdir(parents=True)
        sess = ort.InferenceSession(str(bundle / spec.file), ort.SessionOptions(),
                                    providers=provider_options("tensorrt", graph, key.precision, prof, folder,
                                                               device_id))
        if sess.get_providers()[0] != "TensorrtExecutionProvider":
            raise GpuError(f"{spec.file}: onnxruntime did not run it on TensorRT ({sess.get_providers()})")
        del sess  # with complete explicit profiles the engines are built as the session is created
        if not any(p.suffix == ".engine" for p in folder.iterdir()):
            raise GpuError(f"{spec.file}: onnxruntime's TensorRT provider wrote no engine into {folder}")
        if native:
            build_native_plan(bundle / spec.file, prof, folder / f"{graph}.plan", folder / "native.timing")
        record = {**key.to_json(), "bundle": here, "gpu": gpu.name,
                  "files": {n: size for n, (size, _) in engine_files(folder).items()}, "status": "built"}
        tmp = folder / (ENGINE_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, folder / ENGINE_FILE)  # last: a build that stopped part-way has no record, so is not used
        records.append(record)
    return records


def build_native_plan(onnx_path: Path, profile: Profile, dest: Path, timing: Path) -> None:
    """EXPERIMENTAL, never run here (no GPU): a TensorRT plan of the graph at `onnx_path` through TensorRT's Python
    API, as a strongly typed network (the graph's own types decide every layer's precision; explicit Q/DQ needs no
    INT8 flag and no calibrator), with `profile` as its one optimization profile and a timing cache at `timing`."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path: external data is read beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GpuError(f"{onnx_path.name}: TensorRT's ONNX parser refused it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, DEVICE_COSTS["trt_workspace"][0])
    p = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        p.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(p)
    cache = config.create_timing_cache(timing.read_bytes() if timing.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GpuError(f"{onnx_path.name}: TensorRT built no plan (its log above says why)")
    dest.write_bytes(bytes(plan))
    timing.write_bytes(bytes(config.get_timing_cache().serialize()))
