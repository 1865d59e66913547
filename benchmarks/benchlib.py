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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# 2: like-for-like stage definitions (STAGE_DEFINITIONS), engine-identity keys, noise-aware gates, probe bounds
SCHEMA_VERSION = 2
# the CPU features that decide which kernels onnxruntime and PyTorch run (recorded with every figure)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def summarize(samples: list[float]) -> dict:
    """min, p50, p95, max (and p99 once there are >= 100 samples, where it means something), in seconds."""
    arr = np.asarray(samples, dtype=np.float64)
    out = {"n": int(arr.size), "min": float(arr.min()), "p50": float(np.percentile(arr, 50)),
           "p95": float(np.percentile(arr, 95)), "max": float(arr.max()), "mean": float(arr.mean())}
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


def guard_text(text=None, response=None, image=None, video=None, audio=None) -> str:
    """The guard's text for a request given as the Guard's keyword arguments, composed by the runtime's own
    functions, so the PyTorch reference of both benchmarks is sent exactly what the Guard renders."""
    from omniguard_edge.runtime.prompt import Conversation, Policy, compose_guard_text, keyword_media

    kinds = [k for k, _ in keyword_media(image=image, video=video, audio=audio)]
    return compose_guard_text(Conversation.of_optional(text, response), kinds, Policy())


def _ort_matmul(a_shape: tuple, weight: np.ndarray, threads: int):
    """A one-MatMul onnxruntime session whose right operand is a constant initializer, as every weight of a
    bundle's graphs is: onnxruntime may pre-pack it once at load, as it does for the decoder's weights, so the
    probe runs the same kernels the decoder does (a weight fed as a graph input is repacked on every call
    and understates the machine)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _best(fn, seconds: float, min_calls: int = 5) -> float:
    """Fastest of the calls made within `seconds` (at least `min_calls`), after one warm-up call."""
    fn()
    best, calls, end = float("inf"), 0, time.perf_counter() + seconds
    while calls < min_calls or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        calls += 1
    return best


def probe(seconds: float = 1.0, threads: int | None = None) -> dict:
    """Upper bounds of this machine for the engine under test: memory read bandwidth and float32 MatMul rate,
    measured with onnxruntime on `threads` threads, with constant weights (initializers) as a bundle has.

    - bandwidth: a 1x4096 @ 4096x16384 MatMul (a 256 MiB weight, far beyond any cache), what a decode step does
      to each weight: read it once. Decode cannot run faster than weight bytes / this bandwidth.
    - compute: a 2048x2048 @ 2048x2048 MatMul (17 GFLOP a call). Prefill needs at least 2 FLOPs per weight per
      prompt token, so it cannot take less than those FLOPs / this rate.
    Each figure is the best of several calls; `check_bounds` flags any measured stage that beats them."""
    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)

    def best_time(a: np.ndarray, weight: np.ndarray) -> float:  # the session (and its weight copy) dies here
        session = _ort_matmul(a.shape, weight, threads)
        return _best(lambda: session.run(None, {"a": a}), seconds / 2)

    big = rng.standard_normal((4096, 16384), dtype=np.float32)  # 256 MiB
    nbytes = big.nbytes
    t_bw = best_time(rng.standard_normal((1, 4096), dtype=np.float32), big)
    del big
    t_mm = best_time(rng.standard_normal((2048, 2048), dtype=np.float32),
                     rng.standard_normal((2048, 2048), dtype=np.float32))
    return {"bandwidth_gb_s": nbytes / t_bw / 1e9, "matmul_gflop_s": 2 * 2048**3 / t_mm / 1e9, "threads": threads,
            "method": "onnxruntime CPU, constant weights (initializers): read bandwidth from a 1x4096 @ 4096x16384 "
                      "(256 MiB) MatMul, FLOP/s from a 2048^3 MatMul; best of >= 5 calls"}


def vision_flops(vision, grids) -> float:
    """Useful FLOPs of one vision encoder call over `grids` ([t, h, w] patches each): patch embedding, each block's
    projections and MLP, attention within the real windows (windowed blocks) or frames (full-attention blocks),
    no padding, and the 2x2 merger. `vision`: the manifest's vision section (an export without intermediate_size
    is taken at 4 x width)."""
    from omniguard_edge.runtime.positions import vision_index

    d, depth = int(vision["hidden_size"]), int(vision["depth"])
    ffn = int(vision.get("intermediate_size") or 4 * d)
    row = int(vision["in_channels"]) * int(vision["temporal_patch_size"]) * int(vision["patch_size"]) ** 2
    merge2 = int(vision["spatial_merge_size"]) ** 2
    idx = vision_index([tuple(g) for g in grids], int(vision["spatial_merge_size"]), int(vision["window_size"]),
                       int(vision["patch_size"]))
    patches = int(idx.win_lens.sum())
    full = len(vision["fullatt_block_indexes"])
    flops = 2 * patches * row * d + depth * 2 * patches * (4 * d * d + 3 * d * ffn)
    # scores and weighted values: 2 x 2 x len^2 x width per segment
    flops += 4 * d * ((depth - full) * float((idx.win_lens.astype(float) ** 2).sum())
                      + full * float((idx.full_lens.astype(float) ** 2).sum()))
    tokens = patches // merge2
    return flops + 2 * tokens * (merge2 * d * merge2 * d + merge2 * d * int(vision["out_hidden_size"]))


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def finite_or_none(obj):
    """The document with every NaN or infinity replaced by None: JSON has no NaN, and a reader must see
    'undefined', not a number."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: Path | None, doc: dict) -> None:
    text = json.dumps(finite_or_none(doc), indent=2, sort_keys=True, allow_nan=False)
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

