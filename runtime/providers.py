"""Where the graphs run: the one option (`--provider cpu|cuda|tensorrt|tensorrt-native`) as onnxruntime provider
chains, each provider's options per graph (precision flags, engine and timing caches, profiles), and what
open_bundle needs under a GPU provider, engines checked before any session opens. Above engines.py and cuda.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .checked import is_int
from .cuda import probe_gpu, require_cuda_runtime, tensorrt_version
from .devices import DEVICE_COSTS
from .engines import Profile, check_engine, engine_key, graph_precision, profiles
from .errors import EngineError, GpuError, InputError
from .trt_native import NAME as NATIVE

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    # experimental, never run: build-engines --native's plans through TensorRT's Python API (runtime/trt_native.py)
    "tensorrt-native": (NATIVE, "CUDAExecutionProvider", "CPUExecutionProvider"),
}
def provider_chain(provider: str) -> tuple[str, ...]:
    if provider not in PROVIDERS:
        raise InputError(f"--provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    return PROVIDERS[provider]


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


def provider_options(provider: str, graph: str, precision: str, profile: Profile | None = None,
                     cache: Path | None = None, device_id: int = 0) -> list:
    """onnxruntime's `providers` argument for one graph: [(name, options), ...] in preference order.

    TensorRT: the graphs carry their precision in their types (fp16 tensors, Q/DQ nodes, INT4 DequantizeLinear), so
    no precision flag lets TensorRT lower an fp32 island (norms, softmax) to fp16; INT8 Q/DQ graphs set
    trt_int8_enable, which onnxruntime's TensorRT provider documents for Q/DQ models (no calibration table). Engines
    and the timing cache go to `cache` (required). CUDA: exact fp32 (no TF32, so an fp32 bundle keeps parity with
    the CPU), arena grown by what is asked (a Jetson shares its memory), heuristic convolution search."""
    chain = provider_chain(provider)
    if not is_int(device_id) or device_id < 0:
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


def check_provider(provider: str) -> None:
    """GpuError when this onnxruntime build lacks the provider (the CPU wheel has neither GPU provider), or for the
    native backend when cuda-python or TensorRT is missing."""
    import onnxruntime as ort

    if provider == "tensorrt-native":
        require_cuda_runtime()
        tensorrt_version()
        return
    wanted = provider_chain(provider)[0]
    if wanted not in ort.get_available_providers():
        raise GpuError(f"onnxruntime {ort.__version__} here has no {wanted} (available: "
                       f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu (Jetson: NVIDIA's "
                       "aarch64 build for JetPack 6, docs/gpu.md \"Jetson install\") in place of onnxruntime")


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
