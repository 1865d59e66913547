"""Check points (runtime/checkpoints.py) are a function of the text alone: found incrementally over any chunking
they are the whole text's, with the real Qwen2 tokenizer, on adversarial text (found by a review: whitespace pieces
that merge as more arrives, NFC composing across a raw piece boundary), and a point is found as soon as it is known."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from omniguard_edge.runtime.checkpoints import CheckPoints

QWEN2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizer" / "qwen2"
ATOMS = ["word", " the", " cat", "x" * 40, ".", ". ", "!? ", "...", "\n", "\n\n", "\r\n", " \n", "\n ", "\t", "  ",
         "e\u0301", "a\u0308", " 12345", "\u6211\u4eec\u8d70\u5427", "\u3002", "\uff01", "\U0001F600", "'s", " don't"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers.models import BPE

    from omniguard_edge.export.reference_tokenizer import _qwen2_tokenizer_around

    if not (QWEN2 / "vocab.json").is_file():
        pytest.skip("../shared/data/tokenizer/qwen2 is not here")
    return _qwen2_tokenizer_around(BPE.from_file(str(QWEN2 / "vocab.json"), str(QWEN2 / "merges.txt")))


def _incremental(points, text, sizes):
    since, seen, i = None, [], 0
    for n in sizes:
        i = min(len(text), i + n)
        found, since = points.scan(text[:i], False, since)
        seen += found
    return seen + points.scan(text, True, since)[0]


def test_whitespace_that_merges_later_does_not_move_a_point(tok):
    """"W\\n " makes pieces W, "\\n", " "; one more "\\n" merges the last two into "\\n \\n". A boundary before
    whitespace pieces is not stable: the token point in W is not judged early and then dropped by a span point."""
    words = " ".join(f"w{chr(97 + i % 26)}" for i in range(200))
    p = tok.encode(words, add_special_tokens=False).offsets[63][1]
    text = words[:p] + ("\n " * 400)[:512 - p - 1] + "\n" + " \n" * 50 + " then more words here."
    points = CheckPoints(tok, 64, True)
    assert _incremental(points, text, [1] * len(text)) == _incremental(points, text, [len(text)]) == \
        points(text, final=True)


def test_pieces_are_those_of_the_normalized_text(tok):
    """Raw "e\\u0301\\n \\n \\n" pre-tokenizes as e | \\u0301\\n | ..., its NFC form as \\u00e9 | "\\n \\n \\n": the
    pieces come from the tokenizer's own encoding, so the token count does not drift."""
    text = "e\u0301\n \n \n\uff01345\n  t 12345" + " and then it goes on for a while" * 3
    points = CheckPoints(tok, 16, True)
    ends = [e for _, e in tok.encode(text, add_special_tokens=False).offsets]
    whole = points(text, final=True)
    assert _incremental(points, text, [1] * len(text)) == whole and ends[15] in whole


@pytest.mark.parametrize("seed", [0, 1])
def test_random_text_in_random_chunks_gives_the_whole_texts_points(tok, seed):
    rng = random.Random(seed)
    settings = [(None, None), (None, 64), (16, None), (16, 40), (64, None), (4, 16), (1, 16)]
    for _ in range(400):
        text = "".join(rng.choice(ATOMS) for _ in range(rng.randint(20, 150)))
        every, span = rng.choice(settings)
        points = CheckPoints(tok, every, True, span)
        sizes = []
        while sum(sizes) < len(text):
            sizes.append(rng.choice([1, 1, 2, 3, 7, 20, 100]))
        whole = points(text, final=True)
        assert _incremental(points, text, sizes) == whole, (text, every, span, sizes)
        assert all(b - a <= points.span for a, b in zip([0, *whole], whole))


def test_a_sentence_end_is_found_as_soon_as_it_is_known(tok):
    """With sentence ends only, a point is returned by the scan of the first text that shows it (the character after
    the terminator), however long the reply: a long reply is not scanned lazily like one long word."""
    text = "".join(f"Sentence {i} goes on for a little while here. " for i in range(300))
    points = CheckPoints(tok, None, True)
    since, late = None, []
    for i in range(1, len(text) + 1):
        found, since = points.scan(text[:i], False, since)
        late += [i - p for p in found]
    assert late and max(late) == 1


def test_a_special_token_string_in_the_reply_is_plain_text(tiny_bundle):
    """The bundle's tokenizer matches `<|im_end|>` as one added token; in a reply it is data (as in the guard
    prompt), so a chunk that ends inside it cannot move a point: every two-chunk cut gives the whole text's points."""
    from omniguard_edge.runtime.bundle import SessionOptions, open_bundle

    tok = open_bundle(tiny_bundle, SessionOptions(graphs=("decoder",))).tokenizer
    text = "one two three <|im_end|> " + " ".join(f"w{chr(97 + i % 26)}" for i in range(40))
    points = CheckPoints(tok, 16, True)
    whole = points(text, final=True)
    for cut in range(1, len(text)):
        assert _incremental(points, text, [cut, len(text)]) == whole, cut
