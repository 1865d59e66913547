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
    """This process's peak resident memory. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a worker
    started from a large parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
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


def _ort_session(node: str, inputs: list, threads: int):
    """A one-node onnxruntime graph (the engine under test measures the machine)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n, shape in inputs]
    graph = helper.make_graph([helper.make_node(node, [n for n, _ in inputs], ["y"])], "probe", ins,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _best(fn, seconds: float) -> float:
    fn()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def probe(seconds: float = 1.0, threads: int | None = None) -> dict:
    """Memory read bandwidth and float32 matmul rate of this machine, measured with onnxruntime on
    `threads` threads (the engine and thread count being benchmarked): a vector-matrix product over a
    256 MiB weight (what a decode step does to every weight: read it once) and a 2048^3 MatMul. They
    bound decode (weight bytes per token / bandwidth) and prefill (2 x parameters x tokens / FLOP/s)."""
    threads = threads or os.cpu_count() or 1
    x = np.ones((1, 4096), dtype=np.float32)
    big = np.ones((4096, 16384), dtype=np.float32)  # 256 MiB
    gemv = _ort_session("MatMul", [("x", x.shape), ("w", big.shape)], threads)
    t_bw = _best(lambda: gemv.run(None, {"x": x, "w": big}), seconds / 2)
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    matmul = _ort_session("MatMul", [("a", a.shape), ("b", a.shape)], threads)
    t_mm = _best(lambda: matmul.run(None, {"a": a, "b": a}), seconds / 2)
    return {"bandwidth_gb_s": big.nbytes / t_bw / 1e9, "matmul_gflop_s": 2 * 2048**3 / t_mm / 1e9,
            "threads": threads, "method": "onnxruntime CPU: 1x4096 @ 4096x16384 (256 MiB) MatMul for bandwidth, "
                                          "2048^3 MatMul for FLOP/s; best of runs"}


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
