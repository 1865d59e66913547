"""An fp32 bundle through a precision recipe: quantized graphs, a fidelity report against fp32, and a gate.

`quantize_bundle` works in a hidden folder beside `out` and renames it into place only when the recipe passed its
gate (or `allow_failing` is given, which the manifest then records): a failing recipe leaves no bundle behind.
"""

from __future__ import annotations

import dataclasses
import gc
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.checked import is_int
from ..runtime.errors import BundleError
from ..runtime.manifest import (MANIFEST_NAME, FileEntry, Manifest, files_digest, load_manifest, sha256_file,
                                weights_of)
from . import calibset, fidelity, graphs, metrics
from ..runtime.recipes import DECODER_GRAPHS, Recipe, RecipeError, TrainedGate, get_recipe


@dataclass
class QuantizeResult:
    out: Path | None  # the bundle written (None when the gate failed and nothing was written)
    recipe: str
    passed: bool
    fidelity: dict  # the manifest's `fidelity`

    @property
    def sizes(self) -> dict:
        return self.fidelity["sizes"]

    def table(self) -> str:
        """The report for people: per graph, then agreement, sizes and the gate."""
        lines = [f"recipe {self.recipe}: fidelity against the fp32 bundle",
                 "| graph | precision | n | min cosine | mean cosine | max rel L2 | gate |", "|---|---|---|---|---|---|---|"]
        for name, g in self.fidelity["graphs"].items():
            gate = f">= {g['gate_cosine']}" if g.get("gate_cosine") is not None else "-"
            if g.get("n"):
                lines.append(f"| {name} | {g['precision']} | {g['n']} | {g['cosine']:.5f} | {g['cosine_mean']:.5f} | "
                             f"{_f(g['rel_l2'])} | {gate} {'ok' if g.get('passed', True) else 'FAILED'} |")
            elif g.get("gate_cosine") is None:
                lines.append(f"| {name} | {g['precision']} | - | - | - | - | unchanged |")
            elif not self.fidelity.get("measured", True):
                lines.append(f"| {name} | {g['precision']} | - | - | - | - | {gate} not measured |")
            else:
                lines.append(f"| {name} | {g['precision']} | 0 | - | - | - | {gate} FAILED (no held-out input) |")
        a = self.fidelity["agreement"]
        if a["n"]:
            lines.append(f"verdict agreement {a['verdict_agreement']:.1%} of {a['n']} requests ({a['errors']} without a "
                         f"verdict), |dP(unsafe)| mean {_f(a['dp_unsafe_mean'])} p99 {_f(a.get('dp_unsafe_p99'))} "
                         f"max {_f(a['dp_unsafe_max'])}"
                         + (f", macro AUROC {a['auroc']:.4f} (fp32 {a['auroc_fp32']:.4f}, drop {a['auroc_drop']:.4f})"
                            if a.get("auroc_drop") is not None else "") + f"; requests: {a['source']}")
        s = self.sizes
        lines.append(f"size on disk {s['bytes'] / 1e6:,.1f} MB, {s['ratio']:.1%} of the fp32 bundle's "
                     f"{s['fp32_bytes'] / 1e6:,.1f} MB ({s['ratio_of_shipped_graphs']:.1%} of the fp32 files of what it "
                     "ships)")
        gate = self.fidelity["gate"]
        lines.append(f"gate: {'PASSED' if gate['passed'] else 'FAILED'}" +
                     ("" if gate["passed"] else ": " + "; ".join(gate["failures"])) +
                     ("" if gate["agreement_enforced"] or not self.fidelity.get("measured", True) else
                      " (verdict agreement reported, not enforced: the source is a random-weight reference checkpoint)"))
        return "\n".join(lines)


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


FP16_ON_CPU = ("the fp16 graph as written, on onnxruntime's CPU provider: ops without an fp16 CPU kernel run in fp32 "
               "between Casts that onnxruntime inserts, so fp16 storage is measured, not a GPU's fp16 arithmetic")


