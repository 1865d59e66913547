"""Accuracy's scores: each item's decision, failing closed; precision, recall, F1, FPR and AUROC per pack; agreement
between engines; a recipe bundle's trained gate; the engines' names; and what of them the baseline gate compares
(`accuracy_gate`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .gate import Comparison, Gate, GateResult, Metric


def decision(pred: dict) -> str:
    """The item's verdict: P(unsafe) > 0.5 when there is one, else the parsed verdict. Fails closed: an error,
    a non-finite P(unsafe) or anything but an explicit `safe` is unsafe."""
    p = pred["p_unsafe"]
    if pred["error"] or (p is not None and not math.isfinite(p)):
        return "unsafe"
    if p is not None:
        return "unsafe" if p > 0.5 else "safe"
    return "safe" if pred["verdict"] == "safe" else "unsafe"


def metrics(items, preds) -> dict:
    tp = sum(1 for it, p in zip(items, preds) if it.label == "unsafe" and decision(p) == "unsafe")
    fp = sum(1 for it, p in zip(items, preds) if it.label == "safe" and decision(p) == "unsafe")
    fn = sum(1 for it, p in zip(items, preds) if it.label == "unsafe" and decision(p) == "safe")
    safe_n = sum(1 for it in items if it.label == "safe")
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if precision is not None and recall is not None else None)
    per_cat = {}
    for it, p in zip(items, preds):
        for code in it.categories:
            hit = decision(p) == "unsafe" and code in p["categories"]
            n, k = per_cat.get(code, (0, 0))
            per_cat[code] = (n + 1, k + hit)
    return {"n": len(items), "precision": precision, "recall": recall, "f1": f1,
            "fpr": fp / safe_n if safe_n else None,
            "parse_rate": sum(p["verdict"] in ("safe", "unsafe") for p in preds) / len(preds) if preds else None,
            "errors": sum(1 for p in preds if p["error"]),
            "error_rate": sum(1 for p in preds if p["error"]) / len(preds) if preds else None,
            "auroc": _auroc(items, preds),
            "category_agreement": {c: k / n for c, (n, k) in sorted(per_cat.items())}}


def engine_scores(items, preds: list[dict]) -> dict:
    """One engine's metrics per pack and overall; overall, the macro AUROC over the packs (never a pooled one)."""
    packs = sorted({it.pack for it in items})
    per_pack = {pk: metrics([i for i in items if i.pack == pk], [x for i, x in zip(items, preds) if i.pack == pk])
                for pk in packs}
    overall = metrics(items, preds)
    del overall["auroc"]  # never pooled over packs
    overall["macro_auroc"] = macro_auroc(per_pack)
    return {"overall": overall, "per_pack": per_pack}


def score(pred: dict) -> float:
    """P(unsafe) for ranking, failing closed: an error, no P(unsafe) or a non-finite one ranks as unsafe (1)."""
    p = pred["p_unsafe"]
    return 1.0 if pred["error"] or p is None or not math.isfinite(p) else float(p)


def _auroc(items, preds) -> float | None:
    """AUROC of P(unsafe) over these items (None without both labels). Overall results report a macro average over
    packs instead (`macro_auroc`): a pooled AUROC could be won by telling packs apart."""
    from omniguard_edge.calibration.metrics import auroc

    value = auroc([score(p) for p in preds], [it.label == "unsafe" for it in items])
    return None if math.isnan(value) else value


def macro_auroc(per_pack: dict) -> float | None:
    """The mean of the per-pack metrics' AUROCs over the packs that hold both labels."""
    from omniguard_edge.calibration.metrics import mean_defined

    return mean_defined(m.get("auroc") for m in per_pack.values())


def agreement(a: list[dict], b: list[dict]) -> dict:
    if len(a) != len(b):
        raise ValueError(f"agreement needs predictions of the same items ({len(a)} vs {len(b)})")
    from omniguard_edge.calibration.metrics import abs_diffs

    same = [decision(x) == decision(y) for x, y in zip(a, b)]
    diffs = abs_diffs((x["p_unsafe"], y["p_unsafe"]) for x, y in zip(a, b))
    return {"verdict_agreement": sum(same) / len(same) if same else None,
            "p_unsafe_abs_diff_mean": sum(diffs) / len(diffs) if diffs else None,
            "p_unsafe_abs_diff_p99": float(np.percentile(diffs, 99)) if diffs else None,
            "p_unsafe_abs_diff_max": max(diffs) if diffs else None}


