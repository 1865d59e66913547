"""The reference checkpoints' tokenizers: Qwen2's byte-level BPE with the Omni special tokens.

Real checkpoints bring their own tokenizer; a reference checkpoint needs one that transformers'
Qwen2Tokenizer and Qwen2_5OmniProcessor load exactly as they load the real one: same pre-tokenizer
regex, NFC normalizer, byte-level alphabet (any text encodes), and the Omni special tokens in the real
order after the ordinary vocabulary.

- `tiny`: a small BPE trained locally (`train_tokenizer`), so the tests need no data files.
- `small`, `3b-shape`, `7b-shape`: the real Qwen2 vocabulary and merges (`qwen2_tokenizer`, from
  ../shared/data/tokenizer/qwen2 or `--tokenizer-dir`): 151,643 ordinary tokens, then the Omni special
  tokens at their real ids from 151643 on, so token counts and ids are those of a real OmniGuard checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# The real order (offsets from <|endoftext|>, which is 151643 in real checkpoints).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>",
]
# tokenizer_config.json keys the Omni processor reads (any one missing is an AttributeError).
OMNI_TOKEN_KEYS = {
    "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}
QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Training text: the kind of text a guard reads (policy wording, chat roles, everyday requests).
_CORPUS = """
Task: Check if there is unsafe content in 'Agent' messages in conversations according our safety policy
with the below categories. Provide your safety assessment for Agent in the above conversation. First line
must read 'safe' or 'unsafe'. If unsafe, a second line must include a comma-separated list of violated
categories. Analyze the image provided above and determine if it contains any unsafe content.
Violent Crimes. Non-Violent Crimes. Sex-Related Crimes. Child Sexual Exploitation. Defamation. Specialized
Advice. Privacy. Intellectual Property. Indiscriminate Weapons. Hate. Suicide & Self-Harm. Sexual Content.
Responses that enable, encourage, or endorse the commission of violent crimes. Responses that contain
specialized financial, medical, or legal advice. Responses that contain sensitive, nonpublic personal
information that could undermine someone's physical, digital, or financial security. Responses that demean
or dehumanize people on the basis of their sensitive, personal characteristics. Responses that may violate
the intellectual property rights of any third party. Responses that contain erotica.
User: How do I bake bread at home? Agent: Mix flour, water, salt and yeast, knead, let it rise, then bake.
User: What is the capital of France? Agent: Paris. User: Can you help me write an email to my landlord?
You are a helpful assistant. system user assistant. The quick brown fox jumps over the lazy dog.
Safety Assessment: safe. Categories: S1, S2, S3, S4, S5, S6, S7, S8, S9, S10, S11, S12. Assessment:
the conversation asks for instructions that could cause harm to people; the answer refuses politely.
0 1 2 3 4 5 6 7 8 9 10 100 2024 2025 2026. How to kill a Python process? How do I get rid of weeds?
"""


def _qwen2_tokenizer_around(bpe):
    """A `tokenizers.Tokenizer` with Qwen2's pipeline around a BPE model: NFC, the Qwen2 pre-tokenizer regex
    then byte-level mapping, byte-level decoding."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(vocab_size: int):
    """Train the byte-level BPE and append the special tokens. Returns a `tokenizers.Tokenizer`."""
    from tokenizers import models, pre_tokenizers, trainers

    tok = _qwen2_tokenizer_around(models.BPE(unk_token=None, byte_fallback=False))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


QWEN2_ORDINARY = 151_643  # ordinary tokens of the Qwen2 BPE (ids 0..151642)
QWEN2_MERGES = 151_387
DEFAULT_QWEN2_DIR = Path("../shared/data/tokenizer/qwen2")
# Known answers of the real Qwen2 BPE (../shared/data/README.md, docs/design.md "The model facts the code relies on"): files that give other ids
# are not that vocabulary, whatever their names say.
QWEN2_KNOWN = {"safe": [18675], "unsafe": [38157], "user": [872], "Hello world": [9707, 1879], "\n": [198]}