@dataclass(frozen=True)
class Metric:
    """One gated figure. `tolerance` is a fraction of the baseline (relative) or, with `absolute`, a plain
    difference (rates, probabilities: a relative bound is meaningless near 0). `best` is the current run's
    best sample (fastest time, highest rate) when there are several: a timing regresses only when its median
    AND its best run are both beyond the tolerance, the best against the baseline's best (see `_regressed`)."""

    value: float | None
    tolerance: float
    higher_is_better: bool = False
    absolute: bool = False
    best: float | None = None
    floor: float = 0.0  # the smallest difference (in the metric's units) that counts: timer and scheduler noise

    def describe(self) -> str:
        kind = f"{self.tolerance:g} absolute" if self.absolute else f"{self.tolerance:.0%}"
        return f"tolerance {kind}, {'higher' if self.higher_is_better else 'lower'} is better"


@dataclass
class GateResult:
    problems: list[str] = field(default_factory=list)  # regressions and refusals: the gate fails
    notes: list[str] = field(default_factory=list)  # what was not compared, and why
    compared: int = 0
    regressed: dict[str, str] = field(default_factory=dict)  # metric key -> its problem (also in `problems`)


def _beyond(v: float, base: float, tol: float, higher_is_better: bool, absolute: bool, floor: float = 0.0) -> bool:
    if abs(v - base) <= floor:
        return False
    if absolute:
        return v < base - tol if higher_is_better else v > base + tol
    if base == 0:
        return (not higher_is_better) and v > 0  # from nothing to something: no fraction applies
    return v < base * (1 - tol) if higher_is_better else v > base * (1 + tol)


def _regressed(cur: Metric, base: float, base_best: float | None = None) -> tuple[bool, str]:
    """(regressed, why not when only the median moved). Timings on a shared machine only ever gain time from
    other work (a preempted thread, a page fault), so the fastest of several runs is the estimate of a
    build's cost that noise disturbs least (the reasoning of Python's `timeit`: the minimum, not the mean).
    A real slowdown moves every run, the fastest included; noise that hits some runs moves the median only.
    So a timing regresses when its median is beyond the tolerance of the baseline's median AND its best run
    is beyond the tolerance of the baseline's best run; each difference must also exceed `floor`. Without
    the baseline's best: the best run must be worse than the baseline's median."""
    hib = cur.higher_is_better
    if not _beyond(cur.value, base, cur.tolerance, hib, cur.absolute, cur.floor):
        return False, ""
    if cur.best is None or not math.isfinite(cur.best):
        return True, ""
    if base_best is not None and math.isfinite(base_best):
        if _beyond(cur.best, base_best, cur.tolerance, hib, cur.absolute, cur.floor):
            return True, ""
        return False, (f"median {cur.value:.4g} vs {base:.4g} is beyond the tolerance, the best run {cur.best:.4g} vs "
                       f"{base_best:.4g} is within it (or within the floor): some runs were disturbed, not counted "
                       "as a regression")
    if cur.best < base if hib else cur.best > base:
        return True, ""
    return False, (f"median {cur.value:.4g} vs {base:.4g} is beyond the tolerance, the best run {cur.best:.4g} "
                   "is not worse than the baseline's median: not counted as a regression")


def compare_metrics(current: dict[str, Metric], baseline: dict[str, float | None],
                    require_all: bool = False, baseline_best: dict[str, float | None] | None = None) -> GateResult:
    """Every metric of the baseline against this run. A metric that was defined in the baseline and is
    undefined (None) or non-finite now is a problem; one missing on either side is noted, not compared (with
    `require_all`, one the baseline has and this run lacks is a problem); if no metric is shared at all the
    gate fails ("nothing to compare") instead of passing vacuously. `baseline_best`: the baseline's best run
    per metric, for timings measured several times (`_regressed`)."""
    out = GateResult()
    for key in sorted(set(current) | set(baseline)):
        if key not in current and require_all and baseline[key] is not None:
            out.problems.append(f"{key}: in the baseline ({baseline[key]:.4g}) but not measured in this run")
            continue
        if key not in current or key not in baseline:
            out.notes.append(f"{key}: only in the {'baseline' if key in baseline else 'current run'}, not compared")
            continue
        cur, base = current[key], baseline[key]
        if base is not None and not math.isfinite(base):
            base = None  # a NaN baseline compares false with everything: it would pass any value
        if base is None and cur.value is None:
            out.notes.append(f"{key}: undefined in both runs")
            continue
        if base is None:
            out.notes.append(f"{key}: undefined in the baseline, {cur.value:.4g} now; not compared")
            continue
        out.compared += 1
        if cur.value is None or not math.isfinite(cur.value):
            out.problems.append(f"{key}: {cur.value} now, {base:.4g} in the baseline (the metric became undefined)")
        else:
            regressed, why_not = _regressed(cur, base, (baseline_best or {}).get(key))
            if regressed:
                change = f"{cur.value - base:+.4g}" if cur.absolute or base == 0 else f"{cur.value / base - 1:+.1%}"
                best = f", best run {cur.best:.4g}" if cur.best is not None else ""
                out.regressed[key] = f"{key}: {cur.value:.4g} vs baseline {base:.4g} ({change}{best}; {cur.describe()})"
                out.problems.append(out.regressed[key])
            elif why_not:
                out.notes.append(f"{key}: {why_not}")
    if out.compared == 0:
        out.problems.append("nothing to compare: the baseline and this run share no metric (see the notes)")
    return out


def report_gate(result: GateResult, baseline: Path) -> int:
    """Print the gate's outcome; the exit code (1 on any problem)."""
    for note in result.notes:
        print(f"  note: {note}")
    if result.problems:
        print(f"\nREGRESSION against {baseline}:\n  " + "\n  ".join(result.problems))
        return 1
    print(f"\nno regression against {baseline} ({result.compared} metrics compared)")
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
