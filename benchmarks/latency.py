"""Latency of the torch-free runtime, per stage, side by side with the PyTorch reference.

    python benchmarks/latency.py --bundle BUNDLE [--reference CHECKPOINT] [--runs 5] [--warmup 3]
        [--threads N] [--new-tokens 32] [--json out.json] [--plot out.png]
        [--baseline baseline.json --tolerance 0.15]

Stages are defined identically for both engines (STAGE_DEFINITIONS, written into the JSON and docs/benchmarks.md);
seconds, min/p50/p95/max over --runs after --warmup. Random reference weights never stop on their own, so
answers are fixed budgets (EOS masked, as transformers' min_new_tokens does, on both sides).

The baseline gate (--baseline) compares the runtime's own figures (encoders, prefill, time to first token and
to verdict, total, decode tok/s) when the baseline comes from the same CPU model, ISA flags and thread count,
and only runtime/PyTorch ratios when it comes from another machine; never PyTorch's seconds. Stages under --floor seconds on both sides are
timer noise and are not compared.
"""

from __future__ import annotations

import argparse
import json
import math
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
STAGE_DEFINITIONS = {
    "preprocess": "from the call to model-ready inputs: media decode, resize, normalisation, patches, log-mel, chat "
                  "template, tokenization and placeholder expansion (PyTorch: qwen-omni-utils loading + the processor "
                  "call; runtime: numpy preprocessing + prompt rendering and tokenization)",
    "vision": "vision encoder forward over every image and video of the request (0 when there is none)",
    "audio": "audio encoder forward over every clip (0 when there is none)",
    "embed": "token embedding gather, media features merged at their placeholders, TMRoPE position ids",
    "prefill": "one decoder forward over the whole prompt with an empty KV cache, LM head on the last position "
               "only (PyTorch: the model's language_model + lm_head called directly, outside generate)",
    "first_token": "end to end, from the call to the first generated token (PyTorch: preprocess + thinker.generate "
                   "up to its first token; generate re-runs the encoders and, as transformers' Qwen2.5-Omni thinker "
                   "takes no logits_to_keep, applies the LM head to every prompt position: that extra work is part "
                   "of the PyTorch seed path and is counted, not hidden)",
    "verdict": "end to end, from the call to the first --verdict-tokens generated tokens (verdict + categories)",
    "total": "end to end, from the call to the last token of the --new-tokens answer",
    "decode_tok_s": "generated tokens after the first, per second between the first and the last token",
}
GATED = ["vision", "audio", "prefill", "first_token", "verdict", "total"]  # the runtime's own seconds
RATIO_STAGES = ["preprocess", "vision", "audio", "embed", "prefill", "first_token", "verdict", "total"]


