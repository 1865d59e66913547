"""Facts about the machine and this process that every figure is recorded with: CPU model and ISA flags, package
versions, peak resident memory, sizes on disk."""

from __future__ import annotations

import os
import platform
import resource
from importlib import metadata
from pathlib import Path

# the CPU features that decide which kernels onnxruntime and PyTorch run (recorded with every figure)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a worker
    started from a large parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: `5` to /proc/self/clear_refs), so that the next
    `peak_rss_mb` is the peak of what follows; False when the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(packages=("omniguard-edge", "onnxruntime", "numpy", "torch", "transformers")) -> dict:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_flags() -> list[str]:
    """The instruction-set extensions of ISA_FLAGS this CPU reports (/proc/cpuinfo), sorted."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in ISA_FLAGS if f in have)
    except OSError:
        pass
    return []


def system_info(threads: int) -> dict:
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions()}


def same_machine(a: dict, b: dict) -> bool:
    """Seconds are comparable only between runs on the same CPU model, ISA flags and thread count."""
    return all(a.get(k) == b.get(k) for k in ("cpu", "cpu_flags", "threads"))


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), or 64 MiB when it says nothing."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()
            sizes.append(int(text[:-1]) * {"K": 1024, "M": 1024**2}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            pass
    return max(sizes, default=64 * 1024**2)


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6
