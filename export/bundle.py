"""Export a checkpoint into a validated bundle: graphs, embedding table, tokenizer, template,
processor constants and a typed manifest. Nothing is left behind unless every graph validates."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from importlib import metadata as pkg_metadata
from pathlib import Path

import numpy as np

from ..runtime.errors import BundleError, CheckpointError
from ..runtime.positions.vision import head_chunk
from ..runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, FileEntry, GraphSpec, Manifest, TensorSpec, sha256_file
from .checkpoint import Checkpoint, open_checkpoint
from .graphs import GRAPHS
from .graphs.spec import case_feeds
from .layered import export_decoder_layered
from .onnx_io import OPSET, finalize_onnx, run_onnx, trace_to_onnx
from .parts import Parts
from .validate import FP32_TOLERANCE, record

log = logging.getLogger(__name__)
# Files copied from the checkpoint into the bundle when present (role in the manifest).
COPIED = {"tokenizer.json": "tokenizer", "tokenizer_config.json": "tokenizer", "chat_template.jinja": "template",
          "preprocessor_config.json": "processor", "video_preprocessor_config.json": "processor",
          "generation_config.json": "generation"}
TOWER_OF = {"vision": ("visual",), "audio": ("audio_tower",), "decoder": ("language_model", "lm_head")}


def _weights(ckpt) -> str:
    """runtime.manifest.WEIGHTS of a checkpoint: a reference's config records a trained decoder's provenance
    (export/real_reference.py); any other reference is random; a checkpoint without REFERENCE.md is a real one."""
    if not (ckpt.path / "REFERENCE.md").exists():
        return "checkpoint"
    return "trained-decoder" if "decoder" in (ckpt.raw_config.get("omniguard_edge_reference") or {}) else "random"


def _versions() -> dict:
    out = {}
    for pkg in ("omniguard-edge", "torch", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = pkg_metadata.version(pkg)
        except pkg_metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _tensor_specs(names, feeds_or_outputs, axes) -> list[TensorSpec]:
    specs = []
    for name, arr in zip(names, feeds_or_outputs):
        shape = [axes.get(name, {}).get(i, int(d)) for i, d in enumerate(np.shape(arr))]
        specs.append(TensorSpec(name=name, dtype=str(np.asarray(arr).dtype), shape=shape))
    return specs


def _metadata(name: str) -> dict:
    """Key fields mirrored into the graph's ONNX metadata_props, so a lone file still describes itself."""
    return {"omniguard_edge.graph": name, "omniguard_edge.precision": "fp32",
            "omniguard_edge.schema_version": SCHEMA_VERSION, "omniguard_edge.opset": OPSET}


def _export_graph(name: str, parts: Parts, work: Path, bar, rng, keep: list | None = None
                  ) -> tuple[GraphSpec, list[str]]:
    """Trace, release the tower, validate every named case. Returns the spec and files written; `keep` receives
    the validation cases (name, feeds, reference outputs, meaningful) for another graph of the same function."""
    gdef = GRAPHS[name]
    inputs, outputs, axes = gdef.interface(parts)
    module = gdef.build(parts)
    example = gdef.example(parts)
    cases = gdef.cases(parts, rng)
    bar.set_postfix_str(f"{name}: PyTorch reference")
    prepared = [(c.name, case_feeds(c), c.reference(), c.meaningful) for c in cases]
    if keep is not None:
        keep.extend(prepared)
    scratch = Path(tempfile.mkdtemp(prefix=f"trace-{name}-", dir=work))
    bar.set_postfix_str(f"{name}: tracing")
    traced = trace_to_onnx(module, example, inputs, outputs, axes, scratch)
    del module
    parts.release(*TOWER_OF[name])  # low peak memory: the tower is not needed past this point
    dest = work / f"{name}.onnx"
    data_file = finalize_onnx(traced, dest, _metadata(name))
    shutil.rmtree(scratch, ignore_errors=True)
    bar.set_postfix_str(f"{name}: validating {len(prepared)} cases in onnxruntime")
    results = run_onnx(dest, [feeds for _, feeds, _, _ in prepared])
    report = []
    for (case, _, ref, meaningful), got in zip(prepared, results):
        record(name, case, outputs, got, ref, FP32_TOLERANCE, report, meaningful)
    first_feeds, first_out = prepared[0][1], results[0]
    spec = GraphSpec(
        file=dest.name, precision="fp32", opset=OPSET,
        inputs=_tensor_specs(inputs, [first_feeds[i] for i in inputs], axes),
        outputs=_tensor_specs(outputs, first_out, axes),
        tolerance=FP32_TOLERANCE, data_file=data_file, validation=report,
    )
    return spec, [dest.name] + ([data_file] if data_file else [])