def run_runtime(bundle: Path, chosen: dict, args) -> tuple[list[dict], dict]:
    """Rows of two engines over the same scenarios, in this process:
    `runtime`: fixed budgets like the PyTorch side (free decoding, full mode, EOS masked to --new-tokens, no
    prefix cache), the like-for-like comparison; `runtime-default`: the Guard's defaults as users run it (cached
    policy prefix, the answer grammar, `categories` mode, category scores), where `verdict` is the time from the
    call until the verdict token is known and `total` until the answer ends. The encoder cache is off in both
    (the same media again would be a cache hit). Each row carries the peak RSS of its scenario's runs
    (the process's high-water mark reset before them)."""
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    from omniguard_edge.runtime.gpu import provider_chain

    # --provider cuda|tensorrt: the runtime's graphs on the GPU (tensorrt: engines from build-engines, default limits)
    session = SessionOptions(providers=provider_chain(args.provider), intra_op_threads=args.threads)
    fixed = GuardOptions(mode="full", constrain_verdict=False, prefix_cache=False, encoder_cache_bytes=0,
                         critique_max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, session=session)
    guard = Guard.from_bundle(bundle, fixed)
    default = Guard(guard.bundle, GuardOptions(encoder_cache_bytes=0, session=session))
    rows = []
    for sc in chosen.values():
        for engine, g in (("runtime", guard), ("runtime-default", default)):
            samples = {k: [] for k in STAGES + ["decode_tok_s"]}
            resettable = benchlib.reset_peak_rss()
            for run in range(args.warmup + args.runs):
                r = g.moderate(sc.text, sc.response, image=sc.image, audio=sc.audio, video=sc.video)
                if r.verdict == "error":
                    raise SystemExit(f"{engine} failed on {sc.name}: {r.error}")
                if run < args.warmup:
                    continue
                try:
                    figures = runtime_stage_samples(r.timings, r.token_times,
                                                    args.verdict_tokens if engine == "runtime" else None)
                except ValueError as exc:
                    raise SystemExit(f"{engine} on {sc.name}: {exc}") from exc
                for k, v in figures.items():
                    if k != "decode_tok_s" or math.isfinite(v):  # one token (a `safe` verdict) has no decode rate
                        samples[k].append(v)
            row = {"scenario": sc.name, "engine": engine, "prompt_tokens": r.prompt_tokens,
                   "stages": {k: benchlib.summarize(v) for k, v in samples.items() if v}}
            if r.vision_grids:
                row["vision_grids"] = r.vision_grids
            if resettable:
                row["peak_rss_mb"] = benchlib.peak_rss_mb()
            if engine == "runtime-default":
                row["cached_prompt_tokens"] = r.cached_prompt_tokens
                row["generated_tokens"] = r.generated_tokens
            else:
                row["generated_ids"] = r.generated_ids  # the last run's: a peer's greedy tokens are compared with them
            rows.append(row)
    m = guard.bundle.manifest
    from omniguard_edge.runtime.prompt import Conversation

    text_prompts = {sc.name: guard.prompt_ids(Conversation.of(sc.text, sc.response))
                    for sc in chosen.values() if not (sc.image or sc.audio or sc.video) and sc.text}
    info = {"providers": guard.bundle.providers, "precision": m.precision, "decoder_graph": guard.bundle.decoder_graph,
            "recipe": (m.recipe or {}).get("name"), "graph_precision": {g: s.precision for g, s in m.graphs.items()},
            "text_prompts": text_prompts,
            "config_sha256": m.source.get("config_sha256"), "embedding_dtype": m.embedding.get("dtype"),
            "prefix_cache_mb": default.prefixes.nbytes / 2**20}
    return rows, info


def _compared_names(parser, base: Path, bundles: list[Path]) -> list[tuple[str, bool | None]]:
    """Each --compare bundle's name (its recipe) and whether it passed its fidelity gate, after checking that it is
    a bundle of --bundle's model and that no two share a name; a parser error otherwise."""
    from omniguard_edge.runtime.errors import BundleError
    from omniguard_edge.runtime.manifest import load_manifest

    try:
        ref = load_manifest(base, verify="none")
        manifests = [load_manifest(b, verify="none") for b in bundles]
    except BundleError as exc:
        parser.error(str(exc))
    names = []
    for b, m in zip(bundles, manifests):
        if m.source.get("config_sha256") != ref.source.get("config_sha256"):
            parser.error(f"--compare {b}: made from another checkpoint than --bundle (config sha256 differs)")
        name = (m.recipe or {}).get("name") or m.precision
        if name in names or name == "fp32":
            parser.error(f"--compare {b}: a second bundle named {name!r} (the table keys bundles by recipe)")
        names.append(name)
    return [(name, (m.fidelity or {}).get("gate", {}).get("passed")) for name, m in zip(names, manifests)]


def compare_bundle(bundle: Path, name: str, gate_passed: bool | None, chosen: dict, args) -> dict:
    """`run_runtime` on another bundle of the same model (a recipe of --bundle), its engines suffixed by its name
    (its recipe): runtime:cpu-int4, runtime-default:cpu-int4."""
    import gc

    gc.collect()  # the previous bundle's sessions go before this one's peak RSS is measured
    rows, info = run_runtime(bundle, chosen, args)
    for r in rows:
        r["engine"] = f"{r['engine']}:{name}"
    info.pop("text_prompts", None)
    gc.collect()
    return {"name": name, "path": str(bundle), "size_mb": benchlib.dir_size_mb(bundle), "rows": rows,
            "gate_passed": gate_passed, **info}


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


