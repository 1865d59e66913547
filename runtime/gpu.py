"""The GPU seam's public names, for code that imports them from here (`omniguard_edge.runtime.gpu`). They live,
bottom up, in cuda.py (the machine: GPU, cuda-python, TensorRT version), engines.py (TensorRT profiles, engine
keys and checks), providers.py (provider chains, per-graph options, what open_bundle needs) and engine_build.py
(build-engines)."""

from .cuda import GpuInfo, TENSORRT_SUPPORTED, check_tensorrt_version, cuda_runtime, probe_gpu, tensorrt_version  # noqa: F401
from .engine_build import build_engines, build_native_plan  # noqa: F401
from .errors import EngineError, GpuError  # noqa: F401
from .engines import (AUDIO_CLIPS, ENGINE_FILE, GRAPHS, OPT, VISION_FRAMES, EngineKey, Profile, Profiled,  # noqa: F401
                      check_engine, check_unchanged, default_cache, engine_files, engine_key, engine_records,
                      graph_precision, graph_sha256, profiles)
from .providers import (PROVIDERS, GpuSetup, check_provider, environment_error, provider_chain,  # noqa: F401
                        provider_options, session_providers)
