"""What the benchmarks show and write: markdown tables, the latency and accuracy reports, JSON without NaN, the
per-stage chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .stages import STAGE_DEFINITIONS, STAGES


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


def print_latency(doc: dict) -> None:
    """latency.py's report on stdout: every row's stages, the comparisons, the probe's bounds and the budgets."""
    rows = []
    for r in doc["rows"]:
        s = r["stages"]
        rows.append([r["scenario"], r["engine"], r["prompt_tokens"]] + [s.get(k, {}).get("p50") for k in STAGES]
                    + [s.get("decode_tok_s", {}).get("p50"), r.get("peak_rss_mb")])
    print(markdown_table(["scenario", "engine", "prompt tok"] + [f"{k} s" for k in STAGES]
                         + ["decode tok/s", "peak RSS MiB"], rows))
    if doc.get("time_to_verdict"):
        print("\ntime to verdict, default mode (runtime-default verdict p50) against PyTorch's time to its first token "
              "(pytorch first_token p50):\n")
        print(markdown_table(
            ["scenario", "runtime-default verdict s", "pytorch first_token s", "speed-up", "cached prompt tok"],
            [[k, v["runtime_default_verdict_p50"], v["pytorch_first_token_p50"], v["speedup"], v["cached_prompt_tokens"]]
             for k, v in doc["time_to_verdict"].items()]))
    print("\nstages (p50 seconds), the same definition for both engines:")
    for k, v in STAGE_DEFINITIONS.items():
        print(f"  {k}: {v}")
    if doc.get("speedups"):
        print(f"\nspeed-up (PyTorch p50 / runtime p50; decode: tok/s ratio; '-': a side under the "
              f"{doc['gate']['floor_s'] * 1e3:g} ms floor)\n")
        keys = ["preprocess", "vision", "audio", "embed", "prefill", "first_token", "verdict", "total", "decode_tok_s"]
        print(markdown_table(["scenario"] + keys, [[k] + [v.get(s) for s in keys] for k, v in doc["speedups"].items()]))
    _print_peer(doc)
    _print_recipes(doc)
    mismatched = [r["scenario"] for r in doc["rows"] if r.get("staged_prefill_matches_generate") is False]
    if mismatched:
        print(f"\nWARNING: PyTorch's staged prefill chose another first token than its generate() in {mismatched}")
    _print_bounds(doc)
    print(f"\nbudgets: {doc['budgets']['new_tokens']} new tokens per answer, verdict = first "
          f"{doc['budgets']['verdict_tokens']} tokens (fixed: EOS masked); {doc['runs']} runs after {doc['warmup']} warm-up; "
          f"CPU {doc['system']['cpu']} ({' '.join(doc['system']['cpu_flags']) or 'flags unknown'}), "
          f"{doc['system']['threads']} threads")


def _print_peer(doc: dict) -> None:
    if not doc.get("peer_comparison"):
        return
    print("\npeer (onnxruntime-genai, same prompt ids, same threads): our default time to verdict against its fp32 "
          "time to first token with its own prefix reuse; decode: our fixed-budget rows against its fp32\n")
    keys = ["runtime_default_verdict_p50", "ort_genai_fp32_reuse_first_token_p50", "verdict_vs_peer_reuse_first_token",
            "ort_genai_fp32_first_token_p50", "runtime_decode_tok_s_p50", "ort_genai_fp32_decode_tok_s_p50",
            "decode_ratio", "tokens_equal", "ort_genai_int4_first_token_p50", "ort_genai_int4_decode_tok_s_p50"]
    print(markdown_table(["scenario"] + keys, [[k] + [v.get(x) for x in keys] for k, v in doc["peer_comparison"].items()]))


def _print_recipes(doc: dict) -> None:
    if not doc.get("recipes"):
        return
    print("\nprecision recipes side by side (same run; vision: fixed-budget rows; verdict: default mode; decode: "
          "fixed-budget rows, every logit)\n")
    scen = sorted({k for e in doc["recipes"].values() for k in e["verdict_s"]})
    headers = ["bundle", "fidelity gate", "size MB", "x fp32", "peak RSS MiB"] + [f"verdict {k} s" for k in scen] + \
        ["vision image_448 s", "vision x fp32", "text decode tok/s", "decode x fp32", "decode x ort-genai int4"]
    table = []
    for name, e in doc["recipes"].items():
        gate = {None: "-", True: "passed", False: "FAILED"}[e["fidelity_gate_passed"]]
        table.append([name, gate, e["size_mb"], e["size_vs_fp32"], e["peak_rss_mb"]] + [e["verdict_s"].get(k) for k in scen]
                     + [e["vision_s"].get("image_448"), e["vision_speedup_vs_fp32"].get("image_448"),
                        e["decode_tok_s"].get("text"), e["text_decode_vs_fp32"], e["text_decode_vs_ort_genai_int4"]])
    print(markdown_table(headers, table))
    flags = [f for f in doc["system"]["cpu_flags"] if "vnni" in f or "amx" in f or f.startswith("avx512")]
    print(f"integer kernels: onnxruntime's MLAS picks its int8 GEMM (DynamicQuantizeMatMul) and int4 "
          f"(MatMulNBits, accuracy level 4: int8 dot products) paths from the CPU's flags at run time; this CPU "
          f"has {' '.join(flags) or 'none of avx512*/vnni/amx'} (which path ran is not reported by onnxruntime)")


