"""Where a stream judges its reply: check points, positions in the reply's text that are a function of the text
alone (never of how it arrives in chunks), found incrementally as the text grows (runtime/stream.py judges them).

The points, in the text's order, each defined from the previous one (`last`, 0 at the start):
- token points (`every`): the end of token k x every of the reply tokenized alone;
- sentence ends (`sentences`): after a run of `.`, `!`, `?` or the ellipsis followed by whitespace, after a run of
  the CJK terminators (no space follows those in CJK text), and before a line break; kept only `gap` characters or
  more after the previous point, so that text of terminators or line breaks ("\\n" x 2000) cannot ask for a check
  per character;
- span points: `last + span`, when the text's first `last + span` characters make known no point after `last`
  (a reply of one long word, or without any sentence end, is still judged every `span` characters; the token
  points inside such a span, known only later, are not points).

A point is known once no later text can change it or add one before it: a token point lies before a stable piece
boundary (two pieces or more after it, the first of them more than whitespace: whitespace pieces split and merge
as text arrives; the pieces are the tokenizer's own, on its normalized text), a sentence end is followed by a
character. The
scan of a chunk starts at the last stable piece boundary, so each chunk costs the text since then, not the reply;
with `every`, a long tail without a stable boundary (one long word, 8,000 line breaks) is scanned again only once
it has grown by an eighth, so that feeding it character by character costs O(n), not O(n^2) (its points come out a
little later; the span points, found on their own, do not wait).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, replace

from .checked import is_int
from .errors import InputError

# a run of terminators followed by whitespace (the point after the run), a CJK terminator run followed by anything
# else (the point after it), or a line break (the point before it)
SENTENCE_END = re.compile(r"[.!?\u2026]+(?=\s)|[\u3002\uff01\uff1f]+(?=[^\u3002\uff01\uff1f])|(?=\n)")
FINAL_END = re.compile(r"[.!?\u3002\uff01\uff1f\u2026]+$")  # at the end: a terminator that ends the reply
UNSTABLE_PIECES = 2  # the reply's last pre-tokenizer pieces: more text can still change their tokens
SENTENCE_GAP = 32  # characters after the previous check point before a sentence end is one
MIN_SPAN = 16


@dataclass(frozen=True)
class Since:
    """Where the next scan starts: a piece boundary that earlier text made stable (`base`), the reply's tokens before
    it, the last check point found, and the text's length at the last scan."""

    base: int = 0
    tokens: int = 0
    last: int = 0
    scanned: int = 0  # the text's length at the last whole scan


def _candidates(pieces: int) -> range:
    """The pieces (by index, last first) whose start may be a stable boundary: not the first (it starts at the
    boundary already known) and with UNSTABLE_PIECES - 1 pieces or more after it."""
    return range(pieces - UNSTABLE_PIECES, 0, -1)


def _plain(tokenizer):
    """The tokenizer without its added tokens: the reply is data, as in the guard prompt (runtime/prompt/tokenize.py),
    so `<|im_end|>` in a reply is the plain tokens it spells, whichever chunk completes it."""
    from tokenizers import Tokenizer

    plain = Tokenizer(tokenizer.model)
    plain.normalizer, plain.pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
    return plain


def _separable(text: str, at: int) -> bool:
    """True when NFC (the tokenizer's normalizer) cannot join text[at - 1] and text[at]: text[at] is no mark
    (combining marks, vowel signs: a later one would compose with what precedes it) and the pair does not compose
    (Hangul jamo). A scan may start at such a boundary: the text after it normalizes the same on its own."""
    if at <= 0 or at >= len(text):
        return at <= 0
    return unicodedata.category(text[at])[0] != "M" and \
        len(unicodedata.normalize("NFC", text[at - 1:at + 1])) == len(unicodedata.normalize("NFC", text[at - 1])) + 1