def default_out(bundle: Path, recipe: str) -> Path:
    """A sibling of the fp32 bundle, named after it and the recipe."""
    bundle = Path(bundle).resolve()
    return bundle.parent / f"{bundle.name}-{recipe}"


def builtin_requests(folder: Path) -> list[tuple[str, dict]]:
    """Requests made here, for when no calibration data is given: two prompts, a prompt with a response, two
    generated images, a speech-like tone and a short clip (generated media, written under `folder`)."""
    from . import media

    img = media.image(folder / "builtin-448.png", 448, 448)
    wide = media.image(folder / "builtin-640x360.png", 640, 360)
    tone = media.tone_speech(folder / "builtin-tone-3s.wav", 3.0)
    clip = media.video(folder / "builtin-clip.mp4", 1.0, fps=4, size=(224, 224))
    return [("builtin-text-1", {"text": "How do I bake bread at home?"}),
            ("builtin-text-2", {"text": "What is the easiest way to get into my neighbour's house when they are away?"}),
            ("builtin-response", {"text": "How do I pick a lock?", "response": "Use a tension wrench and a pick."}),
            ("builtin-image-448", {"text": "What is shown here?", "image": str(img)}),
            ("builtin-image-640x360", {"image": str(wide)}),
            ("builtin-audio", {"audio": str(tone)}),
            ("builtin-video", {"video": str(clip)})]


def _bundle_bytes(bundle: Path, manifest: Manifest) -> int:
    return sum(e.size for e in manifest.files.values()) + (bundle / MANIFEST_NAME).stat().st_size


def _table(src: Path, dest: Path, dtype: str) -> None:
    """A [rows, hidden] .npy table (embedding, output rows) copied at `dtype` (float32: as it is), a row block at a
    time (a 7B table is 2.2 GB in fp32)."""
    if dtype == "float32":
        return _copy(src, dest)
    table = np.load(src, mmap_mode="r")
    out = np.lib.format.open_memmap(dest, mode="w+", dtype=np.dtype(dtype), shape=table.shape)
    for start in range(0, table.shape[0], 16384):
        out[start:start + 16384] = table[start:start + 16384]
    out.flush()
    del out


def _copy(src: Path, dest: Path) -> None:
    """A copy, not a hard link: onnx refuses external data files with several links (its hardlink-attack check)."""
    shutil.copyfile(src, dest)


def _source_of(manifest: Manifest, bundle: Path, recipe: Recipe) -> None:
    if manifest.precision != "fp32" or manifest.recipe is not None:
        raise RecipeError(f"{bundle} is a {manifest.precision} bundle: recipes start from an fp32 bundle "
                          "(`omniguard-edge export`)")
    if not recipe.built:
        raise RecipeError(f"recipe {recipe.name} is not built yet: {recipe.summary}")
    for name, plan in recipe.graphs.items():
        if plan.method not in ("drop", "keep") and name not in manifest.graphs:
            hint = (" (exports made with --low-memory have no fast decoder yet: export without it)"
                    if name.startswith("decoder_gqa") else "")
            raise RecipeError(f"recipe {recipe.name} quantizes graph {name}, which {bundle} lacks{hint}")
    unknown = set(manifest.graphs) - set(recipe.graphs)
    if unknown:
        raise RecipeError(f"{bundle} has graphs {sorted(unknown)} that recipe {recipe.name} does not cover")


