"""Category scores and the codes a result reports (the grammar's docstring, runtime/verdict/grammar.py, says what
the scores are)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..decode import fork
from ..errors import NumericalError
from .grammar import Answer


def first_code_probabilities(answer: Answer, logits_after: Callable[[list[int], list[int]], np.ndarray]
                             ) -> dict[str, float]:
    """q(c) of the module's docstring: {code: probability that the categories line starts with it}.
    `logits_after(tokens, rows)`: the decoder's logits after these tokens of the categories line, needed at
    `rows` only (it runs the graph only where the grammar leaves a choice that decides the first code)."""
    grammar, t = answer.grammar, answer.tokens
    out = {c: 0.0 for c in answer.codes}

    def settled_code(text: str) -> str | None:
        """The line's first code once no continuation can change it, else None."""
        done, partial, _ = grammar.scan(text)
        if done:
            return done[0]
        if partial and not any(grammar.valid_prefix(text + d) for d in "0123456789"):
            return partial if partial in grammar.codes else None
        return None

    def visit(path: list[int], text: str, mass: float):
        allowed = answer.line_allowed(text)
        branches = []  # (token, first code when settled, else the text to continue from)
        for token in allowed:
            if token in t.line_end:
                codes = grammar.codes_in(text)
                branches.append((token, codes[0] if codes else None, None))
            else:
                nxt = text + t.line_tokens[token]
                branches.append((token, settled_code(nxt), nxt))
        if len(branches) == 1:
            probs = [1.0]
        else:
            values = np.asarray(logits_after(path, allowed), np.float64)[allowed]
            if not np.isfinite(values).all():
                raise NumericalError("the decoder's logits for the category scores are not finite; nothing was judged")
            probs = np.exp(values - values.max())
            probs = probs / probs.sum()
        for (token, code, nxt), p in zip(branches, probs):
            if code is not None:
                out[code] += mass * float(p)
            elif nxt is not None and len(path) < 16:
                visit(path + [token], nxt, mass * float(p))

    visit([], "", 1.0)
    return out


def category_scores(answer: Answer, verdict_state, decoder, embed_tokens) -> dict[str, float]:
    """{code: P(unsafe) x q(code)} for a constrained answer with a verdict, else {}. q comes from runs that
    continue forks of `verdict_state` (the decoder state at the verdict position) with the verdict `unsafe`
    (`answer.score_path()`), each fork extended from the longest path already run; `embed_tokens(ids)` gives the
    token embeddings the decoder extends with."""
    if not answer.constrain or verdict_state is None or answer.p_unsafe is None:
        return {}
    head, states = answer.score_path(), {(): verdict_state}

    def logits_after(path: list[int], rows: list[int]) -> np.ndarray:
        full = tuple(head + path)
        k = max(len(p) for p in states if full[: len(p)] == p)
        state = fork(states[full[:k]])
        out = decoder.extend(state, embed_tokens(list(full[k:]))[None])
        states[full] = state
        return decoder.logits(out, rows)

    q = first_code_probabilities(answer, logits_after)
    # q sums to 1 up to rounding (finite: its logits were checked), so a score can exceed 1 by an ulp
    return {code: min(1.0, max(0.0, float(answer.p_unsafe * v))) for code, v in q.items()}


def reported_codes(answer: Answer, written: tuple[str, ...] | list[str], scores: dict,
                   thresholds: dict | None) -> list[str]:
    """The category codes an `unsafe` result reports: those of the answer's categories line (constrained) or
    `written`, the codes its parsed text names (free decoding). With `thresholds`, a code that has one is reported
    exactly when its score reaches it (written in the line or not: the scores are first-code probabilities, so a
    second code written would rarely reach one), codes without one as written; written codes first, then the
    others by score."""
    if answer.verdict != "unsafe" and answer.constrain:
        return []
    codes = answer.line_codes if answer.constrain else list(written)
    if thresholds and scores:
        kept = [c for c in codes if c not in thresholds or scores.get(c, 0.0) >= thresholds[c]]
        extra = sorted((c for c, t in thresholds.items() if c not in codes and scores.get(c, 0.0) >= t),
                       key=lambda c: -scores[c])
        codes = kept + extra
    return codes