def _export_fast_decoder(parts: Parts, work: Path, bar, prepared: list) -> tuple[GraphSpec | None, list[str]]:
    """The fast decoder graph and its output layer (export/graphs/decoder_gqa.py), validated together (logits and
    KV) against transformers on the standard
    decoder's batch-1 cases (prefill, decode step, image positions, past + several new tokens), fed through the
    runtime's own rotary tables. (None, []) with a log line when this checkpoint's geometry cannot have one."""
    from .graphs import decoder_gqa

    cfg = parts.ckpt.thinker_config.text_config
    why = decoder_gqa.supported(cfg)
    if why:
        log.warning("no fast decoder graph: %s; the runtime uses the standard decoder graph", why)
        return None, []
    dest = work / f"{decoder_gqa.NAME}.onnx"
    bar.set_postfix_str(f"{decoder_gqa.NAME}: writing layers")
    files = decoder_gqa.build(parts, dest, lambda i, n: bar.set_postfix_str(f"{decoder_gqa.NAME}: layer {i}/{n}"))
    head_files = decoder_gqa.build_head(parts, work)
    inputs, outputs = decoder_gqa.io_names(cfg.num_hidden_layers)
    freqs = parts.rotary_inv_freq().float().numpy()
    sections = cfg.rope_parameters["mrope_section"]
    cases = [(c, f, r) for c, f, r, _ in prepared if f["inputs_embeds"].shape[0] == 1]
    spare = 5  # buffers longer than the sequence, as the runtime allocates them: unused rows must not matter
    feeds = [decoder_gqa.fast_feeds(f, cfg.num_hidden_layers, sections, freqs,
                                    f["past_key_0"].shape[2] + f["inputs_embeds"].shape[1] + spare) for _, f, _ in cases]
    bar.set_postfix_str(f"{decoder_gqa.NAME}: validating {len(cases)} cases in onnxruntime")
    results = run_onnx(dest, feeds)
    heads = run_onnx(work / head_files[0], [{"hidden": r[0]} for r in results])  # body, then the output layer
    report, head_report = [], []
    for (case, f, ref), got, (logits,) in zip(cases, results, heads):
        total = f["past_key_0"].shape[2] + f["inputs_embeds"].shape[1]
        got = [logits] + [g[:, :, :total] for g in got[1:]]  # the rows past the total are the buffer's spare room
        record(decoder_gqa.NAME, case, ["logits"] + outputs[1:], got, ref, FP32_TOLERANCE, report)
        head_report.append(report[-len(outputs)])
    spec = GraphSpec(
        file=dest.name, precision="fp32", opset=OPSET,
        inputs=_tensor_specs(inputs, [feeds[0][i] for i in inputs], {n: {0: "batch", 2: "capacity"} for n in inputs[6:]}
                             | {"inputs_embeds": {0: "batch", 1: "seq"}, "seqlens_k": {0: "batch"},
                                "cos_cache": {0: "rows"}, "sin_cache": {0: "rows"},
                                "position_ids": {0: "batch", 1: "seq"}}),
        outputs=_tensor_specs(outputs, results[0], {n: {0: "batch", 2: "capacity"} for n in outputs[1:]}
                              | {"hidden": {0: "batch"}}),
        tolerance=FP32_TOLERANCE, data_file=files[1], validation=report)
    head = GraphSpec(file=head_files[0], precision="fp32", opset=OPSET,
                     inputs=_tensor_specs(["hidden"], [results[0][0]], {"hidden": {0: "batch"}}),
                     outputs=_tensor_specs(["logits"], [heads[0][0]], {"logits": {0: "batch"}}),
                     tolerance=FP32_TOLERANCE, data_file=head_files[1], validation=head_report)
    parts.release()
    return {decoder_gqa.NAME: spec, decoder_gqa.HEAD_NAME: head}, files + head_files