class CheckPoints:
    """The check points of a reply's text (the module's docstring says which)."""

    def __init__(self, tokenizer, every: int | None, sentences: bool, span: int | None = None,
                 gap: int = SENTENCE_GAP):
        if every is not None and (not is_int(every) or every < 1):
            raise InputError(f"every must be None or an int >= 1 (reply tokens between checks), not {every!r}")
        if not isinstance(sentences, bool):
            raise InputError(f"sentences must be a bool, not {sentences!r}")
        if span is None:
            span = max(256, 8 * every) if every else 1024
        if not is_int(span) or span < MIN_SPAN:
            raise InputError(f"span must be None or an int >= {MIN_SPAN} (characters at most between checks), not "
                             f"{span!r}")
        if not is_int(gap) or gap < 1:
            raise InputError(f"gap must be an int >= 1 (characters before a sentence end counts), not {gap!r}")
        self.every, self.sentences, self.span, self.gap = every, sentences, int(span), gap
        self.tokenizer = _plain(tokenizer)

    def __call__(self, text: str, final: bool = False) -> list[int]:
        """The check points of `text` known now (all of them when it is `final`)."""
        return self.scan(text, final)[0]

    def scan(self, text: str, final: bool = False, since: Since | None = None) -> tuple[list[int], Since]:
        """(the points of `text` known now that lie after `since.last`, the `since` of the next call on a longer
        text). `since`: what the previous call returned (None: from the start)."""
        since, out = since or Since(), []
        while since.last + self.span <= len(text):
            q = since.last + self.span
            known, after = self._known(text[:q], False, since)
            if not known:  # nothing known in the span: its end is a point, the unknown ones before it are not
                known, after = [q], Since(after.base, after.tokens, q)
            out += known
            since = after
        if not final and self.every and len(text) - since.scanned < (since.scanned - since.base) // 8:
            return out, since  # a long unstable tail (one long piece): scanned again once it grew by an eighth
        known, since = self._known(text, final, since)
        return out + known, replace(since, scanned=len(text))

    def _known(self, text: str, final: bool, since: Since) -> tuple[list[int], Since]:
        """The token and sentence points of `text` after `since.last` known now (gap applied), and the next since."""
        base, base_tokens = since.base, since.tokens
        stable, base_after, tokens_after = len(text), base, base_tokens
        rest = text[base:]
        ends = []
        if self.every and rest and not final and not self._may_be_stable(rest):
            return [], since  # inside a long piece: nothing known past the boundary yet, no tokenizing
        if self.every and rest:
            enc = self.tokenizer.encode(rest, add_special_tokens=False)
            ends = [base + end for _, end in enc.offsets]
            if not final:
                stable, first_stable = self._stable(text, base, enc)
                if stable > base:  # the next scan starts there
                    base_after, tokens_after = stable, base_tokens + first_stable
        sentence_ends, tokens = set(), set()
        if self.sentences:  # from the last point on: a terminator run that straddles it ends where it ends
            lead = max(base, since.last)
            sentence_ends = {m.end() for m in SENTENCE_END.finditer(text, lead, stable + 1)}
            if final and (m := FINAL_END.search(text, lead)):
                sentence_ends.add(m.end())
        if ends:
            first = (base_tokens // self.every + 1) * self.every  # the first multiple of `every` past the boundary
            tokens = {ends[k - base_tokens - 1] for k in range(first, base_tokens + len(ends) + 1, self.every)}
        last, out = since.last, []
        for p in sorted(p for p in sentence_ends | tokens if since.last < p <= stable and p > base):
            if p in tokens or p - last >= self.gap:
                out.append(p)
                last = p
        return out, replace(since, base=base_after, tokens=tokens_after, last=last)

    def _may_be_stable(self, rest: str) -> bool:
        """Whether `rest` (the text after the boundary) can hold a stable boundary: its pieces, by the pre-tokenizer
        alone (cheap, beside the BPE of a long piece), allow one."""
        tok = self.tokenizer
        if tok.pre_tokenizer is None:
            return False
        normalized = tok.normalizer.normalize_str(rest) if tok.normalizer else rest
        pieces = tok.pre_tokenizer.pre_tokenize_str(normalized)  # byte-level pieces: read the text by their offsets
        return any(normalized[slice(*pieces[k][1])].strip() for k in _candidates(len(pieces)))

    @staticmethod
    def _stable(text: str, base: int, enc) -> tuple[int, int]:
        """(the last boundary of `text` after `base` that no later text can move or merge across, the index of its
        first token in `enc`, the encoding of text[base:]). The pieces are the tokenizer's own (its pre-tokenizer on
        its normalized text, word_ids, offsets mapped back to the text): the raw text's pieces differ where NFC
        composes. A boundary qualifies when two pieces or more follow it, the piece after it holds more than
        whitespace (runs of whitespace split and merge as more arrives: "\n", " " then "\n \n") and NFC cannot
        join across it."""
        starts, seen = [], None  # (text offset, token index) of each piece's first token
        for i, (word, (start, _)) in enumerate(zip(enc.word_ids, enc.offsets)):
            if word != seen:
                starts.append((base + start, i))
                seen = word
        bounds = [b for b, _ in starts] + [len(text)]
        for k in _candidates(len(starts)):
            at, index = starts[k]
            if text[at:bounds[k + 1]].strip() and _separable(text, at):
                return at, index
        return base, 0