def agreements(preds: dict[str, list[dict]], fp32: str | None) -> dict:
    """Each runtime engine's agreement with the PyTorch reference (`vs_reference`) and with the run's fp32 bundle
    (`vs_fp32`), where the run has them."""
    out = {}
    for name, pr in preds.items():
        if name == "pytorch":
            continue
        ag = {}
        if "pytorch" in preds:
            ag["vs_reference"] = agreement(pr, preds["pytorch"])
        if fp32 and name != fp32:
            ag["vs_fp32"] = agreement(pr, preds[fp32])
        if ag:
            out[name] = ag
    return out


def recipe_gate(manifest, engine: dict, fp32: dict, against: dict, fp32_digest: str | None) -> dict | None:
    """The recipe's trained gate (calibration/recipes.py TrainedGate) on this run's items, for a bundle made by a
    recipe from trained weights (None otherwise: random weights' verdicts mean nothing). `fp32_digest`: the run's
    fp32 bundle's files digest, which the recipe bundle's manifest must name as its source."""
    from omniguard_edge.runtime.recipes import RECIPES
    from omniguard_edge.runtime.manifest import weights_of

    name = (manifest.recipe or {}).get("name")
    if not name or weights_of(manifest.source) == "random":
        return None
    if name not in RECIPES or RECIPES[name].trained_gate is None:
        return {"recipe": name, "limits": None, "auroc_drop": None, "passed": False,
                "failures": [f"recipe {name!r} has no trained gate to judge trained weights by"]}
    g = RECIPES[name].trained_gate
    drop = (fp32["overall"]["macro_auroc"] - engine["overall"]["macro_auroc"]
            if fp32["overall"]["macro_auroc"] is not None and engine["overall"]["macro_auroc"] is not None else None)
    failures = []
    if manifest.recipe.get("source_bundle", {}).get("files_sha256") != fp32_digest:
        failures.append("made from another fp32 bundle than the one in this run (its source_bundle.files_sha256 "
                        "differs): it is not judged against its own source")
    if engine["overall"]["errors"]:  # fail closed: a bundle that cannot answer is no guard
        failures.append(f"{engine['overall']['errors']} items without a verdict (errors)")
    if against["verdict_agreement"] is None or against["verdict_agreement"] < g.agreement:
        failures.append(f"verdict agreement {against['verdict_agreement']} < {g.agreement}")
    if against["p_unsafe_abs_diff_p99"] is None or against["p_unsafe_abs_diff_p99"] > g.dp_p99:
        failures.append(f"P(unsafe) |delta| p99 {against['p_unsafe_abs_diff_p99']} > {g.dp_p99}")
    if drop is None or drop > g.auroc_drop:
        failures.append(f"macro AUROC drop {drop} > {g.auroc_drop}" if drop is not None else
                        "macro AUROC drop unmeasured (no pack with both labels)")
    return {"recipe": name, "limits": {"agreement": g.agreement, "dp_p99": g.dp_p99, "auroc_drop": g.auroc_drop},
            "auroc_drop": drop, "passed": not failures, "failures": failures}


def recipe_gates(names: list[str], manifests: list, engines: dict, agree: dict, fp32: str | None) -> dict:
    """`recipe_gate` of every bundle engine but the fp32 one, against it, where one applies."""
    from omniguard_edge.runtime.manifest import files_digest

    if not fp32:
        return {}
    digest = files_digest(manifests[names.index(fp32)])
    gates = {name: recipe_gate(m, engines[name], engines[fp32], agree[name]["vs_fp32"], digest)
             for name, m in zip(names, manifests) if name != fp32}
    return {name: g for name, g in gates.items() if g}


def engine_names(kinds: list[str]) -> list[str]:
    """Unique engine keys from engine kinds (`runtime:fp32`, ...): the second of a kind gets `#2`, and so on."""
    seen, out = {}, []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        out.append(kind if seen[kind] == 1 else f"{kind}#{seen[kind]}")
    return out


def model_identity(manifest) -> str:
    """What a runtime engine ran, beyond its precision: the source checkpoint's config hash and the embedding
    table's dtype (a renamed or copied bundle keeps both)."""
    return f"config {manifest.source.get('config_sha256', '?')[:16]}, embedding {manifest.embedding.get('dtype')}"


def reference_identity(checkpoint: Path) -> str:
    """The PyTorch engine's model: its checkpoint's config hash (as a bundle's manifest records it)."""
    import hashlib

    return f"config {hashlib.sha256((Path(checkpoint) / 'config.json').read_bytes()).hexdigest()[:16]}, fp32"