def _geometry(ckpt: Checkpoint) -> tuple[dict, dict, dict, dict]:
    cfg = ckpt.thinker_config
    t, v, a = cfg.text_config, cfg.vision_config, cfg.audio_config
    head_dim = t.hidden_size // t.num_attention_heads
    decoder = {"hidden_size": t.hidden_size, "num_layers": t.num_hidden_layers, "num_heads": t.num_attention_heads,
               "num_kv_heads": t.num_key_value_heads, "head_dim": head_dim, "vocab_size": t.vocab_size,
               "max_position_embeddings": t.max_position_embeddings, "rope_parameters": dict(t.rope_parameters),
               "tie_word_embeddings": bool(t.tie_word_embeddings), "kv_layout": "batch,kv_heads,seq,head_dim",
               "position_id_per_seconds": cfg.position_id_per_seconds, "seconds_per_chunk": cfg.seconds_per_chunk}
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRotaryEmbedding

    # the rotary frequencies exactly as transformers computes them (float32), for the runtime's rotary tables
    decoder["rope_inv_freq"] = [float(x) for x in Qwen2_5OmniRotaryEmbedding(t).inv_freq.float().numpy()]
    vision = {"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size, "in_channels": v.in_channels,
              "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size, "hidden_size": v.hidden_size,
              "depth": v.depth, "fullatt_block_indexes": list(v.fullatt_block_indexes), "out_hidden_size": v.out_hidden_size,
              "full_head_chunk": head_chunk(v.num_heads), "num_heads": v.num_heads,
              "intermediate_size": v.intermediate_size}
    audio = {"num_mel_bins": a.num_mel_bins, "n_window": a.n_window, "d_model": a.d_model,
             "encoder_layers": a.encoder_layers, "output_dim": a.output_dim, "max_source_positions": a.max_source_positions}
    pre = json.loads((ckpt.path / "preprocessor_config.json").read_text())
    keys = ["image_mean", "image_std", "min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size",
            "rescale_factor", "sampling_rate", "n_fft", "hop_length", "feature_size", "chunk_length", "dither"]
    preprocess = {k: pre[k] for k in keys if k in pre}
    return decoder, vision, audio, preprocess


def _write_processor_constants(ckpt: Checkpoint, work: Path) -> list[str]:
    """mel_filters.npy (the feature extractor's filter bank, so the runtime needs no librosa) and a
    chat_template.jinja when the checkpoint keeps its template in tokenizer_config.json."""
    from transformers import WhisperFeatureExtractor

    pre = json.loads((ckpt.path / "preprocessor_config.json").read_text())
    keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft")
    fe = WhisperFeatureExtractor(**{k: pre[k] for k in keys if k in pre})
    np.save(work / "mel_filters.npy", np.asarray(fe.mel_filters, dtype=np.float64))
    written = ["mel_filters.npy"]
    if not (ckpt.path / "chat_template.jinja").exists():
        template = json.loads((ckpt.path / "tokenizer_config.json").read_text()).get("chat_template")
        if not isinstance(template, str):
            raise CheckpointError(f"{ckpt.path}: no chat_template.jinja and no chat_template in tokenizer_config.json")
        (work / "chat_template.jinja").write_text(template)
        written.append("chat_template.jinja")
    return written


