"""Shared pieces of the benchmark scripts: statistics, the machine probe, system facts, the
baseline gate, tables and plots. Kept free of torch so the runtime side can be measured alone."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import time
from importlib import metadata
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1


def summarize(samples: list[float]) -> dict:
    """min, p50, p95 (and p99 once there are >= 100 samples, where it means something), in seconds."""
    arr = np.asarray(samples, dtype=np.float64)
    out = {"n": int(arr.size), "min": float(arr.min()), "p50": float(np.percentile(arr, 50)),
           "p95": float(np.percentile(arr, 95)), "mean": float(arr.mean())}
    if arr.size >= 100:
        out["p99"] = float(np.percentile(arr, 99))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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


def system_info(threads: int) -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions()}


def probe(seconds: float = 1.0) -> dict:
    """This machine's memory bandwidth (large array copy, read + write bytes) and float32 matmul rate.

    They bound decode (bytes read per token / bandwidth) and prefill (2 * params * tokens / FLOP/s).
    """
    src = np.ones(64 * 1024 * 1024 // 4, dtype=np.float32)  # 64 MiB: well past the caches
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best_bw, end = 0.0, time.perf_counter() + seconds / 2
    while time.perf_counter() < end:
        t = time.perf_counter()
        np.copyto(dst, src)
        best_bw = max(best_bw, 2 * src.nbytes / (time.perf_counter() - t))
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    a @ a
    best_mm, end = 0.0, time.perf_counter() + seconds / 2
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ a
        best_mm = max(best_mm, 2 * 1024**3 / (time.perf_counter() - t))
    return {"bandwidth_gb_s": best_bw / 1e9, "matmul_gflop_s": best_mm / 1e9}


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def write_json(path: Path | None, doc: dict) -> None:
    text = json.dumps(doc, indent=2, sort_keys=True)
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- baseline gate ----------------------------------------------------------------------------------

def compare_to_baseline(current: dict[str, float], baseline: dict[str, float], tolerance: float,
                        higher_is_better: set[str] = frozenset()) -> list[str]:
    """Metrics that regressed by more than `tolerance` (a fraction: 0.1 = 10 %), as readable lines.

    Metrics are lower-is-better unless named in `higher_is_better`. A metric missing on either side is
    skipped (and reported by the caller as not compared).
    """
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    problems = []
    for key, base in sorted(baseline.items()):
        cur = current.get(key)
        if cur is None or base is None or not math.isfinite(cur) or not math.isfinite(base) or base == 0:
            continue
        if key in higher_is_better:
            worse = cur < base * (1 - tolerance)
            change = cur / base - 1
        else:
            worse = cur > base * (1 + tolerance)
            change = cur / base - 1
        if worse:
            direction = "higher is better" if key in higher_is_better else "lower is better"
            problems.append(f"{key}: {cur:.4g} vs baseline {base:.4g} ({change:+.1%}, tolerance {tolerance:.0%}, "
                            f"{direction})")
    return problems


def report_gate(problems: list[str], baseline: Path, tolerance: float) -> int:
    """Print the gate's outcome; the exit code (1 on any regression)."""
    if problems:
        print(f"\nREGRESSION against {baseline}:\n  " + "\n  ".join(problems))
        return 1
    print(f"\nno regression beyond {tolerance:.0%} against {baseline}")
    return 0


def plot_stages(path: Path, rows: list[dict], stages: list[str], title: str) -> None:
    """Stacked horizontal bars of per-stage p50 seconds, one bar per scenario and engine."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'omniguard-edge[bench]'") from exc
    labels = [f"{r['scenario']} ({r['engine']})" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    left = np.zeros(len(rows))
    for stage in stages:
        vals = np.array([r["stages"].get(stage, {}).get("p50", 0.0) for r in rows])
        ax.barh(labels, vals, left=left, label=stage)
        left += vals
    ax.set_xlabel("seconds (p50)")
    ax.set_title(title)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