def runtime_stage_samples(timings: dict, token_times: list[float], verdict_tokens: int | None) -> dict:
    """One moderation's figures under STAGE_DEFINITIONS, from the Guard's timings (seconds per part;
    `generate_start`: from the call to the start of prefill) and token times (seconds from the start of
    prefill to each generated token). `verdict_tokens` None: the verdict is the Guard's own `verdict` timing
    (from the call until the verdict token is known) and `total` the Guard's `total` (runtime-default rows)."""
    if verdict_tokens is None:
        t = timings
        out = {"preprocess": t.get("preprocess", 0.0) + t.get("prompt", 0.0)}
        out.update({k: t.get(k, 0.0) for k in ("vision", "audio", "embed", "prefill")})
        out["first_token"] = t["generate_start"] + token_times[0]
        out["verdict"], out["total"] = t["verdict"], t["total"]
        span = token_times[-1] - token_times[0]
        out["decode_tok_s"] = (len(token_times) - 1) / span if span > 0 else float("nan")
        return out
    if len(token_times) < verdict_tokens:
        raise ValueError(f"{len(token_times)} tokens generated, fewer than --verdict-tokens {verdict_tokens}")
    t = timings
    out = {"preprocess": t.get("preprocess", 0.0) + t.get("prompt", 0.0)}
    out.update({k: t.get(k, 0.0) for k in ("vision", "audio", "embed", "prefill")})
    before = t["generate_start"]  # everything before prefill, gaps included
    out["first_token"] = before + token_times[0]
    out["verdict"] = before + token_times[verdict_tokens - 1]
    out["total"] = before + token_times[-1]  # to the last token, as PyTorch's (no detokenizing or parsing)
    span = token_times[-1] - token_times[0]
    out["decode_tok_s"] = (len(token_times) - 1) / span if span > 0 else float("nan")
    return out


