"""`omniguard-edge plan`: the weights of every graph from the geometry alone, checked against a real checkpoint's
tensors and against figures computed by hand for the 3B and 7B shapes; the plan per Jetson device; its errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from omniguard_edge.runtime import plan as P
from omniguard_edge.runtime.errors import InputError
from omniguard_edge.runtime.memory import GiB


def _checkpoint_counts(folder: Path) -> dict[str, int]:
    """Parameters per graph, read from the safetensors headers (no torch)."""
    counts = {"vision": 0, "audio": 0, "decoder": 0, "embedding": 0}
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in info["shape"]:
                n *= d
            if name.startswith("thinker.visual."):
                counts["vision"] += n
            elif name.startswith("thinker.audio_tower.") and "audio_bos_eos_token" not in name:
                counts["audio"] += n  # the bos/eos embedding is read outside the audio graph
            elif name.startswith("thinker.model.embed_tokens."):
                counts["embedding"] += n
            elif name.startswith(("thinker.model.", "thinker.lm_head.")):
                counts["decoder"] += n
    return counts


def test_weights_from_the_geometry_equal_the_checkpoints_tensors(tiny_checkpoint):
    shapes = P.Shapes.from_checkpoint(tiny_checkpoint)
    m = P.matrices(shapes)
    got = _checkpoint_counts(Path(tiny_checkpoint))
    positions = shapes.audio["max_source_positions"] * shapes.audio["d_model"]  # a constant of the graph, no tensor
    assert {g: P.params(m[g]) for g in m} == {**got, "audio": got["audio"] + positions}


# Qwen2.5's published parameter counts (model cards of Qwen2.5-3B and -7B: "Number of Parameters (Non-Embedding)"
# 2.77B and 6.53B). The decoder graph holds the non-embedding parameters and the output layer (vocab x hidden).
@pytest.mark.parametrize("profile, non_embedding, hidden, vocab", [("3b-shape", 2.77e9, 2048, 151936),
                                                                   ("7b-shape", 6.53e9, 3584, 152064)])
def test_decoder_weights_match_the_published_counts(profile, non_embedding, hidden, vocab):
    m = P.matrices(P.Shapes.from_profile(profile))
    assert P.params(m["decoder"]) - hidden * vocab == pytest.approx(non_embedding, rel=0.005)
    assert P.params(m["embedding"]) == hidden * vocab


def test_7b_orin_plan_against_hand_computed_figures():
    """7b-shape, recipe orin, AGX Orin 32GB, default limits. By hand:
    decoder INT4 blocks of 32 with an fp32 scale per block: a K x N weight is K*N/2 + 4*N*K/32 = 5/8 K*N bytes.
      per layer: q, o 3584x3584; k, v 3584x512; gate, up 3584x18944; down 18944x3584; then lm_head 3584x152064
      K*N summed: 28 * (2*3584*3584 + 2*3584*512 + 3*3584*18944) + 3584*152064 = 7,070,285,824
      int4: 7,070,285,824 * 5/8 = 4,418,928,640 bytes
      the rest fp32 (q/k/v biases, two norms a layer, the final norm): 28 * (3584 + 2*512 + 2*3584) + 3584 = 333,312
      params = 1,333,248 bytes
    encoders fp16 (MatMul weights 2 bytes; norms, biases, convolutions, audio positions 4 bytes):
      vision: MatMul 32 * (4*1280*1280 + 3*1280*3420) + 5120*5120 + 5120*3584 = 674,529,280 -> 1,349,058,560;
              rest 1280*1176 + 32*(4*1280 + 2*3420 + 1280 + 2*1280) + 1280 + 5120 + 3584 = 2,020,864 -> 8,083,456
      audio:  MatMul 32 * (4*1280*1280 + 2*1280*5120) + 1280*3584 = 633,733,120 -> 1,267,466,240;
              rest (1280*128*3 + 1280) + (1280*1280*3 + 1280) + 1500*1280 + 32*(8*1280 + 5120) + 2*1280 + 3584
              = 7,826,944 -> 31,307,776
    embedding fp32: 152064 * 3584 * 4 = 2,179,989,504"""
    p = P.plan(P.Shapes.from_profile("7b-shape"), "orin", "agx-orin-32gb")
    assert p.items["weights decoder (int4-qdq)"] == 4_418_928_640 + 1_333_248
    assert p.items["weights vision (fp16)"] == 1_349_058_560 + 8_083_456
    assert p.items["weights audio (fp16)"] == 1_267_466_240 + 31_307_776
    assert p.items["embedding table (float32)"] == 2_179_989_504
    assert p.available == 32 * GiB - int(1.5 * GiB) and p.fits and p.needed == sum(p.items.values())


@pytest.mark.parametrize("profile", ["3b-shape", "7b-shape"])
def test_every_jetson_device_gets_a_plan_and_more_memory_never_fits_less(profile):
    shapes = P.Shapes.from_profile(profile)
    order = ["orin-nano-4gb", "orin-nano-8gb", "orin-nx-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb"]
    assert order == list(P.DEVICES)
    fitted = [P.suggest(shapes, d) for d in order]
    assert fitted[0] is None  # a 4 GB module holds no 3B or 7B guard
    assert fitted[-1] is not None and fitted[-1].recipe == "fp32"  # 64 GB holds even fp32
    first = next(i for i, f in enumerate(fitted) if f is not None)
    assert all(f is not None for f in fitted[first:])
    for f in fitted[first:]:
        assert f.fits and f.needed <= f.available
    needed = {r: P.plan(shapes, r, "agx-orin-64gb").needed for r in P.GPU_RECIPES}
    assert needed["fp32"] > needed["gpu-fp16"] > max(needed["trt-int8"], needed["orin"])


def test_a_bundle_plans_with_its_own_files(tiny_bundle):
    from omniguard_edge.runtime.manifest import load_manifest

    m = load_manifest(tiny_bundle)
    shapes = P.BundleShapes.from_bundle(tiny_bundle)
    p = P.plan(shapes, "fp32", "orin-nano-8gb")
    graphs = {g: sum(m.files[f].size for f in (m.graphs[g].file, m.graphs[g].data_file) if f)
              for g in ("vision", "audio", "decoder")}
    assert {k: v for k, v in p.items.items() if k.startswith("weights")} == \
        {f"weights {g} (fp32)": b for g, b in graphs.items()}
    with pytest.raises(InputError, match="the bundle is fp32; plan another recipe from its bundle"):
        P.plan(shapes, "orin", "orin-nano-8gb")


def test_plan_refuses_bad_requests_naming_the_parameter(tmp_path):
    shapes = P.Shapes.from_profile("tiny")
    with pytest.raises(InputError, match="--device must be one of"):
        P.plan(shapes, "orin", "orin-nano-2gb")
    with pytest.raises(InputError, match="--recipe must be one of"):
        P.plan(shapes, "cpu-int4", "orin-nano-8gb")
    with pytest.raises(InputError, match="--reserve-gb"):
        P.plan(shapes, "orin", "orin-nano-8gb", reserve_gb=-1)
    with pytest.raises(InputError, match="--max-image-tokens must be a whole number"):
        P.plan(shapes, "orin", "orin-nano-8gb", {"max_image_tokens": 1.5})
    with pytest.raises(InputError, match="no config.json"):
        P.Shapes.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(InputError, match="no text_config, vision_config and audio_config"):
        P.Shapes.from_checkpoint(tmp_path)


def test_plan_cli_json_is_only_json_with_fits_on_top(capsys):
    from omniguard_edge.cli import main

    assert main(["plan", "--profile", "7b-shape", "--device", "orin-nx-16gb", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["plan"]["recipe"] == "gpu-fp16"
    assert out["fits_with"]["fits"] is True and out["fits_with"]["device"] == "orin-nx-16gb"
    assert set(out["assumptions"]) == set(P.DEVICE_COSTS)
    assert main(["plan", "--profile", "7b-shape", "--device", "agx-orin-32gb", "--recipe", "orin"]) == 0
    text = capsys.readouterr().out
    assert "weights decoder (int4-qdq)" in text and "FITS" in text
