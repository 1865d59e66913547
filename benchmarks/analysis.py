"""Figures derived from the measured rows: runtime/PyTorch ratios, time to verdict, the peer comparison, the
precision recipes side by side, and every engine's stages against the machine probe's bounds."""

from __future__ import annotations

import math
from pathlib import Path

from .stages import RATIO_STAGES
from .system import last_level_cache_bytes


def _engines(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{scenario: {engine: row}}, scenarios in the order the rows first name them."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["scenario"], {})[r["engine"]] = r
    return out


def speedups(rows: list[dict], floor: float, stat: str = "p50") -> dict:
    """PyTorch / runtime seconds per scenario and stage (decode: runtime tok/s / PyTorch tok/s), for stages
    where both engines take at least `floor` seconds (below it a ratio is a ratio of timer noise).
    `stat="min"` gives the runtime's best case: PyTorch p50 over the runtime's fastest run."""
    out = {}
    for scenario, engines in _engines(rows).items():
        row, ref = engines.get("runtime"), engines.get("pytorch")
        if row is None or ref is None:
            continue
        ratios = {}
        for stage in RATIO_STAGES:
            a, b = row["stages"].get(stage, {}).get(stat), ref["stages"].get(stage, {}).get("p50")
            # every key is written (other tools read them); None where a side is under the floor
            ratios[stage] = b / a if a is not None and b is not None and a >= floor and b >= floor else None
        a = row["stages"].get("decode_tok_s", {}).get("max" if stat == "min" else stat)
        b = ref["stages"].get("decode_tok_s", {}).get("p50")
        ratios["decode_tok_s"] = a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) else None
        out[scenario] = ratios
    return out


def time_to_verdict(rows: list[dict]) -> dict:
    """Per scenario: the default mode's time to verdict (runtime-default, p50) against PyTorch's time to its
    first token (p50), and the ratio (how many times faster the verdict is known)."""
    out = {}
    for scenario, engines in _engines(rows).items():
        row, ref = engines.get("runtime-default"), engines.get("pytorch")
        if row is None or ref is None:
            continue
        mine, theirs = row["stages"]["verdict"]["p50"], ref["stages"]["first_token"]["p50"]
        out[scenario] = {"runtime_default_verdict_p50": mine, "pytorch_first_token_p50": theirs,
                         "speedup": theirs / mine if mine > 0 else None,
                         "cached_prompt_tokens": row.get("cached_prompt_tokens")}
    return out


def peer_comparison(rows: list[dict]) -> dict:
    """Per text scenario with a peer: our default time to verdict against the peer's fp32 time to first token with
    its prefix reuse, our fixed-budget decode tok/s against its fp32 decode, and whether its greedy fp32 tokens
    equal ours."""
    out = {}
    for scenario, engines in _engines(rows).items():
        row = engines.get("ort-genai-fp32")
        if row is None:
            continue
        reuse, ours, fixed = engines.get("ort-genai-fp32-reuse"), engines.get("runtime-default"), engines.get("runtime")
        entry = {"ort_genai_fp32_first_token_p50": row["stages"]["first_token"]["p50"],
                 "ort_genai_fp32_decode_tok_s_p50": row["stages"]["decode_tok_s"]["p50"]}
        if reuse:
            entry["ort_genai_fp32_reuse_first_token_p50"] = reuse["stages"]["first_token"]["p50"]
        if ours and reuse:
            entry["runtime_default_verdict_p50"] = ours["stages"]["verdict"]["p50"]
            entry["verdict_vs_peer_reuse_first_token"] = reuse["stages"]["first_token"]["p50"] / \
                ours["stages"]["verdict"]["p50"]
        if fixed:
            mine = fixed["stages"].get("decode_tok_s", {}).get("p50")
            entry["runtime_decode_tok_s_p50"] = mine
            entry["decode_ratio"] = mine / row["stages"]["decode_tok_s"]["p50"] if mine else None
            entry["tokens_equal"] = fixed.get("generated_ids") == row.get("generated_ids")
        int4 = engines.get("ort-genai-int4")
        if int4:
            entry["ort_genai_int4_first_token_p50"] = int4["stages"]["first_token"]["p50"]
            entry["ort_genai_int4_decode_tok_s_p50"] = int4["stages"]["decode_tok_s"]["p50"]
        out[scenario] = entry
    return out


