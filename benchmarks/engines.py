"""The engines' runners. Latency: the runtime in this process (fixed budgets and the Guard's defaults), the PyTorch
reference in a process of its own (reference_worker.py), the onnxruntime-genai peer in another (peer_worker.py).
Accuracy: the runtime's and the PyTorch reference's predictions per item."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .stages import STAGES, runtime_stage_samples, summarize
from .system import dir_size_mb, peak_rss_mb, reset_peak_rss

HERE = Path(__file__).resolve().parent  # the workers are started by path: that works from any folder


def guard_text(text=None, response=None, image=None, video=None, audio=None) -> str:
    """The guard's text for a request given as the Guard's keyword arguments, composed by the runtime's own
    functions, so the PyTorch reference of both benchmarks is sent exactly what the Guard renders."""
    from omniguard_edge.runtime.prompt import Conversation, Policy, compose_guard_text, keyword_media

    kinds = [k for k, _ in keyword_media(image=image, video=video, audio=audio)]
    return compose_guard_text(Conversation.of_optional(text, response), kinds, Policy())


# -- latency ---------------------------------------------------------------------------------------------------------

def run_runtime(bundle: Path, chosen: dict, args) -> tuple[list[dict], dict]:
    """Rows of two engines over the same scenarios, in this process:
    `runtime`: fixed budgets like the PyTorch side (free decoding, full mode, EOS masked to --new-tokens, no
    prefix cache), the like-for-like comparison; `runtime-default`: the Guard's defaults as users run it (cached
    policy prefix, the answer grammar, `categories` mode, category scores), where `verdict` is the time from the
    call until the verdict token is known and `total` until the answer ends. The encoder cache is off in both
    (the same media again would be a cache hit). Each row carries the peak RSS of its scenario's runs
    (the process's high-water mark reset before them)."""
    from omniguard_edge.runtime.bundle import SessionOptions
    from omniguard_edge.runtime.gpu import provider_chain
    from omniguard_edge.runtime.guard import Guard, GuardOptions

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
            resettable = reset_peak_rss()
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
                   "stages": {k: summarize(v) for k, v in samples.items() if v}}
            if r.vision_grids:
                row["vision_grids"] = r.vision_grids
            if resettable:
                row["peak_rss_mb"] = peak_rss_mb()
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


def compared_names(base: Path, bundles: list[Path]) -> list[tuple[str, bool | None]]:
    """Each --compare bundle's name (its recipe) and whether it passed its fidelity gate, after checking that it is
    a bundle of --bundle's model and that no two share a name; ValueError (what to tell the user) otherwise."""
    from omniguard_edge.runtime.errors import BundleError
    from omniguard_edge.runtime.manifest import load_manifest

    try:
        ref = load_manifest(base, verify="none")
        manifests = [load_manifest(b, verify="none") for b in bundles]
    except BundleError as exc:
        raise ValueError(str(exc)) from exc
    names = []
    for b, m in zip(bundles, manifests):
        if m.source.get("config_sha256") != ref.source.get("config_sha256"):
            raise ValueError(f"--compare {b}: made from another checkpoint than --bundle (config sha256 differs)")
        name = (m.recipe or {}).get("name") or m.precision
        if name in names or name == "fp32":
            raise ValueError(f"--compare {b}: a second bundle named {name!r} (the table keys bundles by recipe)")
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
    return {"name": name, "path": str(bundle), "size_mb": dir_size_mb(bundle), "rows": rows,
            "gate_passed": gate_passed, **info}


def run_reference(checkpoint: Path, chosen: dict, args) -> tuple[list[dict], dict]:
    """Same scenarios through PyTorch, in a separate process, sent the exact guard text the runtime renders."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"threads": args.threads or os.cpu_count(), "warmup": args.warmup, "runs": args.runs,
                "device": args.reference_device, "dtype": args.reference_dtype,
                "new_tokens": args.new_tokens, "verdict_tokens": args.verdict_tokens,
                "scenarios": [{"name": s.name, "prompt_text": guard_text(s.text, s.response, s.image, s.video, s.audio),
                               "image": s.image, "audio": s.audio, "video": s.video} for s in chosen.values()]}
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, str(HERE / "reference_worker.py"), str(checkpoint), str(spec_path),
                               str(out_path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the PyTorch reference failed:\n{proc.stderr[-3000:]}")
        out = json.loads(out_path.read_text())
    rows = [{"scenario": r["scenario"], "engine": "pytorch", "prompt_tokens": r["prompt_tokens"],
             "staged_prefill_matches_generate": r["staged_matches_generate"],
             "stages": {k: summarize(v) for k, v in r["samples"].items()}} for r in out["rows"]]
    return rows, {"peak_rss_mb": out["peak_rss_mb"], "torch_threads": out["torch_threads"],
                  "config": f"{args.reference_dtype} on {args.reference_device}, sdpa attention, greedy "
                            "thinker.generate, PIL image processor, qwen-omni-utils preprocessing "
                            "(omniguard_edge.export.torch_reference)"}


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


# -- accuracy --------------------------------------------------------------------------------------------------------

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
    from importlib.metadata import version

    from omniguard_edge.calibration import evalpacks

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
        inputs = ref.inputs(guard_text(it.text, it.response, it.image, it.video, it.audio), media)
        tokens, first_logits = ref.generate(inputs, args.new_tokens, logits=True)
        parsed = parse(ref.tokenizer.decode(tokens, skip_special_tokens=True))
        out.append({"verdict": parsed.verdict, "p_unsafe": ref.p_unsafe(first_logits),
                    "categories": list(parsed.categories), "error": None})
        bar.update(1)
    return out
