"""Accuracy of one or more bundles (and optionally the PyTorch reference) on evaluation packs.

    python -m benchmarks.accuracy --bundle B [--bundle B2 ...] [--reference CHECKPOINT]
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
tolerance and mean/max |P(unsafe) difference| with an absolute --p-tolerance (scoring.accuracy_gate).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if not __package__:  # run by path: import the package from the repository root, as `python -m` does
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "benchmarks"

from omniguard_edge.calibration import evalpacks  # noqa: E402

from . import SCHEMA_VERSION, report, scoring  # noqa: E402
from .engines import cached_predictions, predict_reference  # noqa: E402
from .gate import load_baseline, report_gate  # noqa: E402
from .system import system_info  # noqa: E402

DEFAULT_PACKS = ["xstest_prompts", "xstest_responses", "openai_moderation", "simple_safety_tests", "ailuminate",
                 "figstep_images", "benign_images"]


def parser() -> argparse.ArgumentParser:
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
    return p


def predict(args, items, manifests: list, names: list[str]) -> dict[str, list[dict]]:
    """Every item's prediction by each bundle (read from the cache where it ran them before) and by the PyTorch
    reference with --reference, by engine name."""
    from tqdm import tqdm

    preds = {}
    with tqdm(total=len(items) * (len(args.bundle) + bool(args.reference)), desc="accuracy", unit="item") as bar:
        for bundle, m, name in zip(args.bundle, manifests, names):
            preds[name] = cached_predictions(bundle, m, items, args, bar)
        if args.reference:
            preds["pytorch"] = predict_reference(args.reference, items, args, bar)
    return preds


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.new_tokens < 1 or args.tolerance < 0 or args.p_tolerance < 0:
        p.error("--new-tokens must be >= 1, --tolerance and --p-tolerance >= 0")
    base = load_baseline(p, args.baseline)  # read before minutes of measuring, not after
    items, loaded = evalpacks.load_with_report(args.packs, args.data, args.media_dir, args.limit, args.seed,
                                               None if args.split == "all" else args.split)
    if not items:
        p.error("no items: check --packs and --data")
    from omniguard_edge.runtime.manifest import load_manifest, weights_of

    manifests = [load_manifest(b) for b in args.bundle]
    names = scoring.engine_names([scoring.runtime_kind(m) for m in manifests])
    fp32 = next((name for name, m in zip(names, manifests) if m.precision == "fp32"), None)
    preds = predict(args, items, manifests, names)
    random_weights = any(weights_of(m.source) == "random" for m in manifests) or \
        bool(args.reference and (args.reference / "REFERENCE.md").exists())
    identity = {name: {"bundle": str(b), "model": scoring.model_identity(m)}
                for b, m, name in zip(args.bundle, manifests, names)}
    if args.reference:
        identity["pytorch"] = {"bundle": None, "model": scoring.reference_identity(args.reference)}
    engines = {name: {**scoring.engine_scores(items, pr), **identity[name]} for name, pr in preds.items()}
    agree = scoring.agreements(preds, fp32)
    gates = scoring.recipe_gates(names, manifests, engines, agree, fp32)
    note = ("RANDOM WEIGHTS: a reference checkpoint's verdicts mean nothing, so precision, recall and F1 are "
            "meaningless here; agreement with PyTorch and with the fp32 bundle is the meaningful number."
            if random_weights else "real checkpoint: F1 and agreement are both meaningful")
    doc = {"schema_version": SCHEMA_VERSION, "kind": "accuracy", "random_weights": random_weights,
           "note": note, "packs": sorted({it.pack for it in items}), "limit": args.limit, "seed": args.seed,
           "split": args.split, "new_tokens": args.new_tokens, "mode": args.mode, "n_items": len(items),
           "loaded": loaded, "recipe_gates": gates, "system": system_info(args.threads), "engines": engines,
           "agreement": agree}
    if args.save_items:
        doc["items"] = [dict(it.to_dict(), predictions={n: pr[i] for n, pr in preds.items()}) for i, it in enumerate(items)]
    report.print_accuracy(doc)
    report.write_json(args.json, doc)
    failed = [n for n, g in gates.items() if not g["passed"]]
    if failed:
        print(f"\nrecipe gate FAILED: {', '.join(failed)}")
    if base is not None:
        result = scoring.accuracy_gate(args.tolerance, args.p_tolerance).check(doc, base)
        return max(report_gate(result, args.baseline), 1 if failed else 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
