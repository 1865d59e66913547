"""The latency stages, defined once for every engine; one moderation's figures under them; and what of them the
baseline gate compares (`latency_gate`)."""

from __future__ import annotations

import math

import numpy as np

from .gate import Comparison, Gate, GateResult, Metric
from .system import same_machine

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


def summarize(samples: list[float]) -> dict:
    """min, p50, p95, max (and p99 once there are >= 100 samples, where it means something), in seconds."""
    arr = np.asarray(samples, dtype=np.float64)
    out = {"n": int(arr.size), "min": float(arr.min()), "p50": float(np.percentile(arr, 50)),
           "p95": float(np.percentile(arr, 95)), "max": float(arr.max()), "mean": float(arr.mean())}
    if arr.size >= 100:
        out["p99"] = float(np.percentile(arr, 99))
    return out


def runtime_stage_samples(timings: dict, token_times: list[float], verdict_tokens: int | None) -> dict:
    """One moderation's figures under STAGE_DEFINITIONS, from the Guard's timings (seconds per part;
    `generate_start`: from the call to the start of prefill) and token times (seconds from the start of
    prefill to each generated token). `verdict_tokens` None: the verdict is the Guard's own `verdict` timing
    (from the call until the verdict token is known) and `total` the Guard's `total` (runtime-default rows)."""
    if verdict_tokens is not None and len(token_times) < verdict_tokens:
        raise ValueError(f"{len(token_times)} tokens generated, fewer than --verdict-tokens {verdict_tokens}")
    t = timings
    out = {"preprocess": t.get("preprocess", 0.0) + t.get("prompt", 0.0)}
    out.update({k: t.get(k, 0.0) for k in ("vision", "audio", "embed", "prefill")})
    before = t["generate_start"]  # everything before prefill, gaps included
    out["first_token"] = before + token_times[0]
    if verdict_tokens is None:
        out["verdict"], out["total"] = t["verdict"], t["total"]
    else:
        out["verdict"] = before + token_times[verdict_tokens - 1]
        out["total"] = before + token_times[-1]  # to the last token, as PyTorch's (no detokenizing or parsing)
    span = token_times[-1] - token_times[0]
    out["decode_tok_s"] = (len(token_times) - 1) / span if span > 0 else float("nan")
    return out


# -- latency: the runtime's own seconds on the baseline's machine, runtime/PyTorch ratios from another ---------------

def latency_gate(tolerance: float, floor: float = 0.005) -> Gate:
    """latency.py's gate. On the baseline's machine (same CPU model, flags, threads): the runtime's own seconds of
    GATED stages and its decode, stages under `floor` seconds on both sides skipped and differences under it not
    counted; a regression's scenario is measured again. From another machine: runtime/PyTorch ratios only. Never
    PyTorch's seconds. A baseline of another bundle, engine, warm-up or budget is refused."""
    return Gate("latency", "the stage definitions changed in between (see STAGE_DEFINITIONS)",
                refusals=(_other_bundle, _other_warmup, _other_budgets),
                compare=lambda doc, base: _latency_comparison(doc, base, tolerance, floor),
                settle=_no_ratio_across_machines, group=runtime_scenario)


def runtime_scenario(key: str) -> str | None:
    """The scenario of a gate key `runtime/<scenario>/<stage>`, else None (ratios are not measured again)."""
    parts = key.split("/")
    return parts[1] if parts[0] == "runtime" and len(parts) > 1 else None


def _other_bundle(doc: dict, base: dict) -> str | None:
    ident = ("config_sha256", "embedding_dtype", "precision", "providers")
    other = [f"{k}: baseline {base.get('bundle', {}).get(k)}, this run {doc['bundle'].get(k)}" for k in ident
             if base.get("bundle", {}).get(k) != doc["bundle"].get(k)]
    return ("the baseline measured another bundle or engine, so its figures are not comparable: " + "; ".join(other)
            if other else None)


def _other_warmup(doc: dict, base: dict) -> str | None:
    if base.get("warmup") == doc.get("warmup"):
        return None
    return (f"the baseline ran {base.get('warmup')} warm-up call(s) per scenario, this run {doc.get('warmup')}: a "
            "process's first calls are slower (docs/performance.md \"Threads\"), so the figures are not comparable; "
            "use the same --warmup (default 3) or record a new baseline")