def _print_bounds(doc: dict) -> None:
    b = doc["bounds"]
    print(f"\nmachine bounds (probe: onnxruntime, constant weights): {doc['probe']['bandwidth_gb_s']:.1f} GB/s read "
          f"bandwidth, {doc['probe']['matmul_gflop_s']:.0f} GFLOP/s fp32 MatMul; decoder weights "
          f"{b['decoder_weight_bytes'] / 1e6:.0f} MB -> decode bound {b['bandwidth_bound_tok_s']:.1f} tok/s")
    for name, engines in b["per_scenario"].items():
        for engine, e in engines.items():
            if "verdict_compute_floor_s" in e:
                ceiling = e.get("speedup_ceiling_vs_pytorch_first_token")
                print(f"  {name} ({engine}): {e['uncached_prompt_tokens']} uncached prompt tokens need "
                      f"{e['verdict_compute_floor_s']:.3f} s at the fp32 MatMul rate; the best verdict is at "
                      f"{e['verdict_fraction_of_compute_bound']:.0%} of that bound"
                      + (f"; at that rate no fp32 engine here could be more than {ceiling:.1f}x faster than "
                         "PyTorch's first token" if ceiling else ""))
                continue
            dec = e["decode_fraction_of_bandwidth_bound"]
            parts = [f"decode {dec:.0%} of the bandwidth bound" if dec is not None else "decode n/a"]
            if "prefill_fraction_of_compute_bound" in e:
                parts.append(f"prefill {e['prefill_fraction_of_compute_bound']:.0%} of the compute bound")
            print(f"  {name} ({engine}): " + ", ".join(parts) + " (best run)")
    for name, engines in b.get("vision", {}).items():
        for engine, e in engines.items():
            print(f"  {name} ({engine}): vision {e['vision_gflop']:,.0f} GFLOP (useful: real windows and frames) need "
                  f"{e['vision_compute_floor_s']:.2f} s at the fp32 MatMul rate; the best run is at "
                  f"{e['vision_fraction_of_compute_bound']:.0%} of that bound ({e['vision_gflop_s']:.0f} GFLOP/s)")
    if b["weights_fit_in_cache"]:
        print(f"  the decoder's weights fit in the {b['last_level_cache_bytes'] / 2**20:.0f} MiB last-level cache: "
              "the DRAM bandwidth figure does not bound this decode")
    if b["exceeded"]:
        print("WARNING: measured figures beat the probe, so it is not a bound here: " + "; ".join(b["exceeded"]))
    else:
        print("  every measured decode and prefill is within the probe's bounds")


def print_accuracy(doc: dict) -> None:
    """accuracy.py's report on stdout: each engine's figures overall and per pack, agreement between engines, the
    recipe gates, the items used and the note on what the figures mean."""
    engines, packs, gates = doc["engines"], doc["packs"], doc["recipe_gates"]
    headers = ["engine", "n", "precision", "recall", "F1", "FPR", "parse rate", "errors"]
    print(markdown_table(headers, [[n, e["overall"]["n"], e["overall"]["precision"], e["overall"]["recall"],
                                    e["overall"]["f1"], e["overall"]["fpr"], e["overall"]["parse_rate"],
                                    e["overall"]["errors"]] for n, e in engines.items()]))
    print("\n" + markdown_table(
        ["engine", "macro AUROC"] + [f"{pk} F1 / AUROC" for pk in packs],
        [[n, e["overall"]["macro_auroc"]] + [_f1_auroc(e["per_pack"][pk]) for pk in packs] for n, e in engines.items()]))
    rows = [[n, against, f["verdict_agreement"], f["p_unsafe_abs_diff_mean"], f["p_unsafe_abs_diff_p99"],
             f["p_unsafe_abs_diff_max"]] for n, ag in doc["agreement"].items() for against, f in ag.items()]
    if rows:
        print("\n" + markdown_table(["engine", "against", "verdict agreement", "mean abs dP(unsafe)",
                                     "p99 abs dP(unsafe)", "max abs dP(unsafe)"], rows))
    if gates:
        print("\n" + markdown_table(
            ["engine", "recipe gate (trained weights)", "AUROC drop", "failures"],
            [[n, "passed" if g["passed"] else "FAILED", g["auroc_drop"], "; ".join(g["failures"]) or "-"]
             for n, g in gates.items()]))
    print("\nitems per pack: " + "; ".join(
        f"{pk}: {r['sampled']} used of {r['kept']} kept, {r['source_rows']} in the source"
        + (" (dropped: " + ", ".join(f"{n} {why}" for why, n in r["dropped"].items()) + ")" if r["dropped"] else "")
        for pk, r in doc["loaded"].items()))
    print(f"\n{doc['note']}")


def _f1_auroc(m: dict) -> str:
    f1 = "-" if m["f1"] is None else f"{m['f1']:.3f}"
    return f"{f1} / {'-' if m.get('auroc') is None else format(m['auroc'], '.3f')}"