def _write_embedding(parts: Parts, work: Path, dtype: str) -> dict:
    weight = parts.embed_weight().float().numpy().astype(dtype)
    np.save(work / "embed_tokens.npy", weight)
    return {"file": "embed_tokens.npy", "dtype": dtype, "shape": list(weight.shape)}


def export_bundle(checkpoint: str | Path, out: str | Path, overwrite: bool = False, embed_dtype: str = "float32",
                  seed: int = 0, progress: bool = True, low_memory: bool = False) -> Path:
    """Export `checkpoint` to the bundle folder `out` (fp32 graphs), validating each graph.

    low_memory: export the decoder layer by layer (export/layered.py): each layer is validated against
    transformers' own layer and streamed to disk, so peak memory is about one layer plus the head
    instead of the whole fp32 decoder; the whole stitched decoder is not run.

    Raises CheckpointError for an unusable checkpoint, ValidationError when a graph disagrees with
    PyTorch, BundleError when `out` exists; in every failure no bundle (and no partial folder) remains.
    """
    from tqdm import tqdm

    if embed_dtype not in ("float32", "float16"):
        raise BundleError(f"embed_dtype must be float32 or float16, not {embed_dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists: pass --overwrite or choose another --out")
    ckpt = open_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by an export that was killed (OOM, ^C twice)
        log.warning("removing %s, left by an interrupted export of %s", stale, out)
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        parts = Parts(ckpt)
        rng = np.random.default_rng(seed)
        graphs, roles = {}, {}
        with tqdm(total=len(GRAPHS) + 1, desc="export", unit="step", disable=not progress) as bar:
            for name in GRAPHS:
                kept = []
                if name == "decoder" and low_memory:
                    spec, files = export_decoder_layered(parts, work, bar, rng, _metadata(name))
                else:
                    spec, files = _export_graph(name, parts, work, bar, rng, kept if name == "decoder" else None)
                graphs[name] = spec
                roles.update({f: ("graph-data" if f.endswith(".data") else "graph") for f in files})
                if kept:  # the fast decoder is validated on the standard decoder's cases (not in low-memory mode)
                    fast, files = _export_fast_decoder(parts, work, bar, kept)
                    if fast is not None:
                        graphs.update(fast)
                        roles.update({f: ("graph" if f.endswith(".onnx") else "graph-data") for f in files})
                bar.update(1)
            bar.set_postfix_str("embedding table")
            embedding = _write_embedding(parts, work, embed_dtype)
            roles["embed_tokens.npy"] = "embedding"
            bar.update(1)
        for fname, role in COPIED.items():
            if (ckpt.path / fname).exists():
                shutil.copyfile(ckpt.path / fname, work / fname)
                roles[fname] = role
        for fname in _write_processor_constants(ckpt, work):
            roles[fname] = "template" if fname.endswith(".jinja") else "processor"
        decoder, vision, audio, preprocess = _geometry(ckpt)
        files = {f: FileEntry(sha256=sha256_file(work / f), size=(work / f).stat().st_size, role=r)
                 for f, r in sorted(roles.items())}
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            source={"checkpoint": ckpt.path.name, "layout": ckpt.layout, "low_memory": low_memory,
                    # written by `omniguard-edge reference`: random weights, verdicts carry no meaning
                    "reference_checkpoint": (ckpt.path / "REFERENCE.md").exists(),
                    "weights": _weights(ckpt),
                    "model_type": ckpt.raw_config.get("model_type"),
                    "config_sha256": hashlib.sha256((ckpt.path / "config.json").read_bytes()).hexdigest()},
            exporter=_versions(), precision="fp32",
            special_ids={k: v for k, v in ckpt.special.items() if k != "text_vocab"},
            decoder=decoder, vision=vision, audio=audio, preprocess=preprocess,
            graphs=graphs, files=files, embedding=embedding,
        )
        (work / MANIFEST_NAME).write_text(manifest.to_json())
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        return out
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
