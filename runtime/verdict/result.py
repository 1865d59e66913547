"""The typed, JSON-serializable result of one moderation; it fails closed on a non-finite score."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import describe

VERDICTS = ("safe", "unsafe", "unknown", "error")


def strict_json(value):
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
        return {strict_json(k) if isinstance(k, str) else k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    return value


@dataclass
class ModerationResult:
    """Typed, JSON-serializable outcome of one moderation."""

    verdict: str  # safe | unsafe | unknown (unparseable answer) | error (nothing was judged)
    categories: list[dict] = field(default_factory=list)  # [{"code": "S1", "name": "Violent Crimes"}]
    critique: str = ""
    raw_text: str = ""
    p_unsafe: float | None = None  # P(unsafe) vs P(safe) at the verdict token, when both are single tokens
    category_scores: dict = field(default_factory=dict)  # {code: P(unsafe) x q(code)} (verdict/scores.py)
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
        """Plain JSON types only: non-finite numbers are None, strings valid UTF-8 (see `strict_json`)."""
        return strict_json(asdict(self))

    def to_json(self) -> str:
        """Strict JSON (RFC 8259: no NaN or Infinity), UTF-8 encodable."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

    @classmethod
    def failed(cls, exc: BaseException, timings: dict | None = None) -> ModerationResult:
        """`verdict == "error"` for `exc`; formatting never raises (a caller's exception may fail to print)."""
        return cls(verdict="error", error=describe(exc), timings=dict(timings) if timings else {})
