"""Latency of the torch-free runtime, per stage, side by side with the PyTorch reference.

    python -m benchmarks.latency --bundle BUNDLE [--reference CHECKPOINT] [--runs 5] [--warmup 3]
        [--threads N] [--new-tokens 32] [--json out.json] [--plot out.png]
        [--baseline baseline.json --tolerance 0.15]

(from the repository root; `python benchmarks/latency.py ...` runs the same). Stages are defined identically for
both engines (stages.STAGE_DEFINITIONS, written into the JSON and docs/benchmarks.md); seconds, min/p50/p95/max
over --runs after --warmup. Random reference weights never stop on their own, so answers are fixed budgets (EOS
masked, as transformers' min_new_tokens does, on both sides).

The baseline gate (--baseline; stages.latency_gate) compares the runtime's own figures (encoders, prefill, time to
first token and to verdict, total, decode tok/s) when the baseline comes from the same CPU model, ISA flags and
thread count, and only runtime/PyTorch ratios when it comes from another machine; never PyTorch's seconds. Stages
under --floor seconds on both sides are timer noise and are not compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

if not __package__:  # run by path: import the package from the repository root, as `python -m` does
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "benchmarks"

from . import SCHEMA_VERSION, analysis, engines, probe, report, scenarios  # noqa: E402
from .gate import load_baseline, report_gate  # noqa: E402
from .stages import CHART_STAGES, STAGE_DEFINITIONS, latency_gate  # noqa: E402
from .system import dir_size_mb, peak_rss_mb, system_info  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--reference", type=Path, help="checkpoint to run through PyTorch + transformers too")
    p.add_argument("--scenarios", nargs="+", help="subset of scenarios (default: all)")
    p.add_argument("--runs", type=int, default=5)
    # A process's first requests run slower while glibc's allocator raises its mmap threshold to the sizes it has
    # seen (tiny, text prefill by call: 46-69, 12-18, 11-15, 8-11 ms, then 7-10 ms; with the threshold fixed by
    # MALLOC_MMAP_THRESHOLD_ the tail after the first call is gone). Three warm-up calls per scenario reach that.
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per scenario and engine first (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, both engines")
    p.add_argument("--reference-device", default="cpu", help="torch device of the PyTorch reference (cpu, cuda)")
    p.add_argument("--reference-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the PyTorch reference's precision (default float32, the parity reference)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt", "tensorrt-native"], default="cpu",
                   help="where the runtime's graphs run (default cpu; tensorrt needs build-engines first); the rows "
                        "record the providers actually used")
    p.add_argument("--new-tokens", type=int, default=32, help="answer length budget (full critique)")
    p.add_argument("--verdict-tokens", type=int, default=4, help="tokens that carry the verdict and categories")
    p.add_argument("--media-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "omniguard-edge" / "bench-media")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a PNG chart of the per-stage breakdown")
    p.add_argument("--baseline", type=Path, help="fail when a metric regresses beyond --tolerance")
    p.add_argument("--tolerance", type=float, default=0.15, help="allowed regression, a fraction (0.15 = 15%%)")
    p.add_argument("--floor", type=float, default=0.005,
                   help="seconds under which a stage is timer noise: not gated, no ratio (default 0.005)")
    p.add_argument("--probe-seconds", type=float, default=1.0)
    p.add_argument("--peers", nargs="+", choices=["ort-genai", "none"], default=None,
                   help="peer engines on the text scenarios (ort-genai: onnxruntime-genai fp32 and int4 models built by "
                        "its own builder from --reference's text decoder; pip install 'omniguard-edge[peer]'). "
                        "Default: ort-genai when --reference is given and onnxruntime-genai is installed; none: off")
    p.add_argument("--peer-dir", type=Path, help="where peer models are built and kept (default: beside the bundle)")
    p.add_argument("--compare", type=Path, nargs="+", default=[], metavar="BUNDLE",
                   help="more bundles (e.g. `omniguard-edge quantize` recipes of --bundle) timed in the same run, "
                        "their rows named runtime:RECIPE and runtime-default:RECIPE, with a side-by-side table")
    return p


def checked_args(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """The arguments, checked before minutes of measuring, not after; the peer's default settled."""
    args = p.parse_args(argv)
    if importlib.util.find_spec("onnx") is None:
        p.error("the machine probe builds its graphs with onnx: pip install 'omniguard-edge[bench]'")
    if args.runs < 1 or args.warmup < 0 or args.new_tokens < args.verdict_tokens or args.verdict_tokens < 1:
        p.error("need --runs >= 1, --warmup >= 0 and 1 <= --verdict-tokens <= --new-tokens")
    if not (args.tolerance >= 0 and args.floor >= 0):
        p.error("--tolerance and --floor must be >= 0")
    if args.peers is None:  # by default, the peer runs wherever it can
        available = importlib.util.find_spec("onnxruntime_genai") is not None
        args.peers = ["ort-genai"] if args.reference and available else []
        if args.reference and not available:
            print("note: no peer engine: onnxruntime-genai is not installed (pip install 'omniguard-edge[peer]')")
    args.peers = [x for x in args.peers if x != "none"]
    if args.peers:
        if not args.reference:
            p.error("--peers builds the peer's models from the checkpoint: pass --reference CHECKPOINT")
        missing = [m for m in ("onnxruntime_genai", "torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            p.error(f"--peers ort-genai needs {', '.join(missing)}: pip install 'omniguard-edge[peer]' "
                    "(onnxruntime-genai; its model builder needs the export extra's torch and transformers)")
    return args


def measure(args, chosen: dict, names: list[tuple[str, bool | None]]) -> dict:
    """Every engine over the chosen scenarios, the machine probe, and the figures derived from them: the result."""
    rows, runtime_info = engines.run_runtime(args.bundle, chosen, args)
    compared = [engines.compare_bundle(b, name, gate, chosen, args) for b, (name, gate) in zip(args.compare, names)]
    for c in compared:
        rows += c.pop("rows")
    # the runtime's whole run, compared bundles included (the PyTorch and peer sides run in their own processes)
    runtime_peak = max([peak_rss_mb()] + [r["peak_rss_mb"] for r in rows if "peak_rss_mb" in r])
    text_prompts = runtime_info.pop("text_prompts")
    ref_info = peer_info = None
    if args.reference:
        ref_rows, ref_info = engines.run_reference(args.reference, chosen, args)
        rows += ref_rows
    if args.peers:
        peer_rows, peer_info = engines.run_peer(args, chosen, text_prompts, rows)
        rows += peer_rows
    machine = probe.probe(args.probe_seconds, args.threads)
    doc = {"schema_version": SCHEMA_VERSION, "kind": "latency", "system": system_info(args.threads),
           "probe": machine, "runs": args.runs, "warmup": args.warmup,
           "budgets": {"new_tokens": args.new_tokens, "verdict_tokens": args.verdict_tokens},
           "bundle": {"path": str(args.bundle), "size_mb": dir_size_mb(args.bundle), **runtime_info},
           "runtime_peak_rss_mb": runtime_peak, "reference": ref_info, "peers": peer_info, "rows": rows,
           "stage_definitions": STAGE_DEFINITIONS, "gate": {"floor_s": args.floor, "tolerance": args.tolerance},
           "speedups": analysis.speedups(rows, args.floor), "speedups_best": analysis.speedups(rows, args.floor, "min"),
           "time_to_verdict": analysis.time_to_verdict(rows), "peer_comparison": analysis.peer_comparison(rows)}
    doc["recipes"] = analysis.recipes_table(doc, compared) if compared else None
    doc["bounds"] = analysis.bounds(args.bundle, rows, machine)
    return doc


def gate(args, doc: dict, base: dict, chosen: dict) -> int:
    """The baseline gate on `doc`, a regressed scenario's runtime measured again first; its outcome written into the
    JSON; the exit code."""
    def remeasure(again: list[str]) -> dict:
        rows, _ = engines.run_runtime(args.bundle, {k: chosen[k] for k in again}, args)
        doc["gate"]["confirmation"] = {"scenarios": again, "rows": rows}
        kept = [r for r in doc["rows"] if not (r["engine"] == "runtime" and r["scenario"] in again)]
        return dict(doc, rows=kept + rows)

    result = latency_gate(args.tolerance, args.floor).judge(doc, base, remeasure)
    if "confirmation" in doc["gate"]:
        doc["gate"]["confirmation"]["confirmed"] = sorted(result.regressed)
    doc["gate"].update(regressions=result.problems, notes=result.notes)
    report.write_json(args.json, doc)
    return report_gate(result, args.baseline)


def main(argv=None) -> int:
    p = parser()
    args = checked_args(p, argv)
    base = load_baseline(p, args.baseline)
    try:
        names = engines.compared_names(args.bundle, args.compare)
    except ValueError as exc:
        p.error(str(exc))
    allowed = scenarios.build(args.media_dir)
    unknown = set(args.scenarios or []) - set(allowed)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {sorted(allowed)}")
    chosen = {k: v for k, v in allowed.items() if not args.scenarios or k in args.scenarios}
    doc = measure(args, chosen, names)
    report.print_latency(doc)
    report.write_json(args.json, doc)  # first, so that nothing after it can lose the measurement
    if args.plot:
        report.plot_stages(args.plot, doc["rows"], CHART_STAGES,
                           f"time to first token by stage ({doc['system']['cpu']})")
    return 0 if base is None else gate(args, doc, base, chosen)


if __name__ == "__main__":
    sys.exit(main())