def run_reference(checkpoint: Path, chosen: dict, args, guard_texts: dict) -> tuple[list[dict], dict]:
    """Same scenarios through PyTorch, in a separate process."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"threads": args.threads or os.cpu_count(), "warmup": args.warmup, "runs": args.runs,
                "device": args.reference_device, "dtype": args.reference_dtype,
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
             "staged_prefill_matches_generate": r["staged_matches_generate"],
             "stages": {k: benchlib.summarize(v) for k, v in r["samples"].items()}} for r in out["rows"]]
    return rows, {"peak_rss_mb": out["peak_rss_mb"], "torch_threads": out["torch_threads"],
                  "config": f"{args.reference_dtype} on {args.reference_device}, sdpa attention, greedy "
                            "thinker.generate, PIL image processor, qwen-omni-utils preprocessing "
                            "(omniguard_edge.export.torch_reference)"}


def guard_prompt_texts(chosen: dict) -> dict:
    """The exact guard text the runtime sends for each scenario (the reference must send the same)."""
    return {s.name: benchlib.guard_text(s.text, s.response, s.image, s.video, s.audio) for s in chosen.values()}


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


def run_peer(args, chosen: dict, text_prompts: dict, rows: list[dict]) -> tuple[list[dict], dict]:
    """onnxruntime-genai (fp32 and int4, built by its own builder from --reference's text decoder written as a
    Qwen2ForCausalLM folder) on the text scenarios, in a separate process (benchmarks/peer_worker.py)."""
    import hashlib

    from omniguard_edge.export.qwen2_text import write_qwen2_text_model

    if not text_prompts:
        print("note: no peer run: the peer runs the text scenarios only, and none was chosen")
        return [], None
    sha = hashlib.sha256((args.reference / "config.json").read_bytes()).hexdigest()[:12]
    root = args.peer_dir or args.bundle.resolve().parent / "peers"
    folder = root / f"qwen2-text-{sha}"
    if not (folder / "config.json").exists():
        print(f"writing the text decoder as a Qwen2ForCausalLM folder: {folder}", flush=True)
        write_qwen2_text_model(args.reference, folder)
    models = {}
    for precision in ("fp32", "int4"):
        out = root / f"ort-genai-{sha}-{precision}"
        if not (out / "genai_config.json").exists():
            print(f"building the onnxruntime-genai {precision} model (its own builder): {out}", flush=True)
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "qwen2", "-i", str(folder), "-o",
                   str(out), "-p", precision, "-e", "cpu", "-c", str(root / "builder-cache")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"onnxruntime-genai's builder failed ({precision}):\n{done.stderr[-3000:]}")
        models[precision] = str(out)
    cached = {r["scenario"]: r.get("cached_prompt_tokens", 0) for r in rows if r["engine"] == "runtime-default"}
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"models": models, "threads": args.threads or os.cpu_count(), "warmup": args.warmup, "runs": args.runs,
                "new_tokens": args.new_tokens,
                "scenarios": [{"name": k, "ids": ids, "prefix": cached.get(k, 0)} for k, ids in text_prompts.items()]}
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, str(HERE / "peer_worker.py"), str(spec_path), str(out_path)])
        if done.returncode != 0:
            raise SystemExit("the onnxruntime-genai peer failed (its output is above)")
        out = json.loads(out_path.read_text())
    return out["rows"], {"engine": "onnxruntime-genai", "version": out["onnxruntime_genai"], "models": models,
                         "source": "the --reference checkpoint's text decoder as Qwen2ForCausalLM, builder -e cpu"}


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


def bounds(bundle: Path, rows: list[dict], probe: dict) -> dict:
    """Every engine's decode against the bandwidth bound (each decoder weight byte read once per token) and
    prefill against the compute bound (2 FLOPs per weight per prompt token, the head on one position), from
    the probe's onnxruntime figures. A fraction above 1 means the probe is not a bound: it is flagged in
    `exceeded` and printed as a warning."""
    from omniguard_edge.runtime.manifest import load_manifest

    m = load_manifest(bundle, verify="none")
    # the standard decoder holds the output layer; a bundle without it (a CPU recipe's) has the fast one and its head
    specs = [m.graphs["decoder"]] if "decoder" in m.graphs else [m.graphs["decoder_gqa"], m.graphs["decoder_gqa_head"]]
    # a quantized head graph holds its own weights: its data file (lm_head.npy) is then the fp32 rows read at
    # constrained positions only, not per decode step
    weight_bytes = sum(m.files[f].size for spec in specs for f in (spec.file, spec.data_file)
                       if f and not (f == spec.data_file and f.endswith(".npy") and spec.precision != "fp32"))
    head = m.decoder.vocab_size * m.decoder.hidden_size
    # attention score FLOPs are left out, which only lowers the bound's time: it stays a bound
    params = weight_bytes / 4 - head if m.precision == "fp32" else None
    bound_tok_s = probe["bandwidth_gb_s"] * 1e9 / weight_bytes
    cache = _last_level_cache_bytes()
    in_cache = weight_bytes <= cache
    out = {"decoder_weight_bytes": weight_bytes, "bandwidth_bound_tok_s": bound_tok_s, "per_scenario": {},
           "exceeded": [], "weights_fit_in_cache": in_cache, "last_level_cache_bytes": cache}
    out["vision"] = _vision_bounds(m, rows, probe, out["exceeded"])
    for r in rows:
        if r["engine"] == "runtime-default" and params:
            # its prefill is the request's own tokens after the cached prefix: the floor of its time to verdict is
            # those tokens at the probe's fp32 MatMul rate, whatever the runtime does around them
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


def _vision_bounds(m, rows: list[dict], probe: dict, exceeded: list) -> dict:
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
        flops = benchlib.vision_flops(m.vision, grids[r["scenario"]])
        floor = flops / (probe["matmul_gflop_s"] * 1e9)
        entry = {"vision_gflop": flops / 1e9, "vision_compute_floor_s": floor,
                 "vision_fraction_of_compute_bound": floor / seconds, "vision_gflop_s": flops / seconds / 1e9}
        if entry["vision_fraction_of_compute_bound"] > 1:
            exceeded.append(f"{r['scenario']}/{r['engine']}: vision_fraction_of_compute_bound = "
                            f"{entry['vision_fraction_of_compute_bound']:.2f}")
        out.setdefault(r["scenario"], {})[r["engine"]] = entry
    return out


def _last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), or 64 MiB when it says nothing."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()
            sizes.append(int(text[:-1]) * {"K": 1024, "M": 1024**2}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            pass
    return max(sizes, default=64 * 1024**2)


def gate_metrics(doc: dict, base: dict, tolerance: float, floor: float) -> tuple[dict, dict, dict, list[str]]:
    """(current metrics, baseline values, the baseline's best runs, notes). On the baseline's machine: the
    runtime's own seconds (stages under `floor` on both sides skipped, differences under `floor` not counted).
    From another machine: runtime/PyTorch ratios only. Never PyTorch's seconds."""
    cur, ref, ref_best, notes = {}, {}, {}, []
    if not benchlib.same_machine(doc["system"], base["system"]):
        b, c = base["system"], doc["system"]
        notes.append(f"baseline from another machine ({b.get('cpu')}, flags {b.get('cpu_flags')}, {b.get('threads')} "
                     f"threads; this run: {c.get('cpu')}, flags {c.get('cpu_flags')}, {c.get('threads')} threads): only "
                     "runtime/PyTorch ratios are compared")
        for scenario, ratios in doc.get("speedups", {}).items():
            best = doc.get("speedups_best", {}).get(scenario, {})
            for stage, value in ratios.items():
                if value is not None:  # None: a side under the floor (or no decode): nothing to compare
                    cur[f"speedup/{scenario}/{stage}"] = benchlib.Metric(value, tolerance, higher_is_better=True,
                                                                          best=best.get(stage))
        for scenario, ratios in base.get("speedups", {}).items():
            best = base.get("speedups_best", {}).get(scenario, {})
            for stage, value in ratios.items():
                if value is not None:
                    ref[f"speedup/{scenario}/{stage}"] = value
                    ref_best[f"speedup/{scenario}/{stage}"] = best.get(stage)
        return cur, ref, ref_best, notes
    notes.append("baseline from this machine (same CPU, flags, threads): the runtime's own seconds are compared; "
                 "runtime/PyTorch ratios are not, so a PyTorch-only change cannot fail or hide anything")
    base_rows = {r["scenario"]: r["stages"] for r in base["rows"] if r["engine"] == "runtime"}
    for r in doc["rows"]:
        if r["engine"] != "runtime" or r["scenario"] not in base_rows:
            continue
        old = base_rows[r["scenario"]]
        for stage in GATED + ["decode_span_s"]:
            if stage == "decode_span_s":
                # decode is gated as the time its rate implies for the answer's steps after the first token
                # ((tokens - 1) / rate; 31 tiny-model steps take ~10 ms), so that the floor applies in seconds
                steps = doc["budgets"]["new_tokens"] - 1
                now, then = (_decode_span(r["stages"].get("decode_tok_s"), steps),
                             _decode_span(old.get("decode_tok_s"), steps))
            else:
                now, then = r["stages"].get(stage), old.get(stage)
            if now is None or then is None:
                continue
            key = f"runtime/{r['scenario']}/{stage}"
            if now["p50"] is not None and then["p50"] is not None and max(now["p50"], then["p50"]) < floor:
                notes.append(f"{key}: {now['p50'] * 1e3:.2f} ms now, {then['p50'] * 1e3:.2f} ms in the baseline, "
                             f"both under the {floor * 1e3:g} ms floor: not compared")
                continue
            cur[key] = benchlib.Metric(now["p50"], tolerance, best=now["min"], floor=floor)
            ref[key], ref_best[key] = then["p50"], then["min"]
    return cur, ref, ref_best, notes


def _decode_span(rate: dict | None, steps: int) -> dict | None:
    """A decode-rate summary as the seconds it implies for `steps` steps: p50 from the p50 rate, min (the best
    run) from the highest rate. None for an undefined rate."""
    if rate is None:
        return None

    def span(v):
        return steps / v if v and math.isfinite(v) and v > 0 else None

    return {"p50": span(rate.get("p50")), "min": span(rate.get("max"))}


def check_baseline(doc: dict, base: dict, tolerance: float, floor: float = 0.005) -> benchlib.GateResult:
    """This run (`doc`) against a baseline run's JSON (`base`), as accuracy.check_baseline does for accuracy."""
    if base.get("kind") not in (None, "latency"):
        return benchlib.GateResult(problems=[f"the baseline is a {base.get('kind')} result, not a latency baseline"])
    if base.get("schema_version") != benchlib.SCHEMA_VERSION:
        return benchlib.GateResult(problems=[
            f"the baseline has schema_version {base.get('schema_version')}, this latency.py writes "
            f"{benchlib.SCHEMA_VERSION}: the stage definitions changed in between (see STAGE_DEFINITIONS), so its "
            "figures are not comparable; record a new baseline with this version"])
    ident = ("config_sha256", "embedding_dtype", "precision", "providers")
    other = [f"{k}: baseline {base.get('bundle', {}).get(k)}, this run {doc['bundle'].get(k)}" for k in ident
             if base.get("bundle", {}).get(k) != doc["bundle"].get(k)]
    if other:
        return benchlib.GateResult(problems=[
            "the baseline measured another bundle or engine, so its figures are not comparable: " + "; ".join(other)])
    if base.get("warmup") != doc.get("warmup"):
        return benchlib.GateResult(problems=[
            f"the baseline ran {base.get('warmup')} warm-up call(s) per scenario, this run {doc.get('warmup')}: a "
            "process's first calls are slower (docs/performance.md \"Threads\"), so the figures are not comparable; use the same "
            "--warmup (default 3) or record a new baseline"])
    if base.get("budgets") != doc.get("budgets"):
        return benchlib.GateResult(problems=[
            f"the baseline answered other budgets ({base.get('budgets')}, this run {doc.get('budgets')}): verdict, "
            "total and decode figures are not comparable; use the same --new-tokens and --verdict-tokens"])
    cur, ref, ref_best, notes = gate_metrics(doc, base, tolerance, floor)
    result = benchlib.compare_metrics(cur, ref, baseline_best=ref_best)
    if result.compared == 0 and not benchlib.same_machine(doc["system"], base["system"]):
        result.problems.append("across machines only runtime/PyTorch ratios compare: run latency.py with "
                               "--reference both for the baseline and now")
    if base.get("runs") != doc.get("runs"):
        notes.append(f"the baseline has {base.get('runs')} runs per scenario, this run {doc.get('runs')}: the best of "
                     "more runs is lower, so best-run comparisons lean towards the run with more")
    result.notes[:0] = notes
    return result


def _runtime_scenario(key: str) -> str | None:
    """The scenario of a gate key `runtime/<scenario>/<stage>` (a problem line starts with its key), else None."""
    parts = key.split(":")[0].split("/")
    return parts[1] if parts[0] == "runtime" and len(parts) > 1 else None


def confirm(first: benchlib.GateResult, second: benchlib.GateResult, scenarios: list[str]) -> benchlib.GateResult:
    """The gate's outcome after a confirmation pass: a runtime regression of a re-measured scenario stands only
    if the second measurement shows it too (a real slowdown does not go away; a window of machine noise does)."""
    redone = [k for k in first.regressed if _runtime_scenario(k) in scenarios]
    out = benchlib.GateResult(notes=list(first.notes), compared=first.compared)
    out.problems = [p for p in first.problems if p not in {first.regressed[k] for k in redone}]
    out.regressed = {k: v for k, v in first.regressed.items() if k not in redone}
    # anything else the second measurement got wrong in a re-measured scenario (a metric that became undefined)
    remeasured = [p for p in second.problems
                  if p not in second.regressed.values() and _runtime_scenario(p) in scenarios]
    for key in redone:
        if key in second.regressed:
            out.regressed[key] = f"{first.regressed[key]}; confirmed: {second.regressed[key].split(': ', 1)[1]}"
            out.problems.append(out.regressed[key])
        elif any(p.split(":")[0] == key for p in remeasured):
            out.regressed[key] = first.regressed[key]
            out.problems.append(out.regressed[key])
        else:
            out.notes.append(f"{first.regressed[key]}; not confirmed: in the second measurement of {_runtime_scenario(key)} "
                             "it is within the tolerance (or the floor), so the first was machine noise")
    out.problems += [f"{p} (in the confirmation pass)" for p in remeasured]
    return out


def print_report(doc: dict) -> None:
    rows = []
    for r in doc["rows"]:
        s = r["stages"]
        rows.append([r["scenario"], r["engine"], r["prompt_tokens"]] + [s.get(k, {}).get("p50") for k in STAGES]
                    + [s.get("decode_tok_s", {}).get("p50"), r.get("peak_rss_mb")])
    print(benchlib.markdown_table(["scenario", "engine", "prompt tok"] + [f"{k} s" for k in STAGES]
                                  + ["decode tok/s", "peak RSS MiB"], rows))
    if doc.get("time_to_verdict"):
        print("\ntime to verdict, default mode (runtime-default verdict p50) against PyTorch's time to its first token "
              "(pytorch first_token p50):\n")
        print(benchlib.markdown_table(
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
        print(benchlib.markdown_table(["scenario"] + keys,
                                      [[k] + [v.get(s) for s in keys] for k, v in doc["speedups"].items()]))
    if doc.get("peer_comparison"):
        print("\npeer (onnxruntime-genai, same prompt ids, same threads): our default time to verdict against its fp32 "
              "time to first token with its own prefix reuse; decode: our fixed-budget rows against its fp32\n")
        keys = ["runtime_default_verdict_p50", "ort_genai_fp32_reuse_first_token_p50", "verdict_vs_peer_reuse_first_token",
                "ort_genai_fp32_first_token_p50", "runtime_decode_tok_s_p50", "ort_genai_fp32_decode_tok_s_p50",
                "decode_ratio", "tokens_equal", "ort_genai_int4_first_token_p50", "ort_genai_int4_decode_tok_s_p50"]
        print(benchlib.markdown_table(["scenario"] + keys, [[k] + [v.get(x) for x in keys]
                                                            for k, v in doc["peer_comparison"].items()]))
    if doc.get("recipes"):
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
        print(benchlib.markdown_table(headers, table))
        flags = [f for f in doc["system"]["cpu_flags"] if "vnni" in f or "amx" in f or f.startswith("avx512")]
        print(f"integer kernels: onnxruntime's MLAS picks its int8 GEMM (DynamicQuantizeMatMul) and int4 "
              f"(MatMulNBits, accuracy level 4: int8 dot products) paths from the CPU's flags at run time; this CPU "
              f"has {' '.join(flags) or 'none of avx512*/vnni/amx'} (which path ran is not reported by onnxruntime)")
    mismatched = [r["scenario"] for r in doc["rows"] if r.get("staged_prefill_matches_generate") is False]
    if mismatched:
        print(f"\nWARNING: PyTorch's staged prefill chose another first token than its generate() in {mismatched}")
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
    print(f"\nbudgets: {doc['budgets']['new_tokens']} new tokens per answer, verdict = first "
          f"{doc['budgets']['verdict_tokens']} tokens (fixed: EOS masked); {doc['runs']} runs after {doc['warmup']} warm-up; "
          f"CPU {doc['system']['cpu']} ({' '.join(doc['system']['cpu_flags']) or 'flags unknown'}), "
          f"{doc['system']['threads']} threads")


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # checked before minutes of measuring, not after
        p.error("the machine probe builds its graphs with onnx: pip install 'omniguard-edge[bench]'")
    if args.runs < 1 or args.warmup < 0 or args.new_tokens < args.verdict_tokens or args.verdict_tokens < 1:
        p.error("need --runs >= 1, --warmup >= 0 and 1 <= --verdict-tokens <= --new-tokens")
    if not (args.tolerance >= 0 and args.floor >= 0):
        p.error("--tolerance and --floor must be >= 0")
    base = None
    if args.peers is None:  # by default, the peer runs wherever it can
        available = importlib.util.find_spec("onnxruntime_genai") is not None
        args.peers = ["ort-genai"] if args.reference and available else []
        if args.reference and not available:
            print("note: no peer engine: onnxruntime-genai is not installed (pip install 'omniguard-edge[peer]')")
    args.peers = [x for x in args.peers if x != "none"]
    if args.peers:  # checked before minutes of measuring, not after
        if not args.reference:
            p.error("--peers builds the peer's models from the checkpoint: pass --reference CHECKPOINT")
        missing = [m for m in ("onnxruntime_genai", "torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            p.error(f"--peers ort-genai needs {', '.join(missing)}: pip install 'omniguard-edge[peer]' "
                    "(onnxruntime-genai; its model builder needs the export extra's torch and transformers)")
    if args.baseline:  # read before minutes of measuring, not after
        try:
            base = json.loads(args.baseline.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            p.error(f"--baseline {args.baseline}: not a readable JSON file ({exc})")
    names = _compared_names(p, args.bundle, args.compare)  # checked before minutes of measuring, not after
    allowed = scenario_defs.build(args.media_dir)
    unknown = set(args.scenarios or []) - set(allowed)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {sorted(allowed)}")
    chosen = {k: v for k, v in allowed.items() if not args.scenarios or k in args.scenarios}
    rows, runtime_info = run_runtime(args.bundle, chosen, args)
    compared = [compare_bundle(b, name, gate, chosen, args) for b, (name, gate) in zip(args.compare, names)]
    for c in compared:
        rows += c.pop("rows")
    # the runtime's whole run, compared bundles included (the PyTorch and peer sides run in their own processes)
    runtime_peak = max([benchlib.peak_rss_mb()] + [r["peak_rss_mb"] for r in rows if "peak_rss_mb" in r])
    ref_info = None
    if args.reference:
        ref_rows, ref_info = run_reference(args.reference, chosen, args, guard_prompt_texts(chosen))
        rows += ref_rows
    peer_info = None
    if args.peers:
        peer_rows, peer_info = run_peer(args, chosen, runtime_info.pop("text_prompts"), rows)
        rows += peer_rows
    runtime_info.pop("text_prompts", None)
    probe = benchlib.probe(args.probe_seconds, args.threads)
    doc = {"schema_version": benchlib.SCHEMA_VERSION, "kind": "latency", "system": benchlib.system_info(args.threads),
           "probe": probe, "runs": args.runs, "warmup": args.warmup,
           "budgets": {"new_tokens": args.new_tokens, "verdict_tokens": args.verdict_tokens},
           "bundle": {"path": str(args.bundle), "size_mb": benchlib.dir_size_mb(args.bundle), **runtime_info},
           "runtime_peak_rss_mb": runtime_peak, "reference": ref_info, "peers": peer_info, "rows": rows,
           "stage_definitions": STAGE_DEFINITIONS, "gate": {"floor_s": args.floor, "tolerance": args.tolerance},
           "speedups": speedups(rows, args.floor), "speedups_best": speedups(rows, args.floor, stat="min"),
           "time_to_verdict": time_to_verdict(rows), "peer_comparison": peer_comparison(rows)}
    doc["recipes"] = recipes_table(doc, compared) if compared else None
    doc["bounds"] = bounds(args.bundle, rows, probe)
    print_report(doc)
    benchlib.write_json(args.json, doc)  # first, so that nothing after it can lose the measurement
    if args.plot:
        benchlib.plot_stages(args.plot, rows, CHART_STAGES, f"time to first token by stage ({doc['system']['cpu']})")
    if base is None:
        return 0
    result = check_baseline(doc, base, args.tolerance, args.floor)
    again = sorted({s for k in result.regressed if (s := _runtime_scenario(k))})
    if again:
        # Timings on a shared machine drift for tens of seconds at a time (measured on 2 cores: the tiny text
        # prefill's best run at 10.7-11.8 ms for three consecutive runs, then 6.8-7.9 ms for thirteen). A
        # regression is measured once more before it is reported; `confirm` keeps only what reproduces.
        print(f"\nre-measuring {', '.join(again)} to confirm {len(result.regressed)} regression(s)")
        rows2, _ = run_runtime(args.bundle, {k: chosen[k] for k in again}, args)
        doc2 = dict(doc, rows=[r for r in rows if not (r["engine"] == "runtime" and r["scenario"] in again)] + rows2)
        result = confirm(result, check_baseline(doc2, base, args.tolerance, args.floor), again)
        doc["gate"]["confirmation"] = {"scenarios": again, "rows": rows2, "confirmed": sorted(result.regressed)}
    doc["gate"].update(regressions=result.problems, notes=result.notes)
    benchlib.write_json(args.json, doc)
    return benchlib.report_gate(result, args.baseline)


if __name__ == "__main__":
    sys.exit(main())
