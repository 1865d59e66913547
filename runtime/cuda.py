"""What the machine has: cuda-python's runtime, the GPU (name, compute capability, memory) and TensorRT's version,
checked; a GpuError says what to install. The bottom of the GPU seam: it imports nothing of the runtime but its
errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from .errors import GpuError

TENSORRT_SUPPORTED = "TensorRT 10.3 or later 10.x (JetPack 6.1/6.2 ship 10.3), or 11.x"


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


def require_cuda_runtime():
    """cuda-python's runtime module; GpuError when it is not installed (the native TensorRT backend needs it)."""
    cudart = cuda_runtime()
    if cudart is None:
        raise GpuError("the native TensorRT backend needs cuda-python (pip install cuda-python)")
    return cudart