def recipes_table(doc: dict, compared: list[dict]) -> dict:
    """Per bundle (fp32 first, then each --compare one): size on disk, peak RSS over the scenarios, the vision
    encoder's time (fixed-budget row), default-mode time to verdict per scenario, fixed-budget decode tok/s, and
    decode against fp32's and against onnxruntime-genai int4's (same run)."""
    engines = _engines(doc["rows"])
    peer_int4 = engines.get("text", {}).get("ort-genai-int4", {}).get("stages", {}).get("decode_tok_s", {}).get("p50")
    bundles = [{"name": "fp32", "path": doc["bundle"]["path"], "size_mb": doc["bundle"]["size_mb"],
                "suffix": ""}] + [{"name": c["name"], "path": c["path"], "size_mb": c["size_mb"],
                                   "suffix": f":{c['name']}", "graph_precision": c["graph_precision"],
                                   "gate_passed": c["gate_passed"]} for c in compared]
    out = {}
    fp32_decode = None
    for b in bundles:
        entry = {"path": b["path"], "size_mb": b["size_mb"], "size_vs_fp32": b["size_mb"] / bundles[0]["size_mb"],
                 "graph_precision": b.get("graph_precision"), "fidelity_gate_passed": b.get("gate_passed"),
                 "peak_rss_mb": None, "vision_s": {}, "verdict_s": {},
                 "decode_tok_s": {}}
        peaks = []
        for scenario, by_engine in engines.items():
            fixed, default = by_engine.get("runtime" + b["suffix"]), by_engine.get("runtime-default" + b["suffix"])
            for row in (fixed, default):
                if row and "peak_rss_mb" in row:
                    peaks.append(row["peak_rss_mb"])
            if fixed:
                if fixed["stages"].get("vision", {}).get("p50"):
                    entry["vision_s"][scenario] = fixed["stages"]["vision"]["p50"]
                if "decode_tok_s" in fixed["stages"]:
                    entry["decode_tok_s"][scenario] = fixed["stages"]["decode_tok_s"]["p50"]
            if default:
                entry["verdict_s"][scenario] = default["stages"]["verdict"]["p50"]
        entry["peak_rss_mb"] = max(peaks) if peaks else None
        text_decode = entry["decode_tok_s"].get("text")
        if b["name"] == "fp32":
            fp32_decode = text_decode
        entry["text_decode_vs_fp32"] = text_decode / fp32_decode if text_decode and fp32_decode else None
        entry["text_decode_vs_ort_genai_int4"] = text_decode / peer_int4 if text_decode and peer_int4 else None
        out[b["name"]] = entry
    first = out["fp32"]["vision_s"]
    for entry in out.values():
        entry["vision_speedup_vs_fp32"] = {k: first[k] / v for k, v in entry["vision_s"].items() if first.get(k) and v}
    return out


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


def bounds(bundle: Path, rows: list[dict], probe: dict) -> dict:
    """Every engine's decode against the bandwidth bound (each decoder weight byte read once per token) and
    prefill against the compute bound (2 FLOPs per weight per prompt token, the head on one position), from
    the probe's onnxruntime figures. A fraction above 1 means the probe is not a bound: it is flagged in
    `exceeded` and printed as a warning."""
    from omniguard_edge.runtime.manifest import load_manifest

    m = load_manifest(bundle, verify="none")
    weight_bytes = _decoder_weight_bytes(m)
    head = m.decoder.vocab_size * m.decoder.hidden_size
    # attention score FLOPs are left out, which only lowers the bound's time: it stays a bound
    params = weight_bytes / 4 - head if m.precision == "fp32" else None
    bound_tok_s = probe["bandwidth_gb_s"] * 1e9 / weight_bytes
    cache = last_level_cache_bytes()
    in_cache = weight_bytes <= cache
    out = {"decoder_weight_bytes": weight_bytes, "bandwidth_bound_tok_s": bound_tok_s, "per_scenario": {},
           "exceeded": [], "weights_fit_in_cache": in_cache, "last_level_cache_bytes": cache}
    out["vision"] = vision_bounds(m, rows, probe, out["exceeded"])
    for r in rows:
        if r["engine"] == "runtime-default" and params:
            entry = _verdict_bound(r, rows, params, probe)
            if entry["verdict_fraction_of_compute_bound"] > 1:
                out["exceeded"].append(f"{r['scenario']}/{r['engine']}: verdict_fraction_of_compute_bound = "
                                       f"{entry['verdict_fraction_of_compute_bound']:.2f}")
            out["per_scenario"].setdefault(r["scenario"], {})[r["engine"]] = entry
            continue
        if r["engine"] not in ("runtime", "pytorch"):
            continue  # peers
        if r["engine"] != "runtime" and m.precision != "fp32":
            continue  # PyTorch reads fp32 weights: the bundle's bytes bound only an fp32 bundle's peer
        tok_s = r["stages"].get("decode_tok_s", {}).get("max")  # the best run: a bound must hold for every run
        entry = {"decode_fraction_of_bandwidth_bound": tok_s / bound_tok_s
                 if tok_s is not None and math.isfinite(tok_s) else None}
        if params:
            flops = 2 * params * r["prompt_tokens"] + 2 * head
            entry["prefill_fraction_of_compute_bound"] = flops / (probe["matmul_gflop_s"] * 1e9) / r["stages"]["prefill"]["min"]
        for k, v in entry.items():
            if in_cache and k.startswith("decode"):
                continue  # DRAM bandwidth bounds no decode whose weights sit in the cache (the tiny profile)
            if v is not None and v > 1:
                out["exceeded"].append(f"{r['scenario']}/{r['engine']}: {k} = {v:.2f}")
        out["per_scenario"].setdefault(r["scenario"], {})[r["engine"]] = entry
    return out


