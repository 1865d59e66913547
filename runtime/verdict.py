"""The result of a moderation, and parsing of the guard's answer in both output styles.

Plain style (the official instruction): first line `safe` or `unsafe`, second line `S1, S9`, critique after.
Labelled style (a published third-party parser): `- Safety Assessment: unsafe`, `- Categories: S1, S9`,
`- Assessment: <critique>`. The verdict comes first in both; anything else is `unknown`, and any error
is `error`: never `safe` (the guard fails closed).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import describe
from .prompt.policy import Policy

VERDICTS = ("safe", "unsafe", "unknown", "error")
_CODE = re.compile(r"\bS(\d{1,2})\b")
_LABEL = re.compile(r"^\s*-?\s*(safety assessment|categories|assessment)\s*:\s*(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Parsed:
    verdict: str  # safe | unsafe | unknown
    categories: tuple[str, ...]  # codes, e.g. ("S1", "S9"), in the order written, deduplicated
    critique: str
    style: str  # plain | labelled | none


def _codes(text: str, policy: Policy) -> tuple[str, ...]:
    seen = []
    for m in _CODE.finditer(text):
        code = f"S{int(m.group(1))}"
        if policy.name_of(code) is not None and code not in seen:
            seen.append(code)
    return tuple(seen)


def _word(text: str) -> str:
    word = text.strip().strip(".:,;!*'\"`").lower()
    return word if word in ("safe", "unsafe") else ""


def parse(text: str, policy: Policy = Policy()) -> Parsed:
    """Read verdict, category codes and critique from the guard's raw text. The verdict is the answer's first
    content line, in either style: a `- Safety Assessment:` line further down (in a critique that quotes or was
    steered by the user's text) never overrides it."""
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n")]
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    labelled = {}
    opening = _LABEL.match(lines[first]) if first is not None else None
    if opening and opening.group(1).lower() == "safety assessment":
        for i, ln in enumerate(lines[first:], start=first):
            m = _LABEL.match(ln)
            if m:
                key = m.group(1).lower()
                value = m.group(2) if key != "assessment" else "\n".join([m.group(2)] + lines[i + 1:])
                labelled.setdefault(key, value)
                if key == "assessment":
                    break  # the critique runs to the end: labels inside it are its text
    if "safety assessment" in labelled and _word(labelled["safety assessment"]):
        verdict = _word(labelled["safety assessment"])
        cats = _codes(labelled.get("categories", ""), policy) if verdict == "unsafe" else ()
        return Parsed(verdict, cats, labelled.get("assessment", "").strip(), "labelled")
    content = [ln for ln in lines if ln.strip()]
    if content and _word(content[0].split()[0] if content[0].split() else ""):
        verdict = _word(content[0].split()[0])
        rest = content[1:]
        cats = _codes(rest[0], policy) if verdict == "unsafe" and rest else ()
        critique_lines = rest[1:] if cats else rest
        return Parsed(verdict, cats, "\n".join(critique_lines).strip(), "plain")
    return Parsed("unknown", (), text.strip(), "none")


def _strict(value):
    """A JSON-safe copy: non-finite floats become None (null), lone surrogates in strings (e.g. a surrogate-
    escaped file name in an error) become backslash escapes, numpy values plain Python ones."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return str(value)
    if isinstance(value, dict):
        return {_strict(k) if isinstance(k, str) else k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return _strict(value.tolist())
    return value


@dataclass
class ModerationResult:
    """Typed, JSON-serializable outcome of one moderation."""

    verdict: str  # safe | unsafe | unknown (unparseable answer) | error (nothing was judged)
    categories: list[dict] = field(default_factory=list)  # [{"code": "S1", "name": "Violent Crimes"}]
    critique: str = ""
    raw_text: str = ""
    p_unsafe: float | None = None  # P(unsafe) vs P(safe) at the verdict token, when both are single tokens
    category_scores: dict = field(default_factory=dict)  # {code: P(unsafe) x q(code)} (runtime/answer.py)
    style: str = ""  # plain | labelled: the output style the answer took | none
    mode: str = ""  # verdict | categories | full
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those whose decoder cache came from the prefix cache
    generated_tokens: int = 0
    stop_reason: str = ""
    timings: dict = field(default_factory=dict)  # seconds per stage
    error: str | None = None  # "InputError: ..." when verdict == "error"
    generated_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # seconds from prefill start to each token
    notes: list[str] = field(default_factory=list)  # changes made to fit the memory budget (e.g. an image downscaled)
    vision_grids: list = field(default_factory=list)  # [t, h, w] patches the vision encoder ran on: images, then videos

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")
        if self.p_unsafe is not None and not math.isfinite(self.p_unsafe):  # fail closed: a NaN score judged nothing
            self.error = f"NumericalError: P(unsafe) is {self.p_unsafe}; nothing was judged"
            self.verdict, self.p_unsafe, self.categories, self.category_scores = "error", None, [], {}
        bad = [c for c, v in self.category_scores.items() if not (isinstance(v, float) and 0.0 <= v <= 1.0)]
        if bad:  # fail closed: a score that is not a probability judged nothing
            self.error = f"NumericalError: category scores {bad} are not probabilities; nothing was judged"
            self.verdict, self.p_unsafe, self.categories, self.category_scores = "error", None, [], {}

    @property
    def is_safe(self) -> bool:
        """True only for an explicit `safe`: unknown and error are not safe."""
        return self.verdict == "safe"

    def to_dict(self) -> dict:
        """Plain JSON types only: non-finite numbers are None, strings valid UTF-8 (see `_strict`)."""
        return _strict(asdict(self))

    def to_json(self) -> str:
        """Strict JSON (RFC 8259: no NaN or Infinity), UTF-8 encodable."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

    @classmethod
    def failed(cls, exc: BaseException, timings: dict | None = None) -> ModerationResult:
        """`verdict == "error"` for `exc`; formatting never raises (a caller's exception may fail to print)."""
        return cls(verdict="error", error=describe(exc), timings=dict(timings) if timings else {})