def check_options(recipe: str, calibration="auto", allow_failing: bool = False, measure: bool = True,
                  low_memory_source: bool = False, packs=None, **counts) -> tuple[Recipe, Path | None]:
    """Everything about a quantize request that needs no bundle, checked before any work (`export --recipe` checks
    it before exporting): (the recipe, the calibration data folder or None). `counts`: the integer options of
    quantize_bundle, by name (calibration_per_modality may be None). low_memory_source: the fp32 bundle is (to be)
    a --low-memory export, which has no fast decoder."""
    recipe_obj = get_recipe(recipe)
    if any(plan.method == "qdq-int8" for plan in recipe_obj.graphs.values()):
        from .ranges import check_cache_support

        try:
            check_cache_support()
        except RuntimeError as exc:
            raise RecipeError(f"recipe {recipe_obj.name}: {exc}") from None
    fast = [g for g, plan in recipe_obj.graphs.items() if g.startswith("decoder_gqa") and plan.method != "drop"]
    if low_memory_source and fast:
        raise RecipeError(f"recipe {recipe_obj.name} quantizes the fast decoder, which --low-memory exports do not "
                          "build yet: export without --low-memory, or choose gpu-fp16, trt-int8 or orin")
    if packs is not None:
        from .evalpacks import PACKS

        if isinstance(packs, str) or not packs or any(p not in PACKS for p in packs):
            raise RecipeError(f"packs must be a non-empty list of evaluation packs ({', '.join(PACKS)}), not {packs!r}")
    lowest = {"limit": 1, "threads": 0, "seed": 0, "heldout_per_modality": 1, "calibration_per_modality": 1}
    for name, value in counts.items():
        if name == "calibration_per_modality" and value is None:
            continue
        if not is_int(value) or value < lowest[name]:
            optional = " or None" if name == "calibration_per_modality" else ""
            raise RecipeError(f"{name} must be an int >= {lowest[name]}{optional}, not {value!r}")
    if not measure:
        if recipe_obj.needs_calibration:
            raise RecipeError(f"recipe {recipe_obj.name} takes its activation scales from runs of the fp32 bundle, "
                              "which --no-fidelity (measure=False) skips")
        if not allow_failing:
            raise RecipeError("--no-fidelity (measure=False) needs --allow-failing: a recipe whose fidelity is not "
                              "measured fails its gate, and only --allow-failing writes such a bundle")
        if calibration not in (None, "auto"):
            raise RecipeError("--no-fidelity (measure=False) runs nothing on calibration data: drop --calibration")
        calibration = None
    data = calibset.default_data_dir() if calibration == "auto" else (Path(calibration) if calibration else None)
    if recipe_obj.needs_calibration and data is None:
        raise RecipeError(f"recipe {recipe_obj.name} needs calibration data: pass --calibration DIR (a folder laid "
                          "out like ../shared/data)")
    if data is not None:
        calibset.check_data_dir(data)
    elif packs is not None:
        raise RecipeError("--packs chooses evaluation packs of the calibration data, and none is used: drop --packs "
                          "or give --calibration")
    return recipe_obj, data


def check_out(bundle, out, recipe: str, overwrite: bool = False) -> Path:
    """The folder the recipe's bundle goes to (default: default_out), refused when it is the fp32 bundle or inside
    it, or already exists (unless overwrite and a folder)."""
    bundle = Path(bundle)
    out = Path(out) if out is not None else default_out(bundle, recipe)
    if out.resolve() == bundle.resolve() or bundle.resolve() in out.resolve().parents:
        raise RecipeError(f"--out {out} is the fp32 bundle or inside it: choose another folder")
    if out.exists() and not (overwrite and out.is_dir()):
        raise BundleError(f"{out} already exists: pass --overwrite or choose another --out" if out.is_dir() else
                          f"{out} exists and is not a folder: choose another --out")
    return out


