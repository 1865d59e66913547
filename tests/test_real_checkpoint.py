"""Known answers of a built `small-real` checkpoint (marker `real`: `make test-real`, never in `make test`).

They need the checkpoint `omniguard-edge reference --profile small-real` wrote (OMNIGUARD_SMALL_REAL, default
artifacts/real/checkpoint) and the trained decoder's GGUF file in the cache; they skip, saying which, when either is
missing. Neither is fetched here.

- the checkpoint's decoder logits equal transformers' own GGUF loading (an independent conversion) within 1e-4
  relative on several prompts, every row but the two fitted verdict rows;
- a greedy continuation of a short code prompt is the same before the fit (transformers' GGUF model) and after it
  (the checkpoint through the Omni thinker class), and fluent;
- the written rows give the recorded fit: the plain pair beats the labelled lead at the verdict position.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.real
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from omniguard_edge.export.real_weights import QWEN25_CODER, real_decoder_gguf  # noqa: E402
from omniguard_edge.runtime.errors import CheckpointError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CKPT = Path(os.environ.get("OMNIGUARD_SMALL_REAL", ROOT / "artifacts" / "real" / "checkpoint"))
PROMPTS = ["def fibonacci(n):\n", "The capital of France is", "<|im_start|>user\nHow do I sort a list in Python?"
           "<|im_end|>\n<|im_start|>assistant\n", "Ignore all previous instructions and"]


@pytest.fixture(scope="module")
def models():
    if not (CKPT / "reference.json").is_file():
        pytest.skip(f"no small-real checkpoint at {CKPT} (omniguard-edge reference --profile small-real --out {CKPT})")
    try:
        gguf = real_decoder_gguf(fetch=False)
    except CheckpointError as exc:
        pytest.skip(f"the trained decoder's GGUF file is not in the cache: {exc}")
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, Qwen2_5OmniThinkerForConditionalGeneration

    theirs = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(CKPT), dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(CKPT / "tokenizer.json"))
    return theirs, ours, tok, json.loads((CKPT / "reference.json").read_text())


def _ids(tok, text):
    return torch.tensor([tok.encode(text, add_special_tokens=False).ids])


def test_decoder_logits_equal_transformers_gguf_loading(models):
    theirs, ours, tok, record = models
    assert record["decoder"]["gguf_sha256"] == QWEN25_CODER.sha256
    fitted = sorted(record["verdict_fit"]["token_ids"][k] for k in ("safe", "unsafe"))
    keep = torch.ones(theirs.config.vocab_size, dtype=torch.bool)
    keep[fitted] = False
    for text in PROMPTS:
        ids = _ids(tok, text)
        with torch.no_grad():
            a = theirs(input_ids=ids).logits[..., keep]
            b = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[..., keep]
        rel = float((a - b).abs().max() / a.abs().max())
        assert rel < 1e-4, (text, rel)


def test_greedy_code_continuation_is_unchanged_by_the_fit(models):
    theirs, ours, tok, _ = models
    ids = _ids(tok, PROMPTS[0])
    with torch.no_grad():
        a = theirs.generate(ids, max_new_tokens=24, do_sample=False)
        b = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    text = tok.decode(a[0, ids.shape[1]:].tolist())
    print(f"\ngreedy continuation of {PROMPTS[0]!r}: {text!r}")
    assert a[0].tolist() == b[0].tolist()
    assert "return" in text or "if" in text  # fluent Python, not noise


def test_the_fit_recorded_in_the_checkpoint_is_what_its_rows_compute(models):
    _, ours, _, record = models
    fit = record["verdict_fit"]
    assert fit["heldout_items"] >= 100 and fit["train_items"] >= 100
    assert fit["rows_vs_fit_max_abs_dp"] < 1e-5
    assert fit["plain_over_lead_min_margin"] > 0
    head = ours.lm_head.weight.detach()
    ids = fit["token_ids"]
    assert not torch.equal(head[ids["safe"]], head[ids["unsafe"]])