def _other_budgets(doc: dict, base: dict) -> str | None:
    if base.get("budgets") == doc.get("budgets"):
        return None
    return (f"the baseline answered other budgets ({base.get('budgets')}, this run {doc.get('budgets')}): verdict, "
            "total and decode figures are not comparable; use the same --new-tokens and --verdict-tokens")


def _latency_comparison(doc: dict, base: dict, tolerance: float, floor: float) -> Comparison:
    if same_machine(doc["system"], base["system"]):
        c = _runtime_seconds(doc, base, tolerance, floor)
    else:
        c = _ratios(doc, base, tolerance)
    if base.get("runs") != doc.get("runs"):
        c.notes.append(f"the baseline has {base.get('runs')} runs per scenario, this run {doc.get('runs')}: the best "
                       "of more runs is lower, so best-run comparisons lean towards the run with more")
    return c


def _ratios(doc: dict, base: dict, tolerance: float) -> Comparison:
    b, c = base["system"], doc["system"]
    out = Comparison({}, {}, {}, notes=[
        f"baseline from another machine ({b.get('cpu')}, flags {b.get('cpu_flags')}, {b.get('threads')} threads; "
        f"this run: {c.get('cpu')}, flags {c.get('cpu_flags')}, {c.get('threads')} threads): only runtime/PyTorch "
        "ratios are compared"])
    for scenario, ratios in doc.get("speedups", {}).items():
        best = doc.get("speedups_best", {}).get(scenario, {})
        for stage, value in ratios.items():
            if value is not None:  # None: a side under the floor (or no decode): nothing to compare
                out.current[f"speedup/{scenario}/{stage}"] = Metric(value, tolerance, higher_is_better=True,
                                                                    best=best.get(stage))
    for scenario, ratios in base.get("speedups", {}).items():
        best = base.get("speedups_best", {}).get(scenario, {})
        for stage, value in ratios.items():
            if value is not None:
                out.baseline[f"speedup/{scenario}/{stage}"] = value
                out.baseline_best[f"speedup/{scenario}/{stage}"] = best.get(stage)
    return out


def _runtime_seconds(doc: dict, base: dict, tolerance: float, floor: float) -> Comparison:
    out = Comparison({}, {}, {}, notes=[
        "baseline from this machine (same CPU, flags, threads): the runtime's own seconds are compared; "
        "runtime/PyTorch ratios are not, so a PyTorch-only change cannot fail or hide anything"])
    base_rows = {r["scenario"]: r["stages"] for r in base["rows"] if r["engine"] == "runtime"}
    # decode is gated as the time its rate implies for the answer's steps after the first token
    # ((tokens - 1) / rate; 31 tiny-model steps take ~10 ms), so that the floor applies in seconds
    steps = doc["budgets"]["new_tokens"] - 1
    for r in doc["rows"]:
        if r["engine"] != "runtime" or r["scenario"] not in base_rows:
            continue
        old = base_rows[r["scenario"]]
        pairs = [(stage, r["stages"].get(stage), old.get(stage)) for stage in GATED]
        pairs.append(("decode_span_s", _decode_span(r["stages"].get("decode_tok_s"), steps),
                      _decode_span(old.get("decode_tok_s"), steps)))
        for stage, now, then in pairs:
            if now is None or then is None:
                continue
            key = f"runtime/{r['scenario']}/{stage}"
            if now["p50"] is not None and then["p50"] is not None and max(now["p50"], then["p50"]) < floor:
                out.notes.append(f"{key}: {now['p50'] * 1e3:.2f} ms now, {then['p50'] * 1e3:.2f} ms in the baseline, "
                                 f"both under the {floor * 1e3:g} ms floor: not compared")
                continue
            out.current[key] = Metric(now["p50"], tolerance, best=now["min"], floor=floor)
            out.baseline[key], out.baseline_best[key] = then["p50"], then["min"]
    return out


def _decode_span(rate: dict | None, steps: int) -> dict | None:
    """A decode-rate summary as the seconds it implies for `steps` steps: p50 from the p50 rate, min (the best
    run) from the highest rate. None for an undefined rate."""
    if rate is None:
        return None

    def span(v):
        return steps / v if v and math.isfinite(v) and v > 0 else None

    return {"p50": span(rate.get("p50")), "min": span(rate.get("max"))}


def _no_ratio_across_machines(doc: dict, base: dict, result: GateResult) -> None:
    if result.compared == 0 and not same_machine(doc["system"], base["system"]):
        result.problems.append("across machines only runtime/PyTorch ratios compare: run latency.py with "
                               "--reference both for the baseline and now")