def runtime_kind(manifest) -> str:
    recipe = getattr(manifest, "recipe", None)
    if isinstance(recipe, dict):  # a manifest's recipe record: the recipe's name
        recipe = recipe.get("name")
    return f"runtime:{manifest.precision}" + (f":{recipe}" if recipe else "")


# -- accuracy: rates and |P(unsafe)| differences per engine, absolute tolerances ---------------------------------

HIGHER = {"precision", "recall", "f1", "parse_rate", "verdict_agreement", "macro_auroc"}  # the rest: lower is better
RATES = {"precision", "recall", "f1", "fpr", "parse_rate", "error_rate", "verdict_agreement", "macro_auroc"}
P_DIFFS = {"p_unsafe_abs_diff_mean", "p_unsafe_abs_diff_p99", "p_unsafe_abs_diff_max"}
CONFIG_KEYS = ("packs", "limit", "seed", "new_tokens", "mode")  # a baseline made otherwise is not comparable


def accuracy_gate(rate_tolerance: float = 0.02, p_tolerance: float = 1e-3) -> Gate:
    """accuracy.py's gate: rates (precision, recall, F1, FPR, parse and error rates, agreement) within an absolute
    `rate_tolerance`, mean/p99/max |P(unsafe) difference| within an absolute `p_tolerance`. Every metric of the
    baseline must be measured again: a run without --reference or without a bundle the baseline had cannot pass by
    leaving those comparisons out. A baseline made on other packs, items, limit, seed, budget or mode, or whose
    engine of the same name ran another model, is refused. Nothing is measured again: the same items give the same
    answers."""
    return Gate("accuracy", "engine keys and metrics changed", refusals=(_other_items, _other_models),
                compare=lambda doc, base: Comparison(_accuracy_metrics(doc, rate_tolerance, p_tolerance),
                                                     accuracy_values(base), require_all=True),
                settle=_no_engine_in_common)


def accuracy_values(doc: dict) -> dict[str, float | None]:
    """Flat `engine/metric` and `engine/vs_<other>/metric` values of a result, None kept (a metric that
    cannot be computed, like precision with no unsafe prediction, is compared as undefined, not dropped)."""
    flat = {}
    for engine, e in doc["engines"].items():
        for k, v in e["overall"].items():
            if k in RATES:
                flat[f"{engine}/{k}"] = v
        for code, v in e["overall"].get("category_agreement", {}).items():
            flat[f"{engine}/category_agreement/{code}"] = v
    for engine, ag in doc["agreement"].items():
        for against, figures in ag.items():
            for k, v in figures.items():
                flat[f"{engine}/{against}/{k}"] = v
    return flat


def _accuracy_metrics(doc: dict, rate_tolerance: float, p_tolerance: float) -> dict[str, Metric]:
    out = {}
    for key, v in accuracy_values(doc).items():
        name = key.rsplit("/", 1)[-1]
        if name in P_DIFFS:
            out[key] = Metric(v, p_tolerance, absolute=True)
        else:  # rates, category agreement included
            higher = name in HIGHER or "/category_agreement/" in key
            out[key] = Metric(v, rate_tolerance, higher_is_better=higher, absolute=True)
    return out


def _other_items(doc: dict, base: dict) -> str | None:
    differ = [f"{k}: baseline {base.get(k)!r}, this run {doc.get(k)!r}" for k in CONFIG_KEYS if base.get(k) != doc.get(k)]
    items = {pk: (r or {}).get("items_sha256") for pk, r in base.get("loaded", {}).items()}
    now = {pk: (r or {}).get("items_sha256") for pk, r in doc.get("loaded", {}).items()}
    differ += [f"pack {pk}: other items (ids, labels and inputs hash {items[pk]} in the baseline, {now.get(pk)} now)"
               for pk in sorted(items) if pk in now and items[pk] != now[pk]]
    return "the baseline was made on other items, so nothing is comparable: " + "; ".join(differ) if differ else None


def _other_models(doc: dict, base: dict) -> str | None:
    models = [f"{e}: baseline {base['engines'][e].get('model')}, this run {doc['engines'][e].get('model')}"
              for e in sorted(set(base["engines"]) & set(doc["engines"]))
              if base["engines"][e].get("model") != doc["engines"][e].get("model")]
    return ("an engine of the same name ran another model or embedding dtype, so it is not comparable: "
            + "; ".join(models) if models else None)


def _no_engine_in_common(doc: dict, base: dict, result: GateResult) -> None:
    if not set(doc["engines"]) & set(base["engines"]):
        result.problems.insert(0, f"no engine in common: baseline {sorted(base['engines'])}, this run "
                                  f"{sorted(doc['engines'])}")