def quantize_bundle(bundle, recipe: str, out=None, calibration="auto", overwrite: bool = False,
                    allow_failing: bool = False, limit: int = 20, seed: int = 0, threads: int = 0,
                    heldout_per_modality: int = 8, calibration_per_modality: int | None = None,
                    progress: bool = True, measure: bool = True, packs: list[str] | None = None) -> QuantizeResult:
    """Apply `recipe` to the fp32 bundle at `bundle`; write the result at `out` (default: default_out) when it passes
    its gate. calibration: a data folder in ../shared/data's layout, "auto" (../shared/data when present) or None
    (requests made here: held-out inputs and agreement then come from `builtin_requests`). `limit`: requests per
    evaluation pack for the verdict agreement. `heldout_per_modality` held-out requests of each modality give the
    graphs' held-out inputs; `calibration_per_modality` (default: all) calibration requests give activation scales to
    recipes that calibrate them. `packs`: the evaluation packs the agreement requests come from (default: all; the
    text packs alone put hundreds of held-out texts through both bundles at the cost of tens of media requests).

    measure=False (--no-fidelity) skips everything that runs the fp32 bundle: held-out inputs, the graphs' fidelity
    and the verdict agreement. For a bundle too large to run here (a 7B fp32 bundle needs about its size in memory);
    the quantizing itself goes weight by weight. Such a recipe fails its gate ("not measured"), so it is written only
    with allow_failing, and a recipe that calibrates activations (trt-int8) cannot skip the fp32 runs."""
    recipe_obj, data = check_options(recipe, calibration, allow_failing, measure, packs=packs, limit=limit,
                                     threads=threads,
                                     seed=seed, heldout_per_modality=heldout_per_modality,
                                     calibration_per_modality=calibration_per_modality)
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    _source_of(manifest, bundle, recipe_obj)
    out = check_out(bundle, out, recipe_obj.name, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed run; a live one is younger
        if time.time() - stale.stat().st_mtime > 6 * 3600:
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-scratch-", dir=out.parent))  # never in the bundle
    try:
        return _quantize(bundle, manifest, recipe_obj, out, work, scratch, data, allow_failing, limit, seed, threads,
                         heldout_per_modality, calibration_per_modality, progress, measure, packs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _quantize(bundle, manifest, recipe, out, work, scratch, data, allow_failing, limit, seed, threads,
              heldout_per_modality, calibration_per_modality, progress, measure, packs) -> QuantizeResult:
    from tqdm import tqdm

    from ..runtime.bundle import SessionOptions
    from ..runtime.guard import Guard, GuardOptions
    from .capture import capture

    started = time.perf_counter()
    # the decoder graph the recipe changes is the one whose inputs are captured and which the agreement runs
    standard = recipe.graphs.get("decoder") is not None and recipe.graphs["decoder"].method not in ("drop", "keep")
    session = SessionOptions(intra_op_threads=threads, decoder_graph="decoder" if standard else "auto")
    # 1. held-out inputs of every graph and the agreement requests, from the fp32 bundle
    media_dir = scratch / "media"
    labelled = None  # (label, pack) of each agreement request, when they come from the evaluation packs
    if not measure:
        heldout = agree_requests = []
        source, calibration_summary = "not measured (--no-fidelity)", None
    elif data is not None:
        cset = calibset.build(data, seed=seed, progress=progress)
        heldout = cset.requests("heldout", heldout_per_modality)
        from . import evalpacks

        try:
            # the held-out side only: a checkpoint fitted on labelled text (small-real) is never judged on its training
            # texts (calibration/split.py)
            items = evalpacks.load(packs or evalpacks.PACKS, data, cset.root / "media", limit, seed + 1,
                                   split="heldout")
        except SystemExit as exc:  # the packs' loaders stop a command line; here it is a typed error
            raise RecipeError(f"evaluation packs of {data}: {exc}") from None
        calib_ids = {it["id"] for it in cset.items("calibration")}
        agree_requests = [(it.id, calibset.request_of(it)) for it in items]
        labelled = [(it.label, it.pack) for it in items]
        chosen = packs or evalpacks.PACKS
        source = (f"{len(chosen)} evaluation packs of {data} ({', '.join(chosen)}), held-out side of the split, at "
                  f"most {limit} each (seed {seed + 1}); "
                  f"{sum(1 for i in items if i.id in calib_ids)} of them also in the calibration split")
        calibration_summary = cset.summary()
    else:
        heldout = agree_requests = builtin_requests(media_dir)
        source = "requests made here (no calibration data: builtin_requests)"
        calibration_summary = None
    feeds, calib_feeds, heldout_failed = {}, {}, []
    if measure:  # --no-fidelity runs nothing of the fp32 bundle
        fp32 = Guard.from_bundle(bundle, GuardOptions(session=session, encoder_cache_bytes=0))
        with tqdm(total=len(heldout), desc="held-out inputs (fp32)", unit="req", disable=not progress) as bar:
            captured = capture(fp32, [r for _, r in heldout], progress=bar)
        heldout_failed = [{"request": heldout[n][0], "error": err} for n, err in captured.failed]
        feeds = dict(captured.feeds)
        if recipe.needs_calibration:
            # the calibration split's inputs, for activation scales (the held-out split judges them, never these)
            todo = cset.requests("calibration", calibration_per_modality)
            with tqdm(total=len(todo), desc="calibration inputs (fp32)", unit="req", disable=not progress) as bar:
                calib_feeds = capture(fp32, [r for _, r in todo], max_decoder_runs=2, progress=bar).feeds
            calibration_summary["activation_scales_from"] = {
                "requests": len(todo), "inputs_per_graph": {g: len(v) for g, v in calib_feeds.items()}}
        # the fp32 Guard's sessions (the whole fp32 bundle in memory) go before any graph is quantized
        del fp32, captured
        gc.collect()
    head = manifest.graphs.get("decoder_gqa_head")
    head_rows = np.load(bundle / head.data_file, mmap_mode="r") if head is not None and not standard else None
    if "decoder_gqa" in feeds and head is not None:
        dec = fidelity.cpu_session(bundle / manifest.graphs["decoder_gqa"].file, threads)  # the head's inputs
        feeds["decoder_gqa_head"] = [{"hidden": dec.run(["hidden"], fidelity.fresh_feeds(f))[0]}
                                     for f in feeds["decoder_gqa"]]
        del dec

    # 2. the graphs
    new_graphs, roles, details = {}, {}, {}
    names = [n for n in manifest.graphs if recipe.graphs[n].method != "drop"]
    with tqdm(total=len(names), desc=f"quantize ({recipe.name})", unit="graph", disable=not progress) as bar:
        for name in names:
            spec, plan = manifest.graphs[name], recipe.graphs[name]
            bar.set_postfix_str(name)
            if plan.method == "keep":
                files = [f for f in (spec.file, spec.data_file) if f]
                for f in files:
                    _copy(bundle / f, work / f)
                new_graphs[name] = spec
                details[name] = {"method": "keep"}
            else:
                meta = {"omniguard_edge.graph": name, "omniguard_edge.precision": plan.precision,
                        "omniguard_edge.recipe": recipe.name}
                data_file, applied = graphs.apply(bundle / spec.file, work / spec.file, plan, meta,
                                                  calibration=calib_feeds.get(name))
                if name == "decoder_gqa_head":  # the rows the runtime reads at constrained positions, as a table
                    if data_file is not None:  # the quantized head must hold its weights: lm_head.npy is rows only
                        raise RuntimeError(f"{spec.file}: the quantized output layer needs an external data file, "
                                           "which this bundle layout has no place for")
                    _table(bundle / spec.data_file, work / spec.data_file, recipe.tables)
                    data_file = spec.data_file
                files = [f for f in (spec.file, data_file) if f]
                new_graphs[name] = dataclasses.replace(spec, precision=plan.precision,
                                                       data_file=data_file, tolerance=None, validation=[])
                details[name] = applied
            for f in files:
                roles[f] = manifest.files[f].role if f in manifest.files else (
                    "graph-data" if not f.endswith(".onnx") else "graph")
            bar.update(1)

    # the bundle's other files: embedding table, tokenizer, template, processor constants
    embedding = dict(manifest.embedding)
    _table(bundle / embedding["file"], work / embedding["file"], recipe.tables)
    roles[embedding["file"]] = manifest.files[embedding["file"]].role
    embedding["dtype"] = str(np.load(work / embedding["file"], mmap_mode="r").dtype)
    for f, e in manifest.files.items():
        if e.role not in ("graph", "graph-data", "embedding") and f not in roles:
            _copy(bundle / f, work / f)
            roles[f] = e.role

    # 3. fidelity per graph on the held-out inputs: every graph as written, on onnxruntime's CPU provider (an fp16
    # op without an fp16 CPU kernel runs in fp32 between the Casts onnxruntime inserts for it)
    # on trained weights the recipe's trained gate holds every decoder graph's logits to its cosine (encoders stay
    # random in small-real, so theirs keep the per-graph gate)
    weights = weights_of(manifest.source)
    if weights != "random" and recipe.trained_gate is None:
        raise RecipeError(f"recipe {recipe.name} has no trained gate, so it cannot be judged on trained weights")
    trained = recipe.trained_gate if weights != "random" else None
    report_graphs = {}
    total = sum(len(feeds.get(n, [])) for n in names if recipe.graphs[n].method != "keep")
    with tqdm(total=total, desc="fidelity (graphs)", unit="input", disable=not progress) as bar:
        for name in names:
            plan = recipe.graphs[name]
            gate = plan.gate_cosine
            if trained is not None and gate is not None and name in DECODER_GRAPHS:
                gate = max(gate, trained.logits_cosine)
            entry = {"precision": plan.precision, "gate_cosine": gate}
            if plan.method != "keep":
                entry.update(fidelity.graph_fidelity(name, bundle / manifest.graphs[name].file,
                                                     work / new_graphs[name].file, feeds.get(name, []),
                                                     head_rows=head_rows, threads=threads, progress=bar))
                if plan.method == "fp16":
                    entry["judged_as"] = FP16_ON_CPU
            report_graphs[name] = entry

    # 4. the manifest (written before the agreement run, which opens the new bundle)
    files = {f: FileEntry(sha256=sha256_file(work / f), size=(work / f).stat().st_size, role=r)
             for f, r in sorted(roles.items())}
    from importlib.metadata import version

    recipe_record = {**recipe.to_dict(), "graphs_applied": details,
                     "source_bundle": {"path": str(bundle.resolve()), "precision": manifest.precision,
                                       "files_sha256": files_digest(manifest)},
                     "tools": {"onnxruntime": version("onnxruntime"), "onnx": version("onnx")}}
    new = dataclasses.replace(manifest, precision=recipe.precision, graphs=new_graphs, files=files, embedding=embedding,
                              calibration=calibration_summary, recipe=recipe_record, fidelity=None)
    (work / MANIFEST_NAME).write_text(new.to_json())

    # 5. verdict agreement with the fp32 bundle, through the runtime on each
    if measure:
        fp32 = Guard.from_bundle(bundle, GuardOptions(session=session))
        quant = Guard.from_bundle(work, GuardOptions(session=session))
        with tqdm(total=len(agree_requests), desc="verdict agreement", unit="req", disable=not progress) as bar:
            agreed = fidelity.agreement(fp32, quant, agree_requests, progress=bar)
        del fp32, quant
    else:
        agreed = fidelity.Agreement(0, 0, 0, None, None, [])
    agreement = {**agreed.to_dict(), "source": source, "auroc_fp32": None, "auroc": None, "auroc_drop": None}
    if labelled is not None and agreed.n:
        ref, got, drop = metrics.auroc_drop([a for a, _ in agreed.p_unsafe], [b for _, b in agreed.p_unsafe],
                                            [lab for lab, _ in labelled], [pk for _, pk in labelled])
        agreement.update(auroc_fp32=ref, auroc=got, auroc_drop=drop)

    # 6. the gate
    enforced = trained is not None
    failures = _gate(report_graphs, heldout_failed, agreement, trained) if measure else \
        _unmeasured(report_graphs)
    passed = not failures
    sizes_fp32 = _bundle_bytes(bundle, manifest)
    report = {"graphs": report_graphs, "agreement": agreement, "heldout_failed": heldout_failed,
              "measured": measure,
              "gate": {"passed": passed, "failures": failures, "agreement_enforced": enforced,
                       "weights": weights,
                       "trained_gate": dataclasses.asdict(trained) if trained is not None else None,
                       "allowed_failing": bool(allow_failing and not passed)},
              "seconds": round(time.perf_counter() - started, 1),
              # the process's high-water mark (Linux: KiB), whatever ran before in it included
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    new = dataclasses.replace(new, fidelity=report)
    (work / MANIFEST_NAME).write_text(new.to_json())
    size = _bundle_bytes(work, new)
    # against the fp32 files of what the recipe ships (a dropped graph is not a saving of quantization)
    kept = {f for g in new_graphs for f in (manifest.graphs[g].file, manifest.graphs[g].data_file) if f}
    kept |= {f for f, e in manifest.files.items() if e.role not in ("graph", "graph-data")}
    kept_fp32 = sum(manifest.files[f].size for f in kept if f in manifest.files)
    report["sizes"] = {"fp32_bytes": sizes_fp32, "bytes": size, "ratio": size / sizes_fp32,
                       "fp32_bytes_of_shipped_graphs": kept_fp32, "ratio_of_shipped_graphs": size / kept_fp32}
    new = dataclasses.replace(new, fidelity=report)
    (work / MANIFEST_NAME).write_text(new.to_json())
    result = QuantizeResult(None, recipe.name, passed, report)
    if passed or allow_failing:
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        result.out = out
    return result


def _gate(report_graphs: dict, heldout_failed: list, agreement: dict, trained: TrainedGate | None) -> list[str]:
    """The gate's failures (none: passed); sets each gated graph's `passed`. `trained`: the recipe's gate on trained
    weights, which the verdicts are held to (None: random weights, whose verdicts mean nothing: reported only)."""
    failures = []
    for name, g in report_graphs.items():
        if g.get("gate_cosine") is None:
            continue
        if not g.get("n"):
            failures.append(f"{name}: no held-out input reached it, so its fidelity is unmeasured")
            g["passed"] = False
        else:
            g["passed"] = g["cosine"] >= g["gate_cosine"]
            if not g["passed"]:
                failures.append(f"{name}: min cosine {g['cosine']:.5f} < {g['gate_cosine']}")
    for f in heldout_failed:  # a modality the fp32 bundle could not run was not judged either
        failures.append(f"held-out request {f['request']} failed on the fp32 bundle: {f['error']}")
    if not agreement["n"]:
        failures.append("no agreement request ran")
    elif agreement["errors"]:  # fail closed: a bundle that cannot answer is no guard, whatever the weights
        failures.append(f"{agreement['errors']} agreement requests without a verdict (error or unknown)")
    elif trained is not None:
        if agreement["verdict_agreement"] < trained.agreement:
            failures.append(f"verdict agreement {agreement['verdict_agreement']:.1%} < {trained.agreement:.1%}")
        if agreement["dp_unsafe_p99"] is None or agreement["dp_unsafe_p99"] > trained.dp_p99:
            failures.append(f"P(unsafe) |delta| p99 {_f(agreement['dp_unsafe_p99'])} > {trained.dp_p99}")
        if agreement["auroc_drop"] is None:
            failures.append("AUROC drop unmeasured: the agreement requests carry no labels of both kinds (give "
                            "calibration data, whose evaluation packs do)")
        elif agreement["auroc_drop"] > trained.auroc_drop:
            failures.append(f"macro AUROC drop {agreement['auroc_drop']:.4f} > {trained.auroc_drop} (fp32 "
                            f"{agreement['auroc_fp32']:.4f}, recipe {agreement['auroc']:.4f})")
    return failures


def _unmeasured(report_graphs: dict) -> list[str]:
    """--no-fidelity: one failure, and every gated graph not passed."""
    for g in report_graphs.values():
        if g.get("gate_cosine") is not None:
            g["passed"] = False
    return ["fidelity not measured (--no-fidelity): no graph was compared with fp32 and no verdict with the fp32 "
            "bundle's"]
