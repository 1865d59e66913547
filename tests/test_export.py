"""The exporter: every graph agrees with PyTorch, nothing is baked in, bad checkpoints and tampered
bundles are refused, and a failure leaves no bundle behind. Tests that export or compare with PyTorch take the
export-side fixtures and skip without the export extra; the bundle checks run on a runtime-only install too."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

# the export modules import torch, transformers and onnx inside their functions: importing them here is torch-free
from omniguard_edge.export import bundle as bundle_mod
from omniguard_edge.export.bundle import export_bundle
from omniguard_edge.export.graphs import GRAPHS
from omniguard_edge.export.graphs.spec import case_feeds
from omniguard_edge.export.onnx_io import run_onnx
from omniguard_edge.export.validate import compare
from omniguard_edge.runtime.errors import BundleError, CheckpointError, ValidationError
from omniguard_edge.runtime.manifest import load_manifest, verify_files

REQUIRED_CASES = {
    "vision": {"image_8x10", "image_20x36", "image_16x16", "two_images", "video_t2"},
    "audio": {"frames_5", "frames_301", "frames_1234", "frames_3000", "two_clips"},
    "decoder": {"prefill_b1", "decode_b1", "prefill_b2_leftpad", "decode_b2_leftpad"},
}


@pytest.mark.parametrize("graph", ["vision", "audio", "decoder"])
def test_onnx_matches_pytorch_on_named_cases(graph, tiny_bundle, tiny_parts):
    """Re-run every named case in onnxruntime and PyTorch, independently of the export's own check."""
    gdef = GRAPHS[graph]
    cases = gdef.cases(tiny_parts, np.random.default_rng(123))
    assert REQUIRED_CASES[graph] <= {c.name for c in cases}
    _, outputs, _ = gdef.interface(tiny_parts)
    got = run_onnx(tiny_bundle / f"{graph}.onnx", [case_feeds(c) for c in cases])
    for case, result in zip(cases, got):
        ref = case.reference()
        for name, arr in zip(outputs, result):
            fig = compare(arr, ref[name], case.meaningful(name))
            assert fig["max_abs"] <= 1e-4 and fig["cosine"] >= 0.99999, (graph, case.name, name, fig)


