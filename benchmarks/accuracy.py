"""Accuracy of one or more bundles (and optionally the PyTorch reference) on evaluation packs.

    python benchmarks/accuracy.py --bundle B [--bundle B2 ...] [--reference CHECKPOINT]
        [--packs xstest_prompts figstep_images my_set.jsonl ...] [--limit 50 --seed 0] [--mode constrained|free]
        [--json out.json] [--baseline baseline.json --tolerance 0.02 --p-tolerance 0.001]

Decision per item: the constrained verdict (P(unsafe) > 0.5 from the logits at the verdict position),
so every item gets a verdict; errors count as unsafe (fail closed) and are reported. Metrics: unsafe
precision / recall / F1, FPR on safe items, parse rate of the answer, per-category agreement, AUROC of
P(unsafe) per pack and its macro average over the packs that hold both labels (never pooled), and verdict
agreement and |P(unsafe) difference| (mean, p99, max) against the PyTorch reference and the fp32 bundle. A bundle
made by a precision recipe from trained weights is held to its recipe's trained gate against the fp32 bundle of
the same run (agreement, p99 |dP|, macro AUROC drop): exit 1 when one fails.
Packs, label rules and the JSONL format: calibration/evalpacks.py and docs/benchmarks.md.

Engines are named by what they are, not by folder: `runtime:<precision>` (plus `:<recipe>` when the bundle's
manifest names one; `#2`, `#3`... when one run holds several bundles of the same kind) and `pytorch`. The gate
refuses a baseline made on other packs, limit, seed or budget, fails when no metric is shared ("nothing to
compare"), and compares rates (precision, recall, F1, FPR, parse and error rates, agreement) with an absolute
tolerance and mean/max |P(unsafe) difference| with an absolute --p-tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402
import numpy as np  # noqa: E402
from omniguard_edge.calibration import evalpacks  # noqa: E402

DEFAULT_PACKS = ["xstest_prompts", "xstest_responses", "openai_moderation", "simple_safety_tests", "ailuminate",
                 "figstep_images", "benign_images"]
HIGHER = {"precision", "recall", "f1", "parse_rate", "verdict_agreement", "macro_auroc"}  # the rest: lower is better
RATES = {"precision", "recall", "f1", "fpr", "parse_rate", "error_rate", "verdict_agreement", "macro_auroc"}
P_DIFFS = {"p_unsafe_abs_diff_mean", "p_unsafe_abs_diff_p99", "p_unsafe_abs_diff_max"}
CONFIG_KEYS = ("packs", "limit", "seed", "new_tokens", "mode")  # a baseline made otherwise is not comparable


def predict_runtime(bundle: Path, items, args, bar) -> list[dict]:
    """Every item through a Guard on `bundle`, opened for this call alone (six small bundles together do not fit
    in 24 GiB). `--mode constrained` (the default): the runtime's default answer grammar, as deployed; `free`:
    free greedy decoding, as the PyTorch side decodes (token parity)."""
    import gc

    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.guard import Guard, GuardOptions

    guard = Guard.from_bundle(bundle, GuardOptions(max_new_tokens=args.new_tokens,
                                                   constrain_verdict=args.mode == "constrained",
                                                   session=SessionOptions(intra_op_threads=args.threads)))
    out = []
    for it in items:
        r = guard.moderate(it.text, it.response, image=it.image, audio=it.audio, video=it.video)
        out.append({"verdict": r.verdict, "p_unsafe": r.p_unsafe, "categories": [c["code"] for c in r.categories],
                    "error": r.error})
        bar.update(1)
    del guard
    gc.collect()
    return out


def cached_predictions(bundle: Path, manifest, items, args, bar) -> list[dict]:
    """predict_runtime, read from the cache when the same bundle (its files' hashes) already ran the same items
    (ids, labels, inputs) with the same mode and budget: the fp32 bundle is run once for all its recipes."""
    import hashlib
    import tempfile
    from importlib.metadata import version

    key = hashlib.sha256(json.dumps({
        "manifest": hashlib.sha256((Path(bundle) / "manifest.json").read_bytes()).hexdigest(),  # lists every file
        "items": evalpacks.items_digest(items), "mode": args.mode, "new_tokens": args.new_tokens,
        "versions": [version("omniguard-edge"), version("onnxruntime")]}, sort_keys=True).encode()).hexdigest()
    path = args.cache_dir / f"{key}.json"
    if not args.no_cache and path.is_file():
        preds = json.loads(path.read_text())
        if isinstance(preds, list) and len(preds) == len(items):
            bar.update(len(items))
            return preds
    preds = predict_runtime(bundle, items, args, bar)
    if not args.no_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".partial", delete=False) as f:
            json.dump(preds, f)
        Path(f.name).replace(path)
    return preds


def predict_reference(checkpoint: Path, items, args, bar) -> list[dict]:
    """The shared PyTorch reference (omniguard_edge.export.torch_reference): thinker.generate on the official
    preprocessing, P(unsafe) from the first step's raw logits."""
    from omniguard_edge.export.torch_reference import Media, Reference
    from omniguard_edge.runtime.verdict import parse

    ref = Reference(checkpoint, threads=args.threads)
    out = []
    for it in items:
        media = Media.load(image=it.image, video=it.video, audio=it.audio)
        inputs = ref.inputs(benchlib.guard_text(it.text, it.response, it.image, it.video, it.audio), media)
        tokens, first_logits = ref.generate(inputs, args.new_tokens, logits=True)
        parsed = parse(ref.tokenizer.decode(tokens, skip_special_tokens=True))
        out.append({"verdict": parsed.verdict, "p_unsafe": ref.p_unsafe(first_logits),
                    "categories": list(parsed.categories), "error": None})
        bar.update(1)
    return out


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


def gate_values(doc: dict) -> dict[str, float | None]:
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


def gate_metrics(doc: dict, rate_tolerance: float, p_tolerance: float) -> dict[str, "benchlib.Metric"]:
    out = {}
    for key, v in gate_values(doc).items():
        name = key.rsplit("/", 1)[-1]
        if name in P_DIFFS:
            out[key] = benchlib.Metric(v, p_tolerance, absolute=True)
        else:  # rates, category agreement included
            higher = name in HIGHER or "/category_agreement/" in key
            out[key] = benchlib.Metric(v, rate_tolerance, higher_is_better=higher, absolute=True)
    return out


def check_baseline(doc: dict, base: dict, rate_tolerance: float = 0.02, p_tolerance: float = 1e-3) -> "benchlib.GateResult":
    if base.get("kind") != "accuracy":
        return benchlib.GateResult(problems=[f"the baseline is a {base.get('kind')!r} result, not an accuracy result"])
    if base.get("schema_version") != benchlib.SCHEMA_VERSION:
        return benchlib.GateResult(problems=[
            f"the baseline has schema_version {base.get('schema_version')}, this accuracy.py writes "
            f"{benchlib.SCHEMA_VERSION} (engine keys and metrics changed): record a new baseline"])
    differ = [f"{k}: baseline {base.get(k)!r}, this run {doc.get(k)!r}" for k in CONFIG_KEYS if base.get(k) != doc.get(k)]
    items = {pk: (r or {}).get("items_sha256") for pk, r in base.get("loaded", {}).items()}
    now = {pk: (r or {}).get("items_sha256") for pk, r in doc.get("loaded", {}).items()}
    differ += [f"pack {pk}: other items (ids, labels and inputs hash {items[pk]} in the baseline, {now.get(pk)} now)"
               for pk in sorted(items) if pk in now and items[pk] != now[pk]]
    if differ:
        return benchlib.GateResult(problems=["the baseline was made on other items, so nothing is comparable: "
                                             + "; ".join(differ)])
    models = [f"{e}: baseline {base['engines'][e].get('model')}, this run {doc['engines'][e].get('model')}"
              for e in sorted(set(base["engines"]) & set(doc["engines"]))
              if base["engines"][e].get("model") != doc["engines"][e].get("model")]
    if models:
        return benchlib.GateResult(problems=["an engine of the same name ran another model or embedding dtype, so "
                                             "it is not comparable: " + "; ".join(models)])
    # every metric of the baseline must be measured again: a run without --reference or without a bundle
    # the baseline had cannot pass by leaving those comparisons out
    result = benchlib.compare_metrics(gate_metrics(doc, rate_tolerance, p_tolerance), gate_values(base),
                                      require_all=True)
    if not set(doc["engines"]) & set(base["engines"]):
        result.problems.insert(0, f"no engine in common: baseline {sorted(base['engines'])}, this run "
                                  f"{sorted(doc['engines'])}")
    return result


def main(argv=None) -> int:
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", required=True, help="repeatable")
    p.add_argument("--reference", type=Path, help="checkpoint to run through PyTorch + transformers too")
    p.add_argument("--packs", nargs="+", default=DEFAULT_PACKS,
                   help=f"packs ({', '.join(evalpacks.PACKS)}) and/or .jsonl files")
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="seed data folder")
    p.add_argument("--limit", type=int, help="items per pack, sampled with --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["heldout", "train", "all"], default="heldout",
                   help="side of the one train/held-out split of the seed data (calibration/split.py) to judge on; "
                        "a checkpoint fitted on labelled text (small-real) must be judged on heldout (the default)")
    p.add_argument("--new-tokens", type=int, default=16, help="generation budget per item (verdict first)")
    p.add_argument("--mode", choices=["constrained", "free"], default="constrained",
                   help="constrained (default): the runtime's answer grammar, as deployed; free: free greedy decoding, "
                        "as the PyTorch side decodes (for token parity with --reference)")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "omniguard-edge" / "accuracy",
                   help="bundles' predictions by their files' hashes, items, mode and budget (the fp32 bundle runs "
                        "once for all its recipes)")
    p.add_argument("--no-cache", action="store_true", help="run every bundle, read and write no cache")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--media-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "omniguard-edge" / "eval-media")
    p.add_argument("--json", type=Path)
    p.add_argument("--save-items", action="store_true", help="include every item's predictions in the JSON")
    p.add_argument("--baseline", type=Path)
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="allowed regression of a rate (precision, recall, F1, FPR, agreement...), absolute (default 0.02)")
    p.add_argument("--p-tolerance", type=float, default=1e-3,
                   help="allowed increase of mean/max |P(unsafe) difference| against PyTorch or fp32, absolute")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.new_tokens < 1 or args.tolerance < 0 or args.p_tolerance < 0:
        p.error("--new-tokens must be >= 1, --tolerance and --p-tolerance >= 0")
    if args.baseline and not args.baseline.is_file():
        p.error(f"--baseline {args.baseline} is not a file")
    items, loaded = evalpacks.load_with_report(args.packs, args.data, args.media_dir, args.limit, args.seed,
                                               None if args.split == "all" else args.split)
    if not items:
        p.error("no items: check --packs and --data")
    from omniguard_edge.runtime.manifest import files_digest, load_manifest, weights_of

    preds, random_weights, fp32 = {}, False, None
    manifests = [load_manifest(b) for b in args.bundle]
    names = engine_names([runtime_kind(m) for m in manifests])
    bundles = {}
    with tqdm(total=len(items) * (len(args.bundle) + bool(args.reference)), desc="accuracy", unit="item") as bar:
        for bundle, m, name in zip(args.bundle, manifests, names):
            random_weights |= weights_of(m.source) == "random"
            if m.precision == "fp32" and fp32 is None:
                fp32 = name
            bundles[name] = {"bundle": str(bundle), "model": model_identity(m)}
            preds[name] = cached_predictions(bundle, m, items, args, bar)
        if args.reference:
            random_weights |= (args.reference / "REFERENCE.md").exists()
            preds["pytorch"] = predict_reference(args.reference, items, args, bar)
    packs = sorted({it.pack for it in items})
    engines = {}
    for name, pr in preds.items():
        per_pack = {pk: metrics([i for i in items if i.pack == pk], [x for i, x in zip(items, pr) if i.pack == pk])
                    for pk in packs}
        overall = metrics(items, pr)
        del overall["auroc"]  # never pooled over packs
        overall["macro_auroc"] = macro_auroc(per_pack)
        engines[name] = {"overall": overall, "per_pack": per_pack,
                         **(bundles[name] if name in bundles else
                            {"bundle": None, "model": reference_identity(args.reference)})}
    agree = {}
    for name, pr in preds.items():
        if name == "pytorch":
            continue
        agree[name] = {}
        if "pytorch" in preds:
            agree[name]["vs_reference"] = agreement(pr, preds["pytorch"])
        if fp32 and name != fp32:
            agree[name]["vs_fp32"] = agreement(pr, preds[fp32])
        if not agree[name]:
            del agree[name]
    gates = {}
    for name, m in zip(names, manifests):
        if fp32 and name != fp32 and (gate := recipe_gate(m, engines[name], engines[fp32], agree[name]["vs_fp32"],
                                                          files_digest(manifests[names.index(fp32)]))):
            gates[name] = gate
    note = ("RANDOM WEIGHTS: a reference checkpoint's verdicts mean nothing, so precision, recall and F1 are "
            "meaningless here; agreement with PyTorch and with the fp32 bundle is the meaningful number."
            if random_weights else "real checkpoint: F1 and agreement are both meaningful")
    doc = {"schema_version": benchlib.SCHEMA_VERSION, "kind": "accuracy", "random_weights": random_weights,
           "note": note, "packs": packs, "limit": args.limit, "seed": args.seed, "split": args.split, "new_tokens": args.new_tokens,
           "mode": args.mode, "n_items": len(items), "loaded": loaded, "recipe_gates": gates,
           "system": benchlib.system_info(args.threads), "engines": engines, "agreement": agree}
    if args.save_items:
        doc["items"] = [dict(it.to_dict(), predictions={n: pr[i] for n, pr in preds.items()}) for i, it in enumerate(items)]
    headers = ["engine", "n", "precision", "recall", "F1", "FPR", "parse rate", "errors"]
    print(benchlib.markdown_table(headers, [[n, e["overall"]["n"], e["overall"]["precision"], e["overall"]["recall"],
                                             e["overall"]["f1"], e["overall"]["fpr"], e["overall"]["parse_rate"],
                                             e["overall"]["errors"]] for n, e in engines.items()]))
    print("\n" + benchlib.markdown_table(
        ["engine", "macro AUROC"] + [f"{pk} F1 / AUROC" for pk in packs],
        [[n, e["overall"]["macro_auroc"]] + [_f1_auroc(e["per_pack"][pk]) for pk in packs] for n, e in engines.items()]))
    rows = [[n, against, f["verdict_agreement"], f["p_unsafe_abs_diff_mean"], f["p_unsafe_abs_diff_p99"],
             f["p_unsafe_abs_diff_max"]] for n, ag in agree.items() for against, f in ag.items()]
    if rows:
        print("\n" + benchlib.markdown_table(["engine", "against", "verdict agreement", "mean abs dP(unsafe)",
                                              "p99 abs dP(unsafe)", "max abs dP(unsafe)"], rows))
    if gates:
        print("\n" + benchlib.markdown_table(
            ["engine", "recipe gate (trained weights)", "AUROC drop", "failures"],
            [[n, "passed" if g["passed"] else "FAILED", g["auroc_drop"], "; ".join(g["failures"]) or "-"]
             for n, g in gates.items()]))
    print("\nitems per pack: " + "; ".join(
        f"{pk}: {r['sampled']} used of {r['kept']} kept, {r['source_rows']} in the source"
        + (" (dropped: " + ", ".join(f"{n} {why}" for why, n in r["dropped"].items()) + ")" if r["dropped"] else "")
        for pk, r in loaded.items()))
    print(f"\n{note}")
    benchlib.write_json(args.json, doc)
    failed = [n for n, g in gates.items() if not g["passed"]]
    if failed:
        print(f"\nrecipe gate FAILED: {', '.join(failed)}")
    if args.baseline:
        result = check_baseline(doc, json.loads(args.baseline.read_text()), args.tolerance, args.p_tolerance)
        return max(benchlib.report_gate(result, args.baseline), 1 if failed else 0)
    return 1 if failed else 0


def _f1_auroc(m: dict) -> str:
    f1 = "-" if m["f1"] is None else f"{m['f1']:.3f}"
    return f"{f1} / {'-' if m.get('auroc') is None else format(m['auroc'], '.3f')}"


if __name__ == "__main__":
    sys.exit(main())
