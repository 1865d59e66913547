"""One request as the decoder takes it: what `Guard.judge` decodes (built by the Guard, or by a stream's check)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Request:
    """One request, ready for the decoder (Guard._prepare, or a stream's check): its prompt ids, embeddings and
    positions, the answer's budget and state, the memory plan, and the decoder state holding its first `reused`
    positions (the cached policy prefix, or a stream's cached conversation), or None."""

    ids: list
    prep: object
    embeds: np.ndarray
    positions: np.ndarray
    delta: int
    budget: int
    plan: object
    run_options: object
    state: object  # the decoder state holding the cached prefix, or None
    reused: int  # prompt tokens covered by the cached prefix
    answer: object
    timings: dict
    start: float

    def generate_args(self) -> dict:
        r = self.reused
        return {"embeds": self.embeds[:, r:], "positions": self.positions[:, :, r:], "rope_delta": self.delta,
                "max_new_tokens": self.budget, "answer": self.answer, "prefill_chunk": self.plan.prefill_chunk,
                "run_options": self.run_options, "state": self.state}