def test_vision_graph_has_no_baked_grid(tiny_bundle, tiny_parts):
    """A grid that no export case used, in a call with a video: same answer as PyTorch."""
    import torch

    from omniguard_edge.export.graphs.vision import feeds_for

    grids = [(1, 12, 14), (2, 6, 22)]
    feeds = feeds_for(grids, tiny_parts.visual.config, np.random.default_rng(5))
    (got,) = run_onnx(tiny_bundle / "vision.onnx", [feeds])[0]
    with torch.no_grad():
        ref = tiny_parts.visual(torch.from_numpy(feeds["pixel_values"]), grid_thw=torch.tensor(grids)).pooler_output
    assert got.shape == (sum(t * h * w for t, h, w in grids) // 4, ref.shape[1])
    assert compare(got, ref.numpy())["max_abs"] <= 1e-4


@pytest.mark.parametrize("chunk", [1, 0])
def test_vision_attention_batches_match_pytorch_with_head_chunks(chunk, tiny_parts, tmp_path, monkeypatch):
    """The full-attention blocks split their heads into chunks (one head each here; 0: no chunks) and every block
    attends over padded window/frame batches: traced to ONNX, it equals PyTorch on unequal windows, two images of
    different sizes (padded frames) and a video."""
    from omniguard_edge.export.onnx_io import trace_to_onnx
    from omniguard_edge.runtime.positions import vision as positions

    monkeypatch.setattr(positions, "FULL_HEAD_CHUNK", chunk)
    gdef = GRAPHS["vision"]
    inputs, outputs, axes = gdef.interface(tiny_parts)
    path = trace_to_onnx(gdef.build(tiny_parts), gdef.example(tiny_parts), inputs, outputs, axes, tmp_path)
    cases = [c for c in gdef.cases(tiny_parts, np.random.default_rng(7)) if c.name in ("image_20x36", "two_images", "video_t2")]
    for case, (got,) in zip(cases, run_onnx(path, [case_feeds(c) for c in cases])):
        fig = compare(got, case.reference()["features"])
        assert fig["max_abs"] <= 1e-4 and fig["cosine"] >= 0.99999, (case.name, fig)


def test_manifest_describes_bundle(tiny_bundle, tiny_parts):
    m = load_manifest(tiny_bundle)
    assert set(m.graphs) == {"vision", "audio", "decoder", "decoder_gqa", "decoder_gqa_head"}
    head = m.graphs["decoder_gqa_head"]  # the output layer: its weight is lm_head.npy, one row per token
    assert head.data_file == "lm_head.npy" and m.files["lm_head.npy"].role == "graph-data"
    assert [r["output"] for r in head.validation] == ["logits"] * 5
    fast = m.graphs["decoder_gqa"]  # validated against transformers on the decoder's batch-1 cases
    assert {r["case"] for r in fast.validation} == {"prefill_b1", "decode_b1", "prefill_b1_image_positions",
                                                    "decode_b1_image_positions", "extend_b1_prefix7_new6"}
    assert "extend_b1_prefix7_new6" in {r["case"] for r in m.graphs["decoder"].validation}
    assert [t.name for t in fast.inputs][:6] == ["inputs_embeds", "seqlens_k", "total_sequence_length", "cos_cache",
                                                "sin_cache", "position_ids"]
    assert len(m.decoder["rope_inv_freq"]) == m.decoder["head_dim"] // 2
    assert m.special_ids["image"] == tiny_parts.special["image"]
    assert m.decoder["num_layers"] == 2 and m.decoder["kv_layout"] == "batch,kv_heads,seq,head_dim"
    names = [t.name for t in m.graphs["decoder"].inputs]
    assert names[:3] == ["inputs_embeds", "attention_mask", "position_ids"] and "past_key_1" in names
    for spec in m.graphs.values():
        assert spec.validation and spec.tolerance.max_abs == 1e-4
    for f in ("embed_tokens.npy", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert f in m.files
    emb = np.load(tiny_bundle / "embed_tokens.npy", mmap_mode="r")
    assert list(emb.shape) == m.embedding["shape"]


def test_thinker_only_layout_exports(tiny_thinker_checkpoint, tmp_path):
    out = export_bundle(tiny_thinker_checkpoint, tmp_path / "b", progress=False)
    assert load_manifest(out).source["layout"] == "thinker"


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def _broken_copy(src, dst, how):
    shutil.copytree(src, dst)
    if how == "missing_file":
        (dst / "tokenizer.json").unlink()
    elif how == "corrupt_safetensors":
        shard = next(dst.glob("model-*.safetensors"))
        data = bytearray(shard.read_bytes())
        data[:8] = b"\xff" * 8  # header length now points past the end of the file
        shard.write_bytes(bytes(data))
    elif how == "missing_shard":
        next(dst.glob("model-*.safetensors")).unlink()
    elif how == "unknown_model_type":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["model_type"] = "llama"
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("how,message", [
    ("missing_file", "tokenizer.json is missing"),
    ("corrupt_safetensors", "not a readable safetensors"),
    ("missing_shard", "is missing"),
    ("unknown_model_type", "model_type 'llama' is not supported"),
])
def test_bad_checkpoint_gives_clear_error_and_no_bundle(how, message, tiny_checkpoint, tmp_path):
    ckpt = _broken_copy(tiny_checkpoint, tmp_path / "ckpt", how)
    out_parent = tmp_path / "bundles"
    out_parent.mkdir()
    with pytest.raises(CheckpointError, match=message):
        export_bundle(ckpt, out_parent / "b", progress=False)
    assert _leftovers(out_parent) == []


def test_validation_failure_raises_and_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    strict = bundle_mod.FP32_TOLERANCE.__class__(max_abs=0.0, cosine=1.0, rel_l2=0.0)
    monkeypatch.setattr(bundle_mod, "FP32_TOLERANCE", strict)
    with pytest.raises(ValidationError, match=r"vision\.onnx output 'features'"):
        export_bundle(tiny_checkpoint, tmp_path / "b", progress=False)
    assert _leftovers(tmp_path) == []


def test_existing_output_is_not_overwritten(tiny_bundle, tiny_checkpoint):
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(tiny_checkpoint, tiny_bundle, progress=False)


@pytest.mark.parametrize("victim", ["decoder.onnx", "embed_tokens.npy", "tokenizer.json"])
def test_altered_bundle_is_refused(victim, tiny_bundle, tmp_path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    load_manifest(copy)  # verified and remembered
    path = copy / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit flipped
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{victim} sha256 mismatch"):
        load_manifest(copy)


def test_external_data_file_is_single_and_hashed(tiny_checkpoint, tmp_path, monkeypatch):
    """Force the >2 GB path on the tiny model: one .data file, listed, hashed, refused when altered."""
    from omniguard_edge.export import onnx_io

    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 0)
    out = export_bundle(tiny_checkpoint, tmp_path / "b", progress=False)
    m = load_manifest(out)
    for name, spec in m.graphs.items():
        if name != "decoder_gqa_head":
            assert spec.data_file == f"{name}.onnx.data" and m.files[spec.data_file].role == "graph-data"
    assert sorted(p.name for p in out.glob("*.data")) == ["audio.onnx.data", "decoder.onnx.data",
                                                          "decoder_gqa.onnx.data", "vision.onnx.data"]
    assert m.graphs["decoder_gqa_head"].data_file == "lm_head.npy"  # always its own file
    data = out / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="decoder.onnx.data sha256 mismatch"):
        load_manifest(out)


def test_repeated_loads_hash_only_changed_files(tiny_bundle):
    m = load_manifest(tiny_bundle, verify="full")
    assert verify_files(tiny_bundle, m.files) == 0  # remembered from the full check
    assert verify_files(tiny_bundle, m.files, full=True) == len(m.files)


def test_unknown_schema_is_refused(tiny_bundle, tmp_path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    raw = json.loads((copy / "manifest.json").read_text())
    raw["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="schema_version 99"):
        load_manifest(copy)


@pytest.fixture(scope="module")
def tiny_low_memory_bundle(tiny_checkpoint, tmp_path_factory):
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("lm") / "b", progress=False, low_memory=True)


def test_low_memory_decoder_is_stitched_per_layer_and_validated(tiny_low_memory_bundle, tiny_parts):
    m = load_manifest(tiny_low_memory_bundle)
    spec = m.graphs["decoder"]
    assert spec.data_file == "decoder.onnx.data" and m.source["low_memory"] is True
    cases = {r["case"] for r in spec.validation}
    n = tiny_parts.ckpt.thinker_config.text_config.num_hidden_layers
    assert {f"layer_{i}/{c}" for i in range(n) for c in ("prefill_b1", "decode_b2_leftpad")} <= cases
    assert [t.name for t in spec.inputs] == GRAPHS["decoder"].interface(tiny_parts)[0]


def test_low_memory_decoder_matches_pytorch_end_to_end(tiny_low_memory_bundle, tiny_parts):
    """The stitched graph answers the whole-decoder named cases exactly as transformers does."""
    gdef = GRAPHS["decoder"]
    cases = gdef.cases(tiny_parts, np.random.default_rng(7))
    _, outputs, _ = gdef.interface(tiny_parts)
    got = run_onnx(tiny_low_memory_bundle / "decoder.onnx", [case_feeds(c) for c in cases])
    for case, result in zip(cases, got):
        ref = case.reference()
        for name, arr in zip(outputs, result):
            fig = compare(arr, ref[name], case.meaningful(name))
            assert fig["max_abs"] <= 1e-4 and fig["cosine"] >= 0.99999, (case.name, name, fig)


def test_low_memory_layer_mismatch_is_caught(tiny_checkpoint, tmp_path, monkeypatch):
    """A layer whose export disagrees with transformers' layer stops the export (here: a broken rotary)."""
    from omniguard_edge.export.graphs import decoder_modules

    real = decoder_modules.DecoderLayer.forward

    def broken(self, h, cos, sin, bias, past_k, past_v):
        return real(self, h, cos, -sin, bias, past_k, past_v)

    monkeypatch.setattr(decoder_modules.DecoderLayer, "forward", broken)
    with pytest.raises(ValidationError, match=r"decoder\.onnx output '(hidden_out|present_key)' on case 'layer_0/"):
        export_bundle(tiny_checkpoint, tmp_path / "b", progress=False, low_memory=True)
    assert _leftovers(tmp_path) == []


def test_partial_folder_of_a_killed_export_is_removed(tiny_checkpoint, tmp_path):
    stale = tmp_path / ".b.partial-deadbeef"
    stale.mkdir()
    (stale / "decoder.onnx.data").write_bytes(b"\0" * 1024)
    export_bundle(tiny_checkpoint, tmp_path / "b", progress=False)
    assert _leftovers(tmp_path) == ["b"]


def test_max_abs_bound_scales_with_output_peak_only_above_one():
    from omniguard_edge.export.validate import FP32_TOLERANCE, check

    small = {"max_abs": 2e-4, "cosine": 1.0, "rel_l2": 1e-6, "peak": 0.5}
    with pytest.raises(ValidationError, match="max_abs=0.0002"):
        check("vision", "c", "features", small, FP32_TOLERANCE)  # outputs within [-1, 1]: 1e-4 absolute
    large = {"max_abs": 8e-4, "cosine": 1.0, "rel_l2": 2e-5, "peak": 120.0}
    check("vision", "c", "features", large, FP32_TOLERANCE)  # 1e-4 * 120 = 1.2e-2 allowed
    with pytest.raises(ValidationError, match="rel_l2"):
        check("vision", "c", "features", dict(large, rel_l2=2e-4), FP32_TOLERANCE)  # rel-L2 stays strict
    with pytest.raises(ValidationError):
        check("vision", "c", "features", dict(large, max_abs=0.02), FP32_TOLERANCE)


@pytest.mark.parametrize("section,field,value,message", [
    ("decoder", "head_dim", None, "decoder.head_dim is missing"),
    ("decoder", "num_layers", True, "decoder.num_layers must be int"),
    ("decoder", "rope_parameters", [1, 2], "decoder.rope_parameters must be dict"),
    ("vision", "spatial_merge_size", "2", "vision.spatial_merge_size must be int"),
    ("audio", "n_window", 2.5, "audio.n_window must be int"),
])
def test_manifest_sections_are_typed_and_checked(tiny_bundle, tmp_path, section, field, value, message):
    """The geometry sections load as typed objects (attribute and key access) and a missing or mistyped field is a
    BundleError naming it, before any session opens."""
    import json
    import shutil

    m = load_manifest(tiny_bundle, verify="none")
    assert m.decoder.head_dim == m.decoder["head_dim"] and m.vision.patch_size == dict(m.vision)["patch_size"]
    assert m.decoder.get("not_a_field", 7) == 7 and json.loads(m.to_json())["decoder"]["head_dim"] == m.decoder.head_dim
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    if value is None:
        del raw[section][field]
    else:
        raw[section][field] = value
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=message.replace(".", r"\.")):
        load_manifest(copy, verify="none")
