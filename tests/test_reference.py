"""The reference checkpoint loads in transformers exactly as a real OmniGuard checkpoint does."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the export extra (torch/transformers)")
transformers = pytest.importorskip("transformers", reason="needs the export extra (torch/transformers)")

from omniguard_edge.export.reference import write_reference  # noqa: E402
from omniguard_edge.runtime.errors import CheckpointError  # noqa: E402


def test_layout_matches_a_real_checkpoint(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    for f in ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "vocab.json",
              "merges.txt", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
              "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json"]:
        assert f in names
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_omni" and cfg["enable_audio_output"] is False
    assert "talker_config" in cfg and "thinker_config" in cfg
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    assert all(k.startswith("thinker.") for k in index["weight_map"])
    assert any(k.startswith("thinker.model.layers.") for k in index["weight_map"])  # the real, older names
    gen = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    tok_cfg = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    added = json.loads((tiny_checkpoint / "added_tokens.json").read_text())
    assert gen["eos_token_id"] == [added["<|im_end|>"], added["<|endoftext|>"]]
    assert cfg["thinker_config"]["image_token_index"] == added["<|IMAGE|>"]
    assert tok_cfg["image_token"] == "<|IMAGE|>" and tok_cfg["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_thinker_checkpoint"])
def test_transformers_loads_with_no_missing_keys(fixture, request):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    path = request.getfixturevalue(fixture)
    _, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _token_id_fields(node, path=""):
    """(dotted path, value) of every *_token_id / *_token_index key in a config dict, recursively."""
    for key, value in node.items():
        here = f"{path}{key}"
        if key.endswith(("_token_id", "_token_index")):
            yield here, value
        if isinstance(value, dict):
            yield from _token_id_fields(value, here + ".")


# What each id of a published Qwen2.5-Omni thinker config names (docs/design.md "The model facts the code relies on"; 872 is "user" in Qwen2's vocabulary)
THINKER_TOKENS = {
    "audio_token_index": "<|AUDIO|>", "image_token_index": "<|IMAGE|>", "video_token_index": "<|VIDEO|>",
    "audio_start_token_id": "<|audio_bos|>", "audio_end_token_id": "<|audio_eos|>",
    "vision_start_token_id": "<|vision_bos|>", "vision_end_token_id": "<|vision_eos|>",
    "vision_token_id": "<|vision_pad|>", "bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>",
    "pad_token_id": "<|endoftext|>", "user_token_id": "user",
    "text_config.bos_token_id": "<|endoftext|>", "text_config.eos_token_id": "<|im_end|>",
    "text_config.pad_token_id": "<|endoftext|>",
}


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_thinker_checkpoint"])
def test_every_token_id_lies_in_the_vocabulary_and_names_its_token(fixture, request):
    from tokenizers import Tokenizer

    path = request.getfixturevalue(fixture)
    cfg = json.loads((path / "config.json").read_text())
    thinker = cfg["thinker_config"] if fixture == "tiny_checkpoint" else cfg
    vocab = thinker["text_config"]["vocab_size"]
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    fields = dict(_token_id_fields(thinker))
    assert set(THINKER_TOKENS) <= set(fields), set(THINKER_TOKENS) - set(fields)
    for name, value in fields.items():
        assert type(value) is int and 0 <= value < vocab, (name, value, vocab)
        if name in THINKER_TOKENS:
            assert value == tok.token_to_id(THINKER_TOKENS[name]), name
    assert tok.encode("user", add_special_tokens=False).ids == [fields["user_token_id"]]
    if fixture == "tiny_checkpoint":  # the talker config (no weights) must agree with the thinker's ids
        talker = cfg["talker_config"]
        for name, value in _token_id_fields(talker):
            if name.startswith("tts_codec_"):  # the talker's own codec vocabulary
                assert type(value) is int and 0 <= value < talker["vocab_size"], name
            elif name.startswith("tts_text_"):  # embedding rows past the tokenizer, as 151859-151861 are
                assert type(value) is int and tok.get_vocab_size() <= value < vocab, name
            elif name != "pad_token_id":
                assert value == fields[name], name


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_thinker_checkpoint"])
def test_plain_transformers_generates_with_an_image(fixture, request, media_dir):
    """No config patched by hand: from_pretrained + processor + generate (get_rope_index with an image)."""
    from PIL import Image
    from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    path = request.getfixturevalue(fixture)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path).eval()
    proc = Qwen2_5OmniProcessor.from_pretrained(path, use_fast=False)
    content = [{"type": "text", "text": "Is this ok?"}, {"type": "image"}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    image = Image.open(media_dir / "colour_517x333.png").convert("RGB")
    inputs = proc(text=[prompt], images=[image], return_tensors="pt", padding=True, use_audio_in_video=False)
    ids = inputs["input_ids"][0].tolist()
    assert model.config.vision_start_token_id in ids and ids.count(model.config.image_token_id) > 1
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_audio_in_video=False)
    new = out[0, len(ids):].tolist()
    assert len(new) == 4 and all(0 <= t < model.config.text_config.vocab_size for t in new)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from omniguard_edge.export import reference

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reference, "_write_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        write_reference("tiny", tmp_path / "ckpt", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_processor_loads_and_special_tokens_are_single_ids(tiny_checkpoint):
    from transformers import Qwen2_5OmniProcessor

    proc = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)
    added = json.loads((tiny_checkpoint / "added_tokens.json").read_text())
    ids = proc.tokenizer("a<|IMAGE|>b").input_ids
    assert added["<|IMAGE|>"] in ids
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                    add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_weights_are_seeded_and_scaled(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file

    again = write_reference("tiny", tmp_path / "again", progress=False)
    shard = "model-00001-of-00001.safetensors"
    a, b = load_file(tiny_checkpoint / shard), load_file(again / shard)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    w = a["thinker.model.layers.0.mlp.up_proj.weight"]
    # profiles.py: 0.05 keeps different images apart from the first greedy token and INT4 within its gate
    assert 0.04 < w.std() < 0.06


def test_different_images_change_greedy_tokens(tiny_thinker_model, tiny_parts):
    """The weight scale is large enough for media to matter (otherwise parity tests prove little)."""
    special = tiny_parts.special
    ids = torch.tensor([[5, 6, special["vision_bos"]] + [special["image"]] * 20 + [special["vision_eos"], 7, 8]])
    grid = torch.tensor([[1, 8, 10]])
    outs = []
    for seed in (0, 1):
        pixels = torch.from_numpy(np.random.default_rng(seed).standard_normal((80, 1176)).astype(np.float32))
        out = tiny_thinker_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                          image_grid_thw=grid, max_new_tokens=8, do_sample=False)
        outs.append(out[0, ids.shape[1]:].tolist())
    assert outs[0] != outs[1]


def test_unknown_profile_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="unknown profile 'huge'"):
        write_reference("huge", tmp_path / "x")