def _decoder_weight_bytes(m) -> int:
    """The bytes a decode step reads: the decoder's weights and its output layer (manifest `m`)."""
    # the standard decoder holds the output layer; a bundle without it (a CPU recipe's) has the fast one and its head
    specs = [m.graphs["decoder"]] if "decoder" in m.graphs else [m.graphs["decoder_gqa"], m.graphs["decoder_gqa_head"]]
    # a quantized head graph holds its own weights: its data file (lm_head.npy) is then the fp32 rows read at
    # constrained positions only, not per decode step
    return sum(m.files[f].size for spec in specs for f in (spec.file, spec.data_file)
               if f and not (f == spec.data_file and f.endswith(".npy") and spec.precision != "fp32"))


def _verdict_bound(r: dict, rows: list[dict], params: float, probe: dict) -> dict:
    """A runtime-default row's time to verdict against its floor. Its prefill is the request's own tokens after the
    cached prefix: the floor of its time to verdict is those tokens at the probe's fp32 MatMul rate, whatever the
    runtime does around them."""
    fresh = r["prompt_tokens"] - (r.get("cached_prompt_tokens") or 0)
    floor_s = 2 * params * fresh / (probe["matmul_gflop_s"] * 1e9)
    entry = {"uncached_prompt_tokens": fresh, "verdict_compute_floor_s": floor_s,
             "verdict_fraction_of_compute_bound": floor_s / r["stages"]["verdict"]["min"]}
    ref = next((x for x in rows if x["engine"] == "pytorch" and x["scenario"] == r["scenario"]), None)
    media = r["stages"]["vision"]["max"] + r["stages"]["audio"]["max"]
    if ref is not None and floor_s > 0 and media == 0:
        # PyTorch's first token over that floor: no fp32 runtime on this machine can beat this speed-up
        # (text only: with media the encoders, left out of the floor, come on top)
        entry["speedup_ceiling_vs_pytorch_first_token"] = ref["stages"]["first_token"]["p50"] / floor_s
    return entry


def vision_bounds(m, rows: list[dict], probe: dict, exceeded: list) -> dict:
    """{scenario: {engine: figures}}: each engine's vision stage (fastest run) against the compute bound, the useful
    FLOPs of the runtime's vision grids (the reference preprocesses to the same grids) at the probe's fp32 MatMul
    rate. Only an fp32 bundle's engines and PyTorch: a quantized encoder is not bound by an fp32 rate."""
    out: dict = {}
    grids = {r["scenario"]: r["vision_grids"] for r in rows if r.get("vision_grids")}
    for r in rows:
        seconds = r["stages"].get("vision", {}).get("min")
        # the --bundle's own engines (a --compare bundle's rows are runtime:RECIPE, quantized) and PyTorch's
        if r["scenario"] not in grids or not seconds or r["engine"] not in ("runtime", "runtime-default", "pytorch") \
                or (r["engine"] != "pytorch" and m.precision != "fp32"):
            continue
        flops = vision_flops(m.vision, grids[r["scenario"]])
        floor = flops / (probe["matmul_gflop_s"] * 1e9)
        entry = {"vision_gflop": flops / 1e9, "vision_compute_floor_s": floor,
                 "vision_fraction_of_compute_bound": floor / seconds, "vision_gflop_s": flops / seconds / 1e9}
        if entry["vision_fraction_of_compute_bound"] > 1:
            exceeded.append(f"{r['scenario']}/{r['engine']}: vision_fraction_of_compute_bound = "
                            f"{entry['vision_fraction_of_compute_bound']:.2f}")
        out.setdefault(r["scenario"], {})[r["engine"]] = entry
    return out
