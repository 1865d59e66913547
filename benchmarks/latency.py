"""Latency of the torch-free runtime, per stage, side by side with the PyTorch reference.

    python benchmarks/latency.py --bundle BUNDLE [--reference CHECKPOINT] [--runs 5] [--warmup 1]
        [--threads N] [--new-tokens 32] [--json out.json] [--plot out.png]
        [--baseline baseline.json --tolerance 0.15]

Stages (seconds; p50/p95 over --runs after --warmup): preprocess, vision, audio, embed (prompt, embedding
and merge), prefill, first_token (time to the first generated token, from the call), verdict (time to
the verdict: the first --verdict-tokens tokens), total (the full --new-tokens answer), decode_tok_s.
Random reference weights never stop on their own, so answers are fixed budgets (EOS masked, as
transformers' min_new_tokens does, on both sides). The JSON schema is documented in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402
import scenarios as scenario_defs  # noqa: E402

STAGES = ["preprocess", "vision", "audio", "embed", "prefill", "first_token", "verdict", "total"]
CHART_STAGES = ["preprocess", "vision", "audio", "embed", "prefill"]  # disjoint parts of time to first token


def run_runtime(bundle: Path, chosen: dict, args) -> tuple[list[dict], dict]:
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    opts = GuardOptions(critique=True, critique_max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                        session=SessionOptions(intra_op_threads=args.threads))
    guard = Guard.from_bundle(bundle, opts)
    rows = []
    for sc in chosen.values():
        samples = {k: [] for k in STAGES + ["decode_tok_s"]}
        for run in range(args.warmup + args.runs):
            r = guard.moderate(sc.text, sc.response, image=sc.image, audio=sc.audio, video=sc.video)
            if r.verdict == "error":
                raise SystemExit(f"runtime failed on {sc.name}: {r.error}")
            if run < args.warmup:
                continue
            t = r.timings
            before = sum(t.get(k, 0.0) for k in ("preprocess", "vision", "audio", "embed"))
            for k in ("preprocess", "vision", "audio", "embed", "prefill"):
                samples[k].append(t.get(k, 0.0))
            samples["first_token"].append(before + r.token_times[0])
            samples["verdict"].append(before + r.token_times[min(args.verdict_tokens, len(r.token_times)) - 1])
            samples["total"].append(t["total"])
            span = r.token_times[-1] - r.token_times[0]
            samples["decode_tok_s"].append((len(r.token_times) - 1) / span if span > 0 else float("nan"))
        rows.append({"scenario": sc.name, "engine": "runtime", "prompt_tokens": r.prompt_tokens,
                     "stages": {k: benchlib.summarize(v) for k, v in samples.items()}})
    info = {"providers": guard.bundle.providers, "precision": guard.bundle.manifest.precision}
    return rows, info


def run_reference(checkpoint: Path, chosen: dict, args, guard_texts: dict) -> tuple[list[dict], dict]:
    """Same scenarios through PyTorch, in a separate process."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"threads": args.threads or os.cpu_count(), "warmup": args.warmup, "runs": args.runs,
                "new_tokens": args.new_tokens, "verdict_tokens": args.verdict_tokens,
                "scenarios": [{"name": s.name, "prompt_text": guard_texts[s.name], "image": s.image, "audio": s.audio,
                               "video": s.video} for s in chosen.values()]}
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, str(HERE / "reference_worker.py"), str(checkpoint), str(spec_path),
                               str(out_path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the PyTorch reference failed:\n{proc.stderr[-3000:]}")
        out = json.loads(out_path.read_text())
    rows = [{"scenario": r["scenario"], "engine": "pytorch", "prompt_tokens": r["prompt_tokens"],
             "stages": {k: benchlib.summarize(v) for k, v in r["samples"].items()}} for r in out["rows"]]
    return rows, {"peak_rss_mb": out["peak_rss_mb"], "torch_threads": out["torch_threads"],
                  "config": "fp32, sdpa attention, greedy, PIL image processor, qwen-omni-utils preprocessing"}


def guard_prompt_texts(chosen: dict) -> dict:
    """The exact guard text the runtime sends for each scenario (the reference must send the same)."""
    from omniguard_edge.runtime.prompt import Conversation, Policy, render_guard_text

    return {s.name: render_guard_text(Conversation.of(s.text or "", s.response), Policy()) for s in chosen.values()}


def speedups(rows: list[dict]) -> dict:
    """PyTorch p50 / runtime p50 per scenario and stage (decode: runtime tok/s / PyTorch tok/s)."""
    by = {(r["scenario"], r["engine"]): r for r in rows}
    out = {}
    for (scenario, engine), row in by.items():
        ref = by.get((scenario, "pytorch"))
        if engine != "runtime" or ref is None:
            continue
        ratios = {}
        for stage in ("preprocess", "vision", "audio", "prefill", "first_token", "verdict", "total"):
            a, b = row["stages"].get(stage, {}).get("p50"), ref["stages"].get(stage, {}).get("p50")
            if a and b and a > 1e-6 and b > 1e-6:
                ratios[stage] = b / a
        a, b = row["stages"]["decode_tok_s"]["p50"], ref["stages"]["decode_tok_s"]["p50"]
        ratios["decode_tok_s"] = a / b if b else None
        out[scenario] = ratios
    return out


def bounds(bundle: Path, rows: list[dict], probe: dict) -> dict:
    """Decode vs the bandwidth bound (every decoder weight byte read once per token), prefill vs the
    compute bound (2 FLOPs per weight per prompt token), from the probe's onnxruntime figures."""
    from omniguard_edge.runtime.manifest import load_manifest

    m = load_manifest(bundle, verify="none")
    spec = m.graphs["decoder"]
    weight_bytes = sum(m.files[f].size for f in (spec.file, spec.data_file) if f)
    # prefill runs every weight on every prompt token except the head (last position only);
    # attention score FLOPs are left out, so the bound is slightly optimistic for long prompts
    head = m.decoder["vocab_size"] * m.decoder["hidden_size"]
    params = weight_bytes / 4 - head if m.precision == "fp32" else None
    bound_tok_s = probe["bandwidth_gb_s"] * 1e9 / weight_bytes
    out = {"decoder_weight_bytes": weight_bytes, "bandwidth_bound_tok_s": bound_tok_s, "per_scenario": {}}
    for r in rows:
        if r["engine"] != "runtime":
            continue
        tok_s = r["stages"]["decode_tok_s"]["p50"]
        entry = {"decode_fraction_of_bandwidth_bound": tok_s / bound_tok_s}
        if params:
            flops = 2 * params * r["prompt_tokens"]
            entry["prefill_fraction_of_compute_bound"] = flops / (probe["matmul_gflop_s"] * 1e9) / r["stages"]["prefill"]["p50"]
        out["per_scenario"][r["scenario"]] = entry
    return out


def gate_metrics(doc: dict, same_machine: bool) -> tuple[dict, set]:
    """Flatten what the baseline gate compares: ratios always, seconds only on the same machine."""
    metrics, higher = {}, set()
    for scenario, ratios in doc.get("speedups", {}).items():
        for stage, value in ratios.items():
            if value is not None:
                key = f"speedup/{scenario}/{stage}"
                metrics[key] = value
                higher.add(key)
    if same_machine:
        for r in doc["rows"]:
            for stage, s in r["stages"].items():
                key = f"{r['engine']}/{r['scenario']}/{stage}/p50"
                metrics[key] = s["p50"]
                if stage == "decode_tok_s":
                    higher.add(key)
    return metrics, higher


def check_baseline(doc: dict, baseline_path: Path, tolerance: float) -> list[str]:
    base = json.loads(Path(baseline_path).read_text())
    if base.get("schema_version") != benchlib.SCHEMA_VERSION:
        return [f"baseline schema_version {base.get('schema_version')} != {benchlib.SCHEMA_VERSION}"]
    same = (base["system"]["cpu"], base["system"]["threads"]) == (doc["system"]["cpu"], doc["system"]["threads"])
    cur, higher = gate_metrics(doc, same)
    ref, _ = gate_metrics(base, same)
    if not set(cur) & set(ref):
        return ["nothing to compare: the baseline shares no metric with this run (across machines only "
                "runtime/PyTorch speed-ups are compared: run with --reference on both)"]
    return benchlib.compare_to_baseline(cur, ref, tolerance, higher)


def print_report(doc: dict) -> None:
    rows = []
    for r in doc["rows"]:
        s = r["stages"]
        rows.append([r["scenario"], r["engine"], r["prompt_tokens"]] + [s.get(k, {}).get("p50") for k in STAGES]
                    + [s["decode_tok_s"]["p50"]])
    print(benchlib.markdown_table(["scenario", "engine", "prompt tok"] + [f"{k} s" for k in STAGES] + ["decode tok/s"], rows))
    if doc.get("speedups"):
        print("\nspeed-up (PyTorch p50 / runtime p50; decode: tok/s ratio)\n")
        keys = ["vision", "audio", "prefill", "first_token", "verdict", "total", "decode_tok_s"]
        print(benchlib.markdown_table(["scenario"] + keys,
                                      [[k] + [v.get(s) for s in keys] for k, v in doc["speedups"].items()]))
    b = doc["bounds"]
    print(f"\nmachine: {doc['probe']['bandwidth_gb_s']:.1f} GB/s read bandwidth, {doc['probe']['matmul_gflop_s']:.0f} "
          f"GFLOP/s fp32 matmul; decoder weights {b['decoder_weight_bytes'] / 1e6:.0f} MB -> bandwidth bound "
          f"{b['bandwidth_bound_tok_s']:.1f} tok/s")
    for name, e in b["per_scenario"].items():
        extra = f", prefill {e['prefill_fraction_of_compute_bound']:.0%} of compute bound" if "prefill_fraction_of_compute_bound" in e else ""
        print(f"  {name}: decode {e['decode_fraction_of_bandwidth_bound']:.0%} of bandwidth bound{extra}")
    print(f"\nbudgets: {doc['budgets']['new_tokens']} new tokens per answer, verdict = first "
          f"{doc['budgets']['verdict_tokens']} tokens (fixed: EOS masked); {doc['runs']} runs after {doc['warmup']} warm-up")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--reference", type=Path, help="checkpoint to run through PyTorch + transformers too")
    p.add_argument("--scenarios", nargs="+", help="subset of scenarios (default: all)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, both engines")
    p.add_argument("--new-tokens", type=int, default=32, help="answer length budget (full critique)")
    p.add_argument("--verdict-tokens", type=int, default=4, help="tokens that carry the verdict and categories")
    p.add_argument("--media-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "omniguard-edge" / "bench-media")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a PNG chart of the per-stage breakdown")
    p.add_argument("--baseline", type=Path, help="fail when a metric regresses beyond --tolerance")
    p.add_argument("--tolerance", type=float, default=0.15, help="allowed regression, a fraction (0.15 = 15%%)")
    p.add_argument("--probe-seconds", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.new_tokens < args.verdict_tokens or args.verdict_tokens < 1:
        p.error("need --runs >= 1, --warmup >= 0 and 1 <= --verdict-tokens <= --new-tokens")
    allowed = scenario_defs.build(args.media_dir)
    unknown = set(args.scenarios or []) - set(allowed)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {sorted(allowed)}")
    chosen = {k: v for k, v in allowed.items() if not args.scenarios or k in args.scenarios}
    rows, runtime_info = run_runtime(args.bundle, chosen, args)
    runtime_peak = benchlib.peak_rss_mb()
    ref_info = None
    if args.reference:
        ref_rows, ref_info = run_reference(args.reference, chosen, args, guard_prompt_texts(chosen))
        rows += ref_rows
    probe = benchlib.probe(args.probe_seconds, args.threads)
    doc = {"schema_version": benchlib.SCHEMA_VERSION, "kind": "latency", "system": benchlib.system_info(args.threads),
           "probe": probe, "runs": args.runs, "warmup": args.warmup,
           "budgets": {"new_tokens": args.new_tokens, "verdict_tokens": args.verdict_tokens},
           "bundle": {"path": str(args.bundle), "size_mb": benchlib.dir_size_mb(args.bundle), **runtime_info},
           "runtime_peak_rss_mb": runtime_peak, "reference": ref_info, "rows": rows,
           "speedups": speedups(rows)}
    doc["bounds"] = bounds(args.bundle, rows, probe)
    print_report(doc)
    benchlib.write_json(args.json, doc)
    if args.plot:
        benchlib.plot_stages(args.plot, rows, CHART_STAGES, f"time to first token by stage ({doc['system']['cpu']})")
    if args.baseline:
        return benchlib.report_gate(check_baseline(doc, args.baseline, args.tolerance), args.baseline, args.tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
