"""Greedy decoding with a KV cache over the decoder graph (after gpt-fast: prefill, one step, loop).

Chunked prefill: a prompt longer than `prefill_chunk` tokens is fed in chunks of that many tokens through the
past-KV path (each chunk sees the cache of the chunks before it), so the attention scores of one graph run are
chunk x length instead of length x length. The decoder graph's causal mask is built from the past length, so
the result equals a one-shot prefill (tests/test_memory.py checks logits and cache within 1e-4); a prompt that
fits in one chunk is prefilled exactly as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class DecodeState:
    """What one generation carries between steps."""

    past: list[np.ndarray]  # past_key_0, past_value_0, ... [batch, kv_heads, length, head_dim]
    mask: np.ndarray  # [batch, length] int64
    length: int  # tokens in the cache
    rope_delta: int  # decode position = length + rope_delta (TMRoPE)
    prefill_runs: int = 1  # graph runs the prefill took (chunked prefill: more than one)
    run_options: object = None  # onnxruntime RunOptions for this generation's runs (e.g. arena shrinkage)


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    first_logits: np.ndarray | None = None  # logits that chose the first generated token [vocab]
    stop_reason: str = "max_new_tokens"  # eos | max_new_tokens | stop_rule
    timings: dict = field(default_factory=dict)  # prefill, first_token, decode seconds
    prefill_chunks: int = 1  # graph runs the prefill took (1: one shot)
    token_times: list[float] = field(default_factory=list)  # seconds from the start of prefill to each token


def _check_chunk(chunk) -> int | None:
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"prefill_chunk must be None (one shot) or an int >= 1, not {chunk!r}")
    return int(chunk)


class Decoder:
    def __init__(self, session, decoder: dict, prefill_chunk: int | None = None):
        """`prefill_chunk`: default chunk size of the prefill in tokens (None: the whole prompt in one run)."""
        self.session = session
        self.prefill_chunk = _check_chunk(prefill_chunk)
        self.layers, self.kv_heads, self.head_dim = decoder["num_layers"], decoder["num_kv_heads"], decoder["head_dim"]
        self.names = [f"past_{part}_{i}" for i in range(self.layers) for part in ("key", "value")]

    def _run(self, embeds: np.ndarray, positions: np.ndarray, state: DecodeState):
        feeds = {"inputs_embeds": embeds.astype(np.float32, copy=False), "attention_mask": state.mask,
                 "position_ids": positions, **dict(zip(self.names, state.past))}
        logits, *present = self.session.run(None, feeds, state.run_options)
        return logits, present

    def prefill(self, embeds: np.ndarray, positions: np.ndarray, rope_delta: int, chunk: int | None = None,
                run_options=None):
        """embeds [1, S, H], positions [3, 1, S] -> (logits [vocab], state). `chunk` (default: the
        decoder's `prefill_chunk`) splits the prompt into graph runs of at most that many tokens;
        `run_options` apply to these runs and to the `step`s that continue from the returned state."""
        chunk = _check_chunk(chunk) or self.prefill_chunk
        total = embeds.shape[1]
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        state = DecodeState([empty] * (2 * self.layers), np.ones((1, total), np.int64), 0, rope_delta,
                            run_options=run_options)
        if chunk is None or total <= chunk:
            logits, present = self._run(embeds, positions, state)
            state.past, state.length = present, total
            return logits[0], state
        state.prefill_runs = 0
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            state.mask = np.ones((1, end), np.int64)
            logits, present = self._run(embeds[:, start:end], positions[:, :, start:end], state)
            state.past, state.length = present, end  # the previous cache is released here
            state.prefill_runs += 1
        return logits[0], state

    def step(self, embed: np.ndarray, state: DecodeState):
        """embed [1, 1, H] of the last chosen token -> (logits [vocab], state advanced by one)."""
        pos = np.full((3, 1, 1), state.length + state.rope_delta, np.int64)
        state.mask = np.ones((1, state.length + 1), np.int64)
        logits, present = self._run(embed, pos, state)
        state.past, state.length = present, state.length + 1
        return logits[0], state

    def generate(self, embeds, positions, rope_delta: int, embed_token: Callable[[int], np.ndarray],
                 max_new_tokens: int, eos_ids: set[int], stop: Callable[[list[int]], bool] | None = None,
                 choose: Callable[[list[int], np.ndarray], int] | None = None,
                 min_new_tokens: int = 0, prefill_chunk: int | None = None, run_options=None) -> Generation:
        """Greedy loop: `choose(tokens so far, logits)` may restrict a position (constrained verdict),
        `stop(tokens)` may end early (verdict-first). Before `min_new_tokens` tokens the EOS ids are
        masked, as transformers' MinNewTokensLogitsProcessor does (fixed budgets for benchmarks).
        `prefill_chunk` overrides the decoder's default chunk size for this prompt (see `prefill`);
        `run_options` (onnxruntime RunOptions, e.g. arena shrinkage for a large request) apply to its runs."""
        out, t0 = Generation(), time.perf_counter()
        eos_list = sorted(eos_ids)
        logits, state = self.prefill(embeds, positions, rope_delta, prefill_chunk, run_options)
        out.timings["prefill"] = time.perf_counter() - t0
        out.prefill_chunks = state.prefill_runs
        out.first_logits = logits
        for i in range(max_new_tokens):
            if i < min_new_tokens and eos_list:
                logits = logits.copy()
                logits[eos_list] = -np.inf
            token = choose(out.tokens, logits) if choose else int(np.argmax(logits))
            out.tokens.append(token)
            out.token_times.append(time.perf_counter() - t0)
            if i == 0:
                out.timings["first_token"] = time.perf_counter() - t0
            if token in eos_ids:
                out.stop_reason = "eos"
                break
            if stop is not None and stop(out.tokens):
                out.stop_reason = "stop_rule"
                break
            if i + 1 < max_new_tokens:
                logits, state = self.step(embed_token(token)[None, None, :], state)
        out.timings["decode"] = time.perf_counter() - t0
        return out