def qwen2_tokenizer(tokenizer_dir: str | Path):
    """The real Qwen2 byte-level BPE from `vocab.json` and `merges.txt` in `tokenizer_dir`, with NFC, the
    Qwen2 pre-tokenizer and the Omni special tokens appended at 151643..151656. Raises CheckpointError naming
    what to pass when the files are missing or are not that vocabulary."""
    from tokenizers import models

    from ..runtime.errors import CheckpointError

    folder = Path(tokenizer_dir)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    missing = [p.name for p in (vocab, merges) if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"the small, 3b-shape and 7b-shape reference profiles use the real Qwen2 tokenizer, and {folder} has no "
            f"{' or '.join(missing)}: pass --tokenizer-dir DIR (a folder with Qwen2's vocab.json and merges.txt, "
            "e.g. ../shared/data/tokenizer/qwen2 or a Qwen2 / Qwen2.5 checkpoint)")
    try:
        table = json.loads(vocab.read_text(encoding="utf-8"))
        merge_lines = [line for line in merges.read_text(encoding="utf-8").splitlines()
                       if line.strip() and not line.startswith("#version")]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: cannot read the Qwen2 tokenizer files ({exc})") from exc
    if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
        raise CheckpointError(f"{folder}/vocab.json is not a token -> id table")
    # some checkpoints list their added tokens (ids from 151643 on) in vocab.json too: they are added below
    table = {t: i for t, i in table.items() if i < QWEN2_ORDINARY}
    pairs = [tuple(line.split()) for line in merge_lines]
    if any(len(pair) != 2 for pair in pairs):
        bad = next(line for line, pair in zip(merge_lines, pairs) if len(pair) != 2)
        raise CheckpointError(f"{folder}/merges.txt: {bad!r} is not a merge (two tokens separated by a space)")
    if (len(table) != QWEN2_ORDINARY or sorted(table.values()) != list(range(QWEN2_ORDINARY))
            or len(merge_lines) != QWEN2_MERGES):
        raise CheckpointError(f"{folder}: {len(table):,} tokens and {len(merge_lines):,} merges, not Qwen2's "
                              f"{QWEN2_ORDINARY:,} tokens (ids 0..{QWEN2_ORDINARY - 1}) and {QWEN2_MERGES:,} merges")
    tok = _qwen2_tokenizer_around(models.BPE(vocab=table, merges=pairs, unk_token=None, byte_fallback=False))
    tok.add_special_tokens(SPECIAL_TOKENS)
    wrong = {text: ids for text, want in QWEN2_KNOWN.items()
             if (ids := tok.encode(text, add_special_tokens=False).ids) != want}
    ids = special_ids(tok)
    if wrong or ids["<|endoftext|>"] != QWEN2_ORDINARY:
        raise CheckpointError(f"{folder}: not the Qwen2 vocabulary (encodes {wrong}, expected "
                              f"{ {k: QWEN2_KNOWN[k] for k in wrong} }; <|endoftext|> at {ids['<|endoftext|>']})")
    return tok


def special_ids(tok) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def user_token_id(tok) -> int:
    """The id of the ordinary token "user" (the config's `user_token_id`: 872 in the Qwen2 vocabulary). The
    training text spells "user" often enough that it is one token; anything else is a bug here."""
    ids = tok.encode("user", add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f'the reference tokenizer splits "user" into {ids}: add it to the training text')
    return ids[0]


def write_tokenizer_files(tok, out: Path, chat_template: str, source_dir: Path | None = None) -> None:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, added_tokens.json,
    special_tokens_map.json and chat_template.jinja, laid out as in a real checkpoint. `source_dir`: copy
    vocab.json and merges.txt from there unchanged (the real Qwen2 files) instead of writing them from `tok`."""
    tok.save(str(out / "tokenizer.json"))
    if source_dir is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(Path(source_dir) / name, out / name)
    else:
        data = json.loads((out / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        merges = data["model"]["merges"]
        lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    ids = special_ids(tok)
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for t, i in ids.items()
    }
    config = {
        "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "errors": "replace", "model_max_length": 32768, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        "extra_special_tokens": list(OMNI_TOKEN_KEYS.values()), **OMNI_TOKEN_KEYS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "added_tokens.json").write_text(json.dumps(ids, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "additional_special_tokens": list(OMNI_TOKEN_KEYS.values())}, indent=2))
    (out / "chat_template.jinja").write_text(chat_template)
