"""`GuardOptions`: every setting of a Guard, checked when made (a ValueError names the field)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import SessionOptions
from .checked import is_int
from .encoder_cache import DEFAULT_BYTES
from .memory import MemoryBudget
from .preprocess.audio import AudioLimits
from .preprocess.image import ImageLimits
from .preprocess.video import VideoLimits
from .prompt import Policy
from .verdict import MODES


@dataclass(frozen=True)
class GuardOptions:
    """Moderation settings; every field has a sane default."""

    policy: Policy = Policy()  # categories shown to the guard
    # verdict: stop once the verdict token is chosen; categories: once the categories line has ended (for `safe`:
    # at the verdict); full: the critique too, up to critique_max_new_tokens (runtime/verdict/grammar.py)
    mode: str = "categories"
    max_new_tokens: int = 32  # budget of the verdict and categories modes
    critique_max_new_tokens: int = 256  # budget of the full mode
    # the answer grammar over both output styles (runtime/verdict/grammar.py); False: free greedy decoding (parity checks)
    constrain_verdict: bool = True
    threshold: float = 0.5  # the verdict is `unsafe` when P(unsafe) >= threshold (constrained decoding)
    category_thresholds: dict | None = None  # {code: t}: report only codes whose category score reaches t
    prefix_cache: bool = True  # reuse the decoder cache of the prompt's fixed opening (runtime/prefix.py)
    encoder_cache_bytes: int = DEFAULT_BYTES  # features of media already seen, by content hash; 0: off
    min_new_tokens: int = 0  # EOS masked before this many tokens (benchmarks: fixed answer lengths)
    max_prompt_tokens: int | None = None  # default (and the most allowed): the decoder's context minus the token budget
    image_limits: ImageLimits = ImageLimits()
    audio_limits: AudioLimits = AudioLimits()
    video_limits: VideoLimits = VideoLimits()
    session: SessionOptions = SessionOptions()
    memory: MemoryBudget = MemoryBudget()  # working memory per request beyond the bundle (docs/performance.md "Memory")

    def __post_init__(self):
        def whole(name, lo, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if not is_int(value) or value < lo:
                raise ValueError(f"GuardOptions.{name} must be an int >= {lo}{' or None' if optional else ''}, "
                                 f"not {value!r}")

        def probability(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"GuardOptions.{name} must be a number in [0, 1], not {value!r}")

        whole("max_new_tokens", 1)
        whole("critique_max_new_tokens", 1)
        whole("min_new_tokens", 0)
        whole("max_prompt_tokens", 1, optional=True)
        whole("encoder_cache_bytes", 0)
        if self.mode not in MODES:
            raise ValueError(f"GuardOptions.mode must be one of {', '.join(repr(m) for m in MODES)}, not {self.mode!r}")
        for name in ("constrain_verdict", "prefix_cache"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"GuardOptions.{name} must be a bool, not {getattr(self, name)!r}")
        probability("threshold", self.threshold)
        if self.category_thresholds is not None:
            if not isinstance(self.category_thresholds, dict):
                raise ValueError("GuardOptions.category_thresholds must be a dict {code: threshold} or None, not "
                                 f"{self.category_thresholds!r}")
            for code, value in self.category_thresholds.items():
                if not isinstance(code, str) or self.policy.name_of(code) is None:
                    raise ValueError(f"GuardOptions.category_thresholds: {code!r} is not a code of the policy "
                                     f"(S1..S{len(self.policy.categories)})")
                probability(f"category_thresholds[{code!r}]", value)
        if not isinstance(self.memory, MemoryBudget):
            raise ValueError(f"GuardOptions.memory must be a MemoryBudget, not {self.memory!r}")

    @property
    def answer_budget(self) -> int:
        """The most tokens an answer may take in this mode."""
        return self.critique_max_new_tokens if self.mode == "full" else self.max_new_tokens
