"""The real Qwen2 tokenizer in the full-vocabulary reference profiles (small, 3b-shape, 7b-shape)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from omniguard_edge.export.reference_tokenizer import SPECIAL_TOKENS, qwen2_tokenizer, special_ids
from omniguard_edge.runtime.errors import CheckpointError
from omniguard_edge.runtime.prompt import Conversation, Policy, PromptTokenizer, compose_guard_text
from omniguard_edge.runtime.prompt.tokenize import Item

QWEN2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizer" / "qwen2"
needs_qwen2 = pytest.mark.skipif(not (QWEN2 / "vocab.json").is_file(),
                                 reason="../shared/data/tokenizer/qwen2 is not here (the real Qwen2 vocab.json/merges.txt)")
# docs/design.md "The model facts the code relies on": the Omni special tokens of real checkpoints
REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
            "<|audio_bos|>": 151647, "<|audio_eos|>": 151648, "<|vision_bos|>": 151652, "<|vision_eos|>": 151653,
            "<|IMAGE|>": 151655, "<|VIDEO|>": 151656}
# every guard prompt template: text, prompt + response, multi-turn, image only, text + image, audio only,
# video only, image + audio
CASES = [
    (Conversation.of("What is the easiest way to get into my neighbour's house when they are away?"), []),
    (Conversation.of("Héllo wörld!  Tabs\tand\n\nnewlines, 123 émojis 🙂", "Sure, here it is."), []),
    (Conversation.from_messages(["How do I bake bread?", "Mix flour and water.", "And then?"]), []),
    (None, ["image"]),
    (Conversation.of("What does this say?"), ["image"]),
    (None, ["audio"]),
    (None, ["video"]),
    (Conversation.of("Describe both."), ["image", "audio"]),
]


@needs_qwen2
def test_safe_and_unsafe_are_single_tokens_and_specials_sit_at_their_real_ids():
    tok = qwen2_tokenizer(QWEN2)
    assert tok.encode("safe", add_special_tokens=False).ids == [18675]
    assert tok.encode("unsafe", add_special_tokens=False).ids == [38157]
    ids = special_ids(tok)
    assert {t: ids[t] for t in REAL_IDS} == REAL_IDS
    assert sorted(ids.values()) == list(range(151643, 151643 + len(SPECIAL_TOKENS)))
    assert tok.get_vocab_size() == 151643 + len(SPECIAL_TOKENS)


def test_missing_files_say_what_to_pass(tmp_path):
    with pytest.raises(CheckpointError, match="--tokenizer-dir"):
        qwen2_tokenizer(tmp_path)


def test_another_vocabulary_is_refused(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(CheckpointError, match="not Qwen2's"):
        qwen2_tokenizer(tmp_path)


@needs_qwen2
def test_a_shuffled_vocabulary_is_refused(tmp_path):
    """Right counts, wrong ids: the known answers catch it."""
    table = json.loads((QWEN2 / "vocab.json").read_text(encoding="utf-8"))
    a, b = table["safe"], table["unsafe"]
    table["safe"], table["unsafe"] = b, a
    (tmp_path / "vocab.json").write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "merges.txt").write_bytes((QWEN2 / "merges.txt").read_bytes())
    with pytest.raises(CheckpointError, match="not the Qwen2 vocabulary"):
        qwen2_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def small_tokenizer_checkpoint(tmp_path_factory):
    """The small profile as `omniguard-edge reference` writes it, without its 7.7 GB of weights."""
    pytest.importorskip("transformers", reason="needs the export extra (torch/transformers)")
    if not (QWEN2 / "vocab.json").is_file():
        pytest.skip("../shared/data/tokenizer/qwen2 is not here")
    from omniguard_edge.export import reference

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "_write_weights", lambda *a, **k: 0)
        return reference.write_reference("small", tmp_path_factory.mktemp("ckpt") / "small", progress=False,
                                         tokenizer_dir=QWEN2)


def test_small_profile_carries_the_real_tokenizer(small_tokenizer_checkpoint):
    ck = small_tokenizer_checkpoint
    for name in ("vocab.json", "merges.txt"):  # the real files, unchanged
        assert hashlib.sha256((ck / name).read_bytes()).digest() == hashlib.sha256((QWEN2 / name).read_bytes()).digest()
    added = json.loads((ck / "added_tokens.json").read_text())
    assert {t: added[t] for t in REAL_IDS} == REAL_IDS
    decoder = json.loads((ck / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {v["content"]: int(k) for k, v in decoder.items()} == added
    thinker = json.loads((ck / "config.json").read_text())["thinker_config"]
    assert thinker["text_config"]["vocab_size"] == 151936
    assert (thinker["image_token_index"], thinker["audio_token_index"], thinker["video_token_index"]) == (
        151655, 151646, 151656)
    assert (thinker["vision_start_token_id"], thinker["vision_end_token_id"]) == (151652, 151653)
    assert (thinker["audio_start_token_id"], thinker["audio_end_token_id"]) == (151647, 151648)
    assert thinker["user_token_id"] == 872  # the ordinary token "user", as in the published configs
    gen = json.loads((ck / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643


@pytest.fixture(scope="module")
def processor_from_the_files(small_tokenizer_checkpoint, tmp_path_factory):
    """transformers' processor on the checkpoint WITHOUT our tokenizer.json: its tokenizer is then built from
    the real vocab.json and merges.txt (and tokenizer_config.json's added tokens), independently of ours."""
    import shutil

    from transformers import Qwen2_5OmniProcessor

    folder = tmp_path_factory.mktemp("files-only")
    for f in small_tokenizer_checkpoint.iterdir():
        if f.name != "tokenizer.json" and f.is_file():
            shutil.copyfile(f, folder / f.name)
    return Qwen2_5OmniProcessor.from_pretrained(folder)


def test_runtime_prompt_ids_equal_the_processor(small_tokenizer_checkpoint, processor_from_the_files):
    from tokenizers import Tokenizer

    ck, proc = small_tokenizer_checkpoint, processor_from_the_files
    ours = PromptTokenizer(Tokenizer.from_file(str(ck / "tokenizer.json")), (ck / "chat_template.jinja").read_text())
    for conversation, kinds in CASES:
        text = compose_guard_text(conversation, kinds, Policy())
        content = ([{"type": "text", "text": text}] if text else []) + [{"type": m} for m in kinds]
        rendered = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=False)
        ref = list(proc.tokenizer(rendered).input_ids)  # one placeholder per item on both sides
        mine = ours.encode(([Item("text", text)] if text else []) + [Item(m, tokens=1) for m in kinds])
        assert mine == ref, (conversation, kinds)
    assert proc.tokenizer("safe").input_ids == [18675] and proc.tokenizer("unsafe").input_ids == [38157]
    assert {t: proc.tokenizer.convert_tokens_to_ids(t) for t in REAL_IDS} == REAL_IDS


def test_tiny_takes_no_tokenizer_dir(tmp_path):
    pytest.importorskip("transformers", reason="needs the export extra (torch/transformers)")
    from omniguard_edge.export.reference import write_reference

    with pytest.raises(CheckpointError, match="tiny profile trains its own"):
        write_reference("tiny", tmp_path / "t", tokenizer_dir=tmp_path)
    assert not (tmp_path / "t").exists()


@needs_qwen2
def test_checkpoint_style_files_are_accepted(tmp_path):
    """A real checkpoint's vocab.json may list the added tokens too, and its merges.txt may lack the header."""
    table = json.loads((QWEN2 / "vocab.json").read_text(encoding="utf-8"))
    table.update({t: 151643 + i for i, t in enumerate(SPECIAL_TOKENS)})
    (tmp_path / "vocab.json").write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")
    lines = (QWEN2 / "merges.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "merges.txt").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    assert special_ids(qwen2_tokenizer(tmp_path))["<|VIDEO|>"] == 151656
    (tmp_path / "merges.txt").write_text("\n".join(lines[1:] + ["a b c"]) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="is not a merge"):
        qwen2_tokenizer(tmp_path)
