"""Calibration's commands: recipes, quantize (registered by omniguard_edge/cli.py); the recipe options `export
--recipe` shares. Importing this module imports no onnx: quantize checks its extra first."""

from __future__ import annotations

import json
from pathlib import Path

from ..runtime.commandline import EXIT_ERROR, MAX_THREADS, bundle_dir, check_extra, int_in
from ..runtime.recipes import RECIPES


def recipe_options(p) -> None:
    """The options of a recipe run, shared by `quantize` and `export --recipe`."""
    data = p.add_mutually_exclusive_group()
    data.add_argument("--calibration", type=Path,
                      help="calibration data folder laid out like ../shared/data (default: ../shared/data when "
                           "present)")
    data.add_argument("--no-calibration", action="store_true",
                      help="use no data folder: held-out inputs and agreement from requests made here (every recipe "
                           "but trt-int8, whose activation scales need the data)")
    p.add_argument("--allow-failing", action="store_true",
                   help="write the bundle even when it fails its gate (the manifest says so)")
    p.add_argument("--no-fidelity", action="store_true",
                   help="do not run the fp32 bundle (one too large for this machine's memory): no fidelity report, so "
                        "the gate fails and --allow-failing is required; not for trt-int8")


def cmd_recipes(args) -> int:
    if args.json:
        print(json.dumps({name: r.to_dict() for name, r in RECIPES.items()}, indent=2))
        return 0
    for r in RECIPES.values():
        state = "" if r.built else "  [not built yet]"
        plans = ", ".join(f"{g}: {p.method}" + (f" {p.params}" if p.params else "") for g, p in r.graphs.items())
        print(f"{r.name:9s} {r.target:7s} {r.precision:5s} {r.summary}{state}\n"
              f"{'':24s}graphs: {plans}\n{'':24s}calibration data: {'required' if r.needs_calibration else 'not needed'}"
              f"; runs on: {r.runs_on}")
    return 0


def cmd_quantize(args) -> int:
    if rc := check_extra("quantize"):
        return rc
    from .quantize import quantize_bundle

    result = quantize_bundle(args.bundle, args.recipe, out=args.out, calibration=calibration_of(args),
                             overwrite=args.overwrite, allow_failing=args.allow_failing, limit=args.limit,
                             seed=args.seed, threads=args.threads, progress=not args.quiet,
                             measure=not args.no_fidelity, packs=args.packs)
    return quantize_report(result, args.json)


def calibration_of(args):
    return None if args.no_calibration else (args.calibration or "auto")


def quantize_report(result, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"out": str(result.out) if result.out else None, "recipe": result.recipe,
                          "passed": result.passed, "fidelity": result.fidelity}, indent=2))
    else:
        print(result.table())
        if result.out:
            print(f"bundle written to {result.out}" + ("" if result.passed else " (FAILING its gate: --allow-failing)"))
        else:
            print("no bundle written: the recipe failed its gate (--allow-failing writes it, marked as failing)")
    return 0 if result.passed else EXIT_ERROR



def register(sub) -> None:
    p = sub.add_parser("recipes", help="list the precision recipes (cpu-int8, cpu-int4, gpu-fp16, trt-int8, orin)")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("quantize", help="apply a precision recipe to an fp32 bundle, with a fidelity report and gate "
                                        "(needs the quantize extra)")
    p.add_argument("--bundle", type=bundle_dir, required=True, help="the fp32 bundle")
    p.add_argument("--recipe", required=True, choices=list(RECIPES), help="see `omniguard-edge recipes`")
    p.add_argument("--out", type=Path, help="bundle folder to create (default: BUNDLE-RECIPE beside the bundle)")
    recipe_options(p)
    p.add_argument("--limit", type=int_in(1, 1 << 20), default=20,
                   help="requests per evaluation pack for the verdict agreement (default 20)")
    p.add_argument("--packs", nargs="+", metavar="PACK",
                   help="evaluation packs of the verdict agreement (default: all; `small-real` is judged on the text "
                        "packs: xstest_prompts xstest_responses openai_moderation simple_safety_tests ailuminate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_in(0, MAX_THREADS), default=0,
                   help=f"intra-op threads, 0..{MAX_THREADS} (0: onnxruntime default)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)
