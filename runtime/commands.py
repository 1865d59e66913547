"""The runtime's commands: moderate, plan, build-engines, verify, inspect (torch-free; registered by
omniguard_edge/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

from .commandline import (EXIT_ERROR, EXIT_OK, EXIT_UNKNOWN, LIMITS, MAX_THREADS, bundle_dir, int_in, limit_args,
                          limits_of, media_file, probability, utf8)
from .errors import InputError
from .profiles import PROFILES


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
    from .providers import provider_chain
    from .guard import Guard, GuardOptions

    if not args.provider.startswith("tensorrt") or args.providers:  # what only engines use is refused, not ignored
        given = [f"--{k.replace('_', '-')}" for k in LIMITS if getattr(args, k) is not None] + \
            (["--engines"] if args.engines else [])
        if given:
            raise InputError(f"{', '.join(given)}: only with --provider tensorrt (the limits its engines were "
                             "built for)")
    if args.provider == "cpu" and not args.providers and args.device_id:
        raise InputError("--device-id: only with --provider cuda or tensorrt")
    providers = tuple(args.providers) if args.providers else provider_chain(args.provider)
    session = SessionOptions(providers=providers, intra_op_threads=args.threads, limits=limits_of(args),
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


def cmd_plan(args) -> int:
    from . import plan as P
    from .devices import DEVICE_COSTS, DEVICES
    from .memory import GiB, MiB

    if args.bundle:
        shapes = P.BundleShapes.from_bundle(args.bundle)
    elif args.checkpoint:
        shapes = P.Shapes.from_checkpoint(args.checkpoint)
    else:
        shapes = P.Shapes.from_profile(args.profile)
    limits = limits_of(args)
    kw = {"reserve_gb": args.reserve_gb, "device_memory_gb": args.device_memory}
    recipe = args.recipe or (shapes.recipe if isinstance(shapes, P.BundleShapes) else "gpu-fp16")
    chosen = P.plan(shapes, recipe, args.device, limits, **kw)
    better = None
    if not chosen.fits and not isinstance(shapes, P.BundleShapes):
        better = P.suggest(shapes, args.device, limits, **kw)
    if args.json:
        print(json.dumps({"fits": chosen.fits, "source": shapes.source, "plan": chosen.to_dict(),
                          "fits_with": better.to_dict() if better else None,
                          "assumptions": {k: {"bytes": b, "why": why} for k, (b, why) in DEVICE_COSTS.items()}},
                         indent=2))
        return 0
    print(f"{DEVICES[args.device][0]} ({chosen.memory / GiB:.1f} GiB, {chosen.reserve / GiB:.1f} GiB kept for the OS), "
          f"{shapes.source}, recipe {recipe}:")
    for item, nbytes in chosen.items.items():
        print(f"  {item:58s} {nbytes / GiB:8.2f} GiB")
    print(f"  {'needed':58s} {chosen.needed / GiB:8.2f} GiB of {chosen.available / GiB:.2f} GiB available: "
          f"{'FITS' if chosen.fits else 'DOES NOT FIT'}")
    if not chosen.fits:
        floor = P.SUGGEST_FLOOR
        print(("fits with: " + P.table([better]).splitlines()[-1]) if better else
              f"nothing fits this device: no GPU recipe, even with {floor['max_image_tokens']} image tokens and "
              f"{floor['max_prompt_tokens']} prompt tokens")
    print("assumed (not measured on a device): " + "; ".join(f"{k.replace('_', ' ')} {b / MiB:.0f} MiB"
                                                            for k, (b, _) in DEVICE_COSTS.items()))
    return 0


def cmd_build_engines(args) -> int:
    from .engine_build import build_engines

    records = build_engines(args.bundle, args.out, limits_of(args), native=args.native, rebuild=args.rebuild,
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



def register(sub) -> None:
    p = sub.add_parser("moderate", help="judge text, images, video and audio with a bundle (torch-free)")
    p.add_argument("--bundle", type=bundle_dir, required=True, help="bundle folder (with manifest.json)")
    p.add_argument("--text", type=utf8, help="the user prompt (UTF-8)")
    p.add_argument("--response", type=utf8, help="the agent response to judge with the prompt (UTF-8)")
    p.add_argument("--image", type=media_file, action="append", help="image file (repeatable)")
    p.add_argument("--audio", type=media_file, action="append", help="audio file: wav, flac, ogg (repeatable)")
    p.add_argument("--video", type=media_file, action="append", help="video file: mp4, webm, avi (repeatable)")
    p.add_argument("--mode", choices=["verdict", "categories", "full"], default="categories",
                   help="verdict: stop at the verdict; categories (default): after the categories line; "
                        "full: the critique too (slower)")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="the verdict is unsafe when P(unsafe) >= this, in [0, 1] (default 0.5)")
    p.add_argument("--no-constrain", action="store_true",
                   help="free greedy decoding instead of the answer grammar (parity checks; P(unsafe) still read)")
    p.add_argument("--max-new-tokens", type=int_in(1, 1 << 20), default=None,
                   help="generation budget, >= 1 (default 32; 256 with --mode full)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--provider", choices=["cpu", "cuda", "tensorrt", "tensorrt-native"], default="cpu",
                       help="where the graphs run (default cpu); tensorrt runs engines built by build-engines; "
                            "tensorrt-native (experimental, never run) their --native plans")
    which.add_argument("--providers", nargs="+", type=utf8, help="onnxruntime provider names, in preference order")
    limit_args(p, "tensorrt: the limits the engines were built for; ")
    p.add_argument("--engines", type=Path, help="tensorrt: the engine cache folder (default: BUNDLE.engines)")
    p.add_argument("--device-id", type=int_in(0, 1023), default=0, help="cuda/tensorrt: the GPU (default 0)")
    p.add_argument("--threads", type=int_in(0, MAX_THREADS), default=0,
                   help=f"intra-op threads, 0..{MAX_THREADS} (0: onnxruntime default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_moderate)

    from .devices import DEFAULT_RESERVE_GB, DEVICES
    from .plan import GPU_RECIPES

    p = sub.add_parser("plan", help="memory plan on a Jetson device: does the guard fit, at which recipe and limits")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=bundle_dir, help="a bundle: its files are the weights")
    src.add_argument("--profile", choices=list(PROFILES), help="a reference profile's geometry (no bundle needed)")
    src.add_argument("--checkpoint", type=Path, help="a checkpoint folder: its config.json's geometry")
    p.add_argument("--recipe", choices=GPU_RECIPES,
                   help="precision (default: a bundle's own, else gpu-fp16)")
    p.add_argument("--device", required=True, choices=list(DEVICES))
    p.add_argument("--device-memory", type=float, help="the device's memory in GiB (default: the module's)")
    p.add_argument("--reserve-gb", type=float, default=DEFAULT_RESERVE_GB,
                   help=f"memory kept for the OS, GiB (default {DEFAULT_RESERVE_GB})")
    limit_args(p)
    p.add_argument("--json", action="store_true", help="only JSON on stdout (`fits` at the top level)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("build-engines", help="build TensorRT engines for this GPU from a bundle, ahead of time")
    p.add_argument("--bundle", required=True, type=bundle_dir)
    p.add_argument("--out", type=Path, help="engine cache folder (default: BUNDLE.engines beside the bundle)")
    limit_args(p)
    p.add_argument("--native", action="store_true",
                   help="also TensorRT plans through TensorRT's Python API (experimental)")
    p.add_argument("--rebuild", action="store_true", help="replace engines built for another key (stale or foreign)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the profiles and provider options only (no GPU needed)")
    p.add_argument("--device-id", type=int_in(0, 1023), default=0)
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("verify", help="re-hash every file of a bundle against its manifest")
    p.add_argument("bundle", type=Path)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="print a bundle's manifest")
    p.add_argument("bundle", type=Path)
    p.set_defaults(func=cmd_inspect)
