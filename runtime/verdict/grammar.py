"""The guard's answer, token by token: a small grammar over both published output styles, the verdict from
P(unsafe) and a threshold, the categories line, when to stop, and the category scores.

Plain style (the prompt's instruction):      Labelled style (the public OmniGuard-7B parser):
    unsafe                                       - Safety Assessment: unsafe
    S1, S10                                      - Categories: S1, S10
    <critique>                                   - Assessment: <critique>

Constrained decoding (`Answer` with constrain=True):
- At the first position the model's own preference picks the branch: the larger logit among the plain
  verdict tokens (`safe`, `unsafe`) and the first token of `- Safety Assessment:` decides.
- The labelled branch writes the rest of `- Safety Assessment:` as forced tokens (one graph run for all).
- At the verdict token of the branch taken, P(unsafe) = softmax over that branch's two verdict tokens, and
  the verdict is `unsafe` when P(unsafe) >= threshold; decoding continues from the token chosen.
- Then a line end (newline or EOS; after `unsafe` a newline). After `unsafe`: (labelled: `- Categories:` forced) a
  categories line of
  the active policy's codes, `S<n>` separated by `, `, each code at most once, no other characters, at least
  one code, then a line end. After that, decoding is free (`full` mode only).
- `verdict` mode stops once the verdict token is chosen, `categories` mode once the categories line has
  ended (for `safe`: once the verdict is chosen), `full` mode runs to EOS or the token budget.

Free decoding (constrain=False, for parity checks): plain argmax; the same stop points are found by reading
the text (`parse`); P(unsafe) is read at the position where the verdict word of the style written was chosen.

Category scores (`category_scores`): for each code c of the policy, P(unsafe) x q(c), where q(c) is the
probability that the categories line starts with code c, under the constrained grammar (the model's
probabilities renormalised over the tokens the grammar allows at each position), with the verdict `unsafe`
and its line end in place. They sum to P(unsafe). Computing q takes a graph run at each position where the
grammar leaves a choice that decides the first code (with S1..S12 and a digit-per-token tokenizer: two runs,
after `S` and after `S1`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import NumericalError
from .parse import parse

MODES = ("verdict", "categories", "full")
PLAIN, LABELLED = "plain", "labelled"
LABELLED_LEAD = "- Safety Assessment:"
CATEGORIES_LEAD = "- Categories:"
LINE_CHARS = frozenset("S0123456789, ")


class CodeLine:
    """The categories line as characters: `lead` (the labelled style's space after the colon, or nothing),
    then `S<n>` codes of the policy separated by `, `, no code twice."""

    def __init__(self, codes: Sequence[str], lead: str = ""):
        self.codes, self.lead = tuple(codes), lead
        self._codes = frozenset(self.codes)

    def scan(self, text: str):
        """-> (codes complete so far, the partial last code or None, ok). `ok` is False when no continuation
        of `text` can be a valid line."""
        if not text.startswith(self.lead) and not self.lead.startswith(text):
            return [], None, False
        if len(text) < len(self.lead):
            return [], "", True
        rest, done = text[len(self.lead):], []
        while True:
            m = re.match(r"S(\d*)", rest)
            if m is None:
                return done, "", rest == ""  # nothing of the next code yet
            code, end = m.group(0), m.end()
            if end == len(rest):  # the code may still grow
                fits = any(c.startswith(code) and c not in done for c in self.codes)
                return done, code, fits
            if code not in self._codes or code in done:
                return done, None, False
            done.append(code)
            sep = rest[end:end + 2]
            if ", ".startswith(sep) and end + len(sep) == len(rest):  # "," or ", " at the end: a code is to come
                return done, None, any(c not in done for c in self.codes)
            if sep != ", ":
                return done, None, False
            rest = rest[end + 2:]

    def valid_prefix(self, text: str) -> bool:
        return self.scan(text)[2]

    def complete(self, text: str) -> bool:
        """`text` is a whole line: at least one code, the last one complete and not repeated."""
        done, partial, ok = self.scan(text)
        if not ok:
            return False
        if partial:
            return partial in self._codes and partial not in done
        return bool(done) and text.endswith(done[-1])

    def codes_in(self, text: str) -> list[str]:
        done, partial, _ = self.scan(text)
        return done + ([partial] if partial and partial in self._codes and partial not in done else [])


@dataclass(frozen=True)
class AnswerTokens:
    """The token ids both styles are written with, in one tokenizer."""

    plain: tuple[int, int]  # `safe`, `unsafe` at the start of the answer
    labelled_lead: tuple[int, ...]  # `- Safety Assessment:`
    labelled: tuple[int, int]  # ` safe`, ` unsafe` after the colon
    categories_lead: tuple[int, ...]  # `- Categories:`
    newline: int
    eos: tuple[int, ...]
    line_tokens: dict  # token id -> text, every ordinary token made only of categories-line characters

    @classmethod
    def build(cls, encode: Callable[[str], list[int]], decode_one: Callable[[int], str], ordinary: int,
              eos: Sequence[int]) -> AnswerTokens | None:
        """None when a verdict word or the newline is not one token in this tokenizer (no constrained
        decoding is possible then). `ordinary`: ids below it are ordinary tokens."""
        words = [encode(w) for w in ("safe", "unsafe", " safe", " unsafe", "\n")]
        if any(len(w) != 1 for w in words):
            return None
        (safe,), (unsafe,), (lsafe,), (lunsafe,), (newline,) = words
        line = {i: t for i in range(ordinary) if (t := decode_one(i)) and set(t) <= LINE_CHARS}
        return cls((safe, unsafe), tuple(encode(LABELLED_LEAD)), (lsafe, lunsafe), tuple(encode(CATEGORIES_LEAD)),
                   newline, tuple(sorted(eos)), line)

    @property
    def line_end(self) -> list[int]:
        return [self.newline, *self.eos]


def _softmax_pair(logits: np.ndarray, pair: Sequence[int], what: str) -> float:
    """P(second | one of the two), from their logits; NumericalError when not finite."""
    values = logits[list(pair)].astype(np.float64)
    if not np.isfinite(values).all():
        raise NumericalError(f"{what}: the verdict logits are not finite ({values.tolist()}); nothing was judged")
    values = np.exp(values - values.max())
    p = float(values[1] / values.sum())
    if not math.isfinite(p):
        raise NumericalError(f"{what}: P(unsafe) is not finite ({p}); nothing was judged")
    return p


def _pick(logits: np.ndarray, allowed: Sequence[int]) -> int:
    values = logits[list(allowed)]
    if np.isnan(values).any() or np.isposinf(values).any():  # -inf (a masked token) is never picked
        raise NumericalError("the decoder's logits for a constrained choice are not finite; nothing was judged")
    return int(allowed[int(np.argmax(values))])


@dataclass
class Answer:
    """One generation's answer state. The decode loop calls `choose(logits)` with the logits of the next
    position and appends the tokens it returns (several when the grammar forces a literal), and stops when
    `finished` is True."""

    tokens: AnswerTokens | None
    codes: tuple[str, ...]
    mode: str = "categories"
    threshold: float = 0.5
    constrain: bool = True
    decode: Callable[[list[int]], str] | None = None  # token ids -> text (free decoding reads the text)
    generated: list[int] = field(default_factory=list)
    branch: str | None = None  # plain | labelled (constrained: chosen at the first position)
    verdict: str | None = None  # safe | unsafe, once chosen
    p_unsafe: float | None = None
    verdict_index: int | None = None  # index in `generated` of the verdict token
    finished: bool = False
    _phase: str = "start"
    _line: str = ""  # the categories line so far

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.constrain and self.tokens is None:
            raise ValueError("constrained decoding needs `safe`, `unsafe` and the newline as single tokens")
        self._grammar = {PLAIN: CodeLine(self.codes, ""), LABELLED: CodeLine(self.codes, " ")}

    # -- constrained -----------------------------------------------------------------------------------
    def _verdict_at(self, logits: np.ndarray, pair: tuple[int, int]) -> int:
        self.p_unsafe = _softmax_pair(logits, pair, "the verdict position")
        self.verdict = "unsafe" if self.p_unsafe >= self.threshold else "safe"
        self.verdict_index = len(self.generated)
        return pair[1] if self.verdict == "unsafe" else pair[0]

    def line_allowed(self, line: str | None = None) -> list[int]:
        """Tokens that keep the categories line (default: the one written so far) valid, plus the line end
        once it is a whole line."""
        grammar, line = self._grammar[self.branch or PLAIN], self._line if line is None else line
        allowed = [i for i, t in self.tokens.line_tokens.items() if grammar.valid_prefix(line + t)]
        if grammar.complete(line):
            allowed += self.tokens.line_end
        return allowed

    def _constrained(self, logits: np.ndarray) -> list[int]:
        t, phase = self.tokens, self._phase
        if phase == "start":
            lead = t.labelled_lead[0]
            self.branch = LABELLED if logits[lead] > max(logits[t.plain[0]], logits[t.plain[1]]) else PLAIN
            if self.branch == PLAIN:
                out = [self._verdict_at(logits, t.plain)]
                self._phase = "verdict_end"
            else:
                out = list(t.labelled_lead)
                self._phase = "labelled_verdict"
            return out
        if phase == "labelled_verdict":
            self._phase = "verdict_end"
            return [self._verdict_at(logits, t.labelled)]
        if phase == "verdict_end":  # `unsafe` is followed by its categories line: a newline, not EOS
            token = _pick(logits, t.line_end if self.verdict == "safe" else [t.newline])
            if token != t.newline or self.verdict == "safe":
                self._phase = "free"
                return [token]
            if self.branch == LABELLED:
                self._phase = "codes"
                return [token, *t.categories_lead]
            self._phase = "codes"
            return [token]
        if phase == "codes":
            token = _pick(logits, self.line_allowed())
            if token in t.line_end:
                self._phase = "free"
            else:
                self._line += t.line_tokens[token]
            return [token]
        return [int(np.argmax(logits))]

    def _stop_constrained(self) -> bool:
        if self.mode == "verdict":
            return self.verdict is not None
        if self.mode == "categories":
            return self.verdict == "safe" or (self.verdict == "unsafe" and self._phase == "free")
        return False

    # -- free ------------------------------------------------------------------------------------------
    def _free(self, logits: np.ndarray) -> list[int]:
        if self.tokens is not None and self.branch != LABELLED:
            if not self.generated:  # provisional: the plain style's verdict is the first token
                self.p_unsafe = _softmax_pair(logits, self.tokens.plain, "the first position")
                self.branch, self.verdict_index = PLAIN, 0
            elif self._may_end_the_lead(self.generated[-1]):
                text = self.decode(self.generated)
                if text.lstrip().startswith(LABELLED_LEAD) and text.rstrip(" ").endswith(LABELLED_LEAD):
                    self.p_unsafe = _softmax_pair(logits, self.tokens.labelled, "the verdict position")
                    self.branch, self.verdict_index = LABELLED, len(self.generated)
        return [int(np.argmax(logits))]

    def _may_end_the_lead(self, token: int) -> bool:
        """Whether the text can end with the labelled lead (`...:`, then spaces) after this token: only then is the
        whole answer decoded (not at every one of up to 256 free tokens)."""
        last = self.decode([token]).rstrip(" ")
        return not last or last.endswith(LABELLED_LEAD[-1])

    def _stop_free(self) -> bool:
        text = self.decode(self.generated)
        lines = text.split("\n")
        first = lines[0].strip().lower()
        verdict = parse(text).verdict
        if self.mode == "verdict":
            return len(lines) >= 2 and verdict in ("safe", "unsafe")
        if first.startswith("- safety assessment"):
            if self.mode == "categories":
                return any(ln.strip().lower().startswith("- assessment") for ln in lines[1:]) or \
                    (verdict == "safe" and len(lines) >= 2)
            return False
        if self.mode == "categories":
            return len(lines) >= (2 if first == "safe" else 3)
        return False

    # -- the loop's interface ---------------------------------------------------------------------------
    def next_rows(self) -> list[int] | None:
        """The only tokens the next `choose` can pick (the decoder may compute just their logits), or None when
        it may pick any (free decoding, the critique)."""
        if not self.constrain:
            return None
        t, phase = self.tokens, self._phase
        if phase == "start":
            return [t.plain[0], t.plain[1], t.labelled_lead[0]]
        if phase == "labelled_verdict":
            return list(t.labelled)
        if phase == "verdict_end":
            return t.line_end if self.verdict == "safe" else [t.newline]
        if phase == "codes":
            return self.line_allowed()
        return None

    def choose(self, logits: np.ndarray) -> list[int]:
        out = self._constrained(logits) if self.constrain else self._free(logits)
        self.generated += out
        if out and out[-1] in (self.tokens.eos if self.tokens else ()):
            self.finished = True
        elif self.mode != "full":
            self.finished = self._stop_constrained() if self.constrain else self._stop_free()
        return out

    @property
    def grammar(self) -> CodeLine:
        """The categories line's grammar of the branch taken (plain until one is)."""
        return self._grammar[self.branch or PLAIN]

    @property
    def line_codes(self) -> list[str]:
        """The codes of the categories line written (constrained decoding)."""
        return self._grammar[self.branch].codes_in(self._line) if self.branch else []

    def score_path(self) -> list[int]:
        """Tokens from the verdict position to the start of the categories line, with the verdict `unsafe`."""
        t = self.tokens
        if self.branch == LABELLED:
            return [t.labelled[1], t.newline, *t.categories_lead]
        return [t.plain[1], t.newline]
