"""Greedy decoding with a KV cache over the decoder graph (after gpt-fast: prefill, one step, loop).

The graph takes a past of any length and any number of new tokens ("extend"): a prefill is an extension of an
empty past, a decode step an extension by one token, a cached policy prefix (runtime/prefix.py) the past of a
request's prefill, and a forced literal of the answer grammar (runtime/answer.py) one extension of several tokens.
The graph's causal mask is built from the past length, so splitting a sequence into extensions gives the logits
and cache of one run (tests/test_memory.py, tests/test_prefix.py: within 1e-4).

Chunked prefill: a prompt longer than `prefill_chunk` tokens is fed in chunks of that many tokens, so the
attention scores of one graph run are chunk x length instead of length x length.

The graph returns new present arrays and never writes to its inputs, so a state is forked by copying its list of
arrays (`fork`): the category scores continue a hypothetical answer from the verdict position that way.

Resident KV (`Decoder(resident=True)`, the default under a GPU provider): the present tensors stay where the
session computed them (onnxruntime OrtValues, `GraphSession.run_device`) and are bound as the next run's past, so
the cache, and the cached policy prefix, never cross to the host; only the logits do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .checked import is_int
from .errors import require_finite
from .rotary import inv_freq, rope_tables


@dataclass
class DecodeState:
    """What one generation carries between steps."""

    past: list[np.ndarray]  # past_key_0, past_value_0, ... [batch, kv_heads, length, head_dim]
    mask: np.ndarray  # [batch, length] int64
    length: int  # tokens in the cache
    rope_delta: int  # position of the token at cache index i = i + rope_delta (TMRoPE), past the prompt's media
    prefill_runs: int = 0  # graph runs the prefill took (chunked prefill: more than one)
    run_options: object = None  # onnxruntime RunOptions for this generation's runs (e.g. arena shrinkage)
    values: list | None = None  # FastDecoder: onnxruntime OrtValues over `past` (the buffers it updates in place)
    cos: np.ndarray | None = None  # FastDecoder: rotary tables by cache row [capacity, head_dim / 2]
    sin: np.ndarray | None = None


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    first_logits: np.ndarray | None = None  # logits that chose the first generated token [vocab]
    stop_reason: str = "max_new_tokens"  # eos | max_new_tokens | stop_rule
    timings: dict = field(default_factory=dict)  # prefill, first_token, verdict, decode seconds
    prefill_chunks: int = 1  # graph runs the prefill took (1: one shot)
    token_times: list[float] = field(default_factory=list)  # seconds from the start of prefill to each token
    verdict_state: DecodeState | None = None  # a fork of the state whose logits chose the verdict token


def _check_chunk(chunk) -> int | None:
    if chunk is None:
        return None
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"prefill_chunk must be None (one shot) or an int >= 1, not {chunk!r}")
    return int(chunk)


def fork(state: DecodeState) -> DecodeState:
    """An independent copy of `state` (the arrays are shared: the graph never writes to its inputs)."""
    return replace(state, past=list(state.past))


def kv_nbytes(value) -> int:
    """Bytes of one cache tensor: an array, or an OrtValue (on any device)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    itemsize = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2}[value.data_type()]
    return int(np.prod(value.shape(), dtype=np.int64)) * itemsize


class Decoder:
    def __init__(self, session, decoder: dict, prefill_chunk: int | None = None, resident: bool = False):
        """`prefill_chunk`: default chunk size of the prefill in tokens (None: the whole prompt in one run).
        `resident`: keep the KV cache on the session's device between runs (module docstring)."""
        self.session = session
        self.resident = bool(resident)
        self.prefill_chunk = _check_chunk(prefill_chunk)
        self.layers, self.kv_heads, self.head_dim = decoder["num_layers"], decoder["num_kv_heads"], decoder["head_dim"]
        self.names = [f"past_{part}_{i}" for i in range(self.layers) for part in ("key", "value")]
        self.present = [f"present_{part}_{i}" for i in range(self.layers) for part in ("key", "value")]

    def _run(self, embeds: np.ndarray, positions: np.ndarray, state: DecodeState):
        feeds = {"inputs_embeds": embeds.astype(np.float32, copy=False), "attention_mask": state.mask,
                 "position_ids": positions, **dict(zip(self.names, state.past))}
        if self.resident:
            host, kept = self.session.run_device(feeds, ["logits"], self.present, state.run_options)
            return host["logits"], [kept[n] for n in self.present]
        out = self.session.run(feeds, ["logits", *self.present], state.run_options)
        return out["logits"], [out[n] for n in self.present]

    def start(self, rope_delta: int, run_options=None, past: list[np.ndarray] | None = None,
              length: int = 0, capacity: int | None = None) -> DecodeState:
        """A state with an empty cache, or with `past` (e.g. a cached prompt prefix of `length` tokens).
        `capacity`: the rows the request will need (FastDecoder sizes its buffers by it; ignored here)."""
        if past is None:
            empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
            past, length = [empty] * (2 * self.layers), 0
        return DecodeState(list(past), np.ones((1, length), np.int64), length, rope_delta, run_options=run_options)

    def cache(self, state: DecodeState) -> list[np.ndarray]:
        """The filled cache, [1, kv_heads, length, head_dim] per layer and part (shared: never written to; OrtValues
        on the device when resident)."""
        return list(state.past)

    @staticmethod
    def first(cache: list, m: int) -> list:
        """The first `m` positions of a cache from `cache()`. A resident cache is used as it is when whole; a part of
        it comes to the host once (onnxruntime cannot slice a device tensor), and goes back as the next run's past."""
        out = []
        for p in cache:
            if isinstance(p, np.ndarray):
                out.append(p[:, :, :m])
            else:
                out.append(p if p.shape()[2] == m else p.numpy()[:, :, :m])
        return out

    def truncate(self, state: DecodeState, length: int) -> None:
        """Keep only the first `length` positions of the state's cache (a stream rolls back to the tokens its new
        prompt shares with the cached one, then extends)."""
        state.past, state.length = self.first(state.past, length), length

    def reserve(self, state: DecodeState, capacity: int) -> None:
        """Room for `capacity` positions (the standard graph's cache grows with each run: nothing to do)."""

    def logits(self, out: np.ndarray, rows: list[int] | None = None) -> np.ndarray:
        """What `extend` returned as logits [vocab]. `rows`: only these tokens can be chosen (a decoder that can
        compute just their logits fills the other entries with -inf); the standard graph has them all already."""
        return out

    @staticmethod
    def _text_positions(state: DecodeState, count: int) -> np.ndarray:
        """[3, 1, count] positions of `count` text tokens after the state's cache: length + rope_delta onwards."""
        begin = state.length + state.rope_delta
        return np.broadcast_to(np.arange(begin, begin + count, dtype=np.int64), (3, 1, count))

    def extend(self, state: DecodeState, embeds: np.ndarray, positions: np.ndarray | None = None,
               chunk: int | None = None) -> np.ndarray:
        """Feed embeds [1, S, H] after the state's cache (positions [3, 1, S]; default: text positions
        length + rope_delta onwards), in graph runs of at most `chunk` tokens; -> logits of the last
        position [vocab]; the state is advanced."""
        total = embeds.shape[1]
        positions = self._text_positions(state, total) if positions is None else positions
        chunk = chunk or total
        for begin in range(0, total, chunk):
            end = min(begin + chunk, total)
            state.mask = np.ones((1, state.length + end - begin), np.int64)
            logits, present = self._run(embeds[:, begin:end], positions[:, :, begin:end], state)
            state.past, state.length = present, state.length + end - begin  # the previous cache is released here
        return logits[0]

    def prefill(self, embeds: np.ndarray, positions: np.ndarray, rope_delta: int, chunk: int | None = None,
                run_options=None, state: DecodeState | None = None, rows: list[int] | None = None):
        """embeds [1, S, H], positions [3, 1, S] -> (logits [vocab], state). `chunk` (default: the
        decoder's `prefill_chunk`) splits the prompt into graph runs of at most that many tokens;
        `run_options` apply to these runs and to the `step`s that continue from the returned state;
        `state`: continue from it (a cached prefix) instead of an empty cache."""
        chunk = _check_chunk(chunk) or self.prefill_chunk
        state = state if state is not None else self.start(rope_delta, run_options)
        total = embeds.shape[1]
        out = self.extend(state, embeds, positions, chunk)
        state.prefill_runs = -(-total // chunk) if chunk else 1
        return self.logits(out, rows), state

    def generate(self, embeds, positions, rope_delta: int, embed_tokens: Callable[[list[int]], np.ndarray],
                 max_new_tokens: int, eos_ids: set[int], answer=None, min_new_tokens: int = 0,
                 prefill_chunk: int | None = None, run_options=None, state: DecodeState | None = None) -> Generation:
        """Greedy loop. `answer` (runtime/answer.Answer, or anything with `choose(logits) -> [tokens]` and
        `finished`) chooses the tokens of each position (several when it forces a literal: they are fed in
        one run) and says when to stop (verdict-first); without it, argmax to EOS or the budget. Every logit
        must be finite (NumericalError otherwise), before the EOS ids are masked: before `min_new_tokens`
        tokens the EOS ids are masked, as transformers' MinNewTokensLogitsProcessor does (fixed budgets for
        benchmarks). `embed_tokens(ids)` -> [n, H]. `state`: a cached prefix to continue from."""
        run = _Run(answer, max_new_tokens, min_new_tokens, eos_ids)
        rows = run.rows()
        logits, state = self.prefill(embeds, positions, rope_delta, prefill_chunk, run_options, state, rows)
        run.prefilled(logits, state)
        while (feed := run.take(logits, lambda: fork(state), rows)) is not None:
            rows = run.rows()
            logits = self.logits(self.extend(state, embed_tokens(feed)[None]), rows)
        return run.finish()


class _Run:
    """One generation's bookkeeping, shared by the one-request loop and the batched one: each `take(logits)`
    checks the logits (finite, before EOS masking), masks EOS below `min_new_tokens`, lets the answer choose,
    records tokens and times, and returns the tokens to feed next, or None when the generation is over."""

    def __init__(self, answer, max_new_tokens: int, min_new_tokens: int, eos_ids: set[int]):
        self.answer, self.budget, self.minimum = answer, max_new_tokens, min_new_tokens
        self.eos, self.eos_list = eos_ids, sorted(eos_ids)
        self.out, self.t0 = Generation(), time.perf_counter()

    def prefilled(self, logits: np.ndarray, state: DecodeState) -> None:
        self.out.timings["prefill"] = time.perf_counter() - self.t0
        self.out.prefill_chunks = state.prefill_runs
        self.out.first_logits = logits

    def rows(self) -> list[int] | None:
        """The tokens the next choice can pick (the answer grammar's), or None for all of them."""
        if self.answer is None or len(self.out.tokens) < self.minimum or not hasattr(self.answer, "next_rows"):
            return None
        return self.answer.next_rows()

    def take(self, logits: np.ndarray, fork_state: Callable[[], DecodeState], rows: list[int] | None = None
             ) -> list[int] | None:
        """`rows`: only these tokens can be chosen; a decoder may have computed just their logits (-inf elsewhere).
        They must be finite, and no logit anywhere may be NaN or +inf (a decoder that computed all of them is
        checked whole: a broken model is an error, whatever the grammar would have read)."""
        out, answer = self.out, self.answer
        if len(out.tokens) >= self.budget:
            return None
        what = f"the decoder's logits for generated token {len(out.tokens) + 1}"
        if rows is None:
            require_finite(logits, what)
        else:
            require_finite(logits[rows], what)
            if np.isnan(logits).any() or np.isposinf(logits).any():
                require_finite(np.where(np.isneginf(logits), 0.0, logits), what)
        if len(out.tokens) < self.minimum and self.eos_list:
            logits = logits.copy()
            logits[self.eos_list] = -np.inf
        chosen = answer.choose(logits) if answer is not None else [int(np.argmax(logits))]
        if answer is not None and getattr(answer, "verdict_index", None) == len(out.tokens) \
                and out.verdict_state is None:
            out.verdict_state = fork_state()
            out.timings["verdict"] = time.perf_counter() - self.t0
        chosen = chosen[: self.budget - len(out.tokens)]
        out.tokens += chosen
        now = time.perf_counter() - self.t0
        out.token_times += [now] * len(chosen)
        out.timings.setdefault("first_token", now)
        if any(t in self.eos for t in chosen):
            out.stop_reason = "eos"
            del out.tokens[next(i for i, t in enumerate(out.tokens) if t in self.eos) + 1:]
            return None
        if answer is not None and answer.finished:
            out.stop_reason = "stop_rule"
            return None
        return chosen if len(out.tokens) < self.budget else None

    def finish(self) -> Generation:
        self.out.timings["decode"] = time.perf_counter() - self.t0
        self.out.token_times = self.out.token_times[: len(self.out.tokens)]
        return self.out


SCORE_MARGIN = 32  # cache rows kept past the answer's budget: the category scores continue from the verdict


class FastDecoder(Decoder):
    """The fast decoder graph (export/graphs/decoder_gqa.py): the KV cache lives in per-request buffers that
    onnxruntime updates in place (past and present bound to the same memory), sized by the request (prompt +
    answer budget + SCORE_MARGIN rows), not by the model's context, because onnxruntime's CPU attention sizes its
    score buffer by the buffer length. Rotary tables are computed here from the TMRoPE position ids and fed by
    cache row.

    `fork` shares the buffers: a fork at length n stays valid as long as nothing runs from a state shorter than
    n afterwards (rows >= n of the shared buffer are overwritten then). The Guard forks at the verdict position
    after the main generation ends, and the category scores walk their tree depth first, which keeps that."""

    @property
    def head(self):
        """The output layer's session (opened now if it was given as a callable)."""
        if callable(self._head) and not hasattr(self._head, "run"):
            self._head = self._head()
        return self._head

    def __init__(self, session, decoder: dict, prefill_chunk: int | None = None, head=None, head_rows=None):
        """`head`: the output layer's session (decoder_gqa_head: hidden -> logits), or a callable that returns it
        (opened when first needed); `head_rows`: its weight [vocab, hidden] (the bundle's memory-mapped lm_head.npy),
        for the logits of a few tokens."""
        super().__init__(session, decoder, prefill_chunk)
        if head is None or head_rows is None:
            raise ValueError("FastDecoder needs the output layer: head= (its session) and head_rows= (its weight)")
        self._head, self.head_rows = head, head_rows
        rope = decoder.get("rope_parameters") or {}
        freqs = decoder.get("rope_inv_freq")
        self.freqs = np.asarray(freqs, np.float32) if freqs is not None else \
            inv_freq(self.head_dim, float(rope.get("rope_theta", 10000.0)))
        self.sections = list(rope["mrope_section"])

    def _alloc(self, capacity: int):
        """KV buffers of `capacity` rows (and the session's handles on them), and empty rotary tables."""
        arrays = [np.zeros((1, self.kv_heads, capacity, self.head_dim), np.float32) for _ in range(2 * self.layers)]
        tables = [np.zeros((capacity, self.freqs.size), np.float32) for _ in range(2)]
        return arrays, [self.session.buffer(a) for a in arrays], tables

    def start(self, rope_delta: int, run_options=None, past: list[np.ndarray] | None = None, length: int = 0,
              capacity: int | None = None) -> DecodeState:
        capacity = max(capacity or 0, length, 1)
        arrays, values, (cos, sin) = self._alloc(capacity)
        if past is not None:
            for dst, src in zip(arrays, past):
                dst[:, :, :length] = src[:, :, :length]
        else:
            length = 0
        return DecodeState(arrays, np.ones((1, 0), np.int64), length, rope_delta, run_options=run_options,
                           values=values, cos=cos, sin=sin)

    def reserve(self, state: DecodeState, capacity: int) -> None:
        """Grow the state's buffers to `capacity` rows (the filled rows are copied); no-op when they are large
        enough."""
        have = state.past[0].shape[2]
        if capacity <= have:
            return
        arrays, values, (cos, sin) = self._alloc(capacity)
        for dst, src in zip(arrays, state.past):
            dst[:, :, :state.length] = src[:, :, :state.length]
        cos[:have], sin[:have] = state.cos, state.sin
        state.past, state.values, state.cos, state.sin = arrays, values, cos, sin

    def truncate(self, state: DecodeState, length: int) -> None:
        """The rows from `length` on are overwritten by the next extension: only the length changes."""
        state.length = length

    def cache(self, state: DecodeState) -> list[np.ndarray]:
        """Copies of the filled cache rows, [1, kv_heads, length, head_dim] per layer and part."""
        return [a[:, :, :state.length].copy() for a in state.past]

    def logits(self, out: np.ndarray, rows: list[int] | None = None) -> np.ndarray:
        """The logits from the last position's hidden state `out` [hidden]: the output layer's graph for every
        token, or, with `rows`, only those tokens' dot products from their rows of the weight (a few KB read
        instead of the whole layer, about a quarter of a decode step's bytes on `small`); -inf elsewhere."""
        if rows is None:
            return self.head.run({"hidden": np.ascontiguousarray(out[None], dtype=np.float32)}, ["logits"])["logits"][0]
        idx = np.asarray(rows, dtype=np.int64)
        full = np.full(self.head_rows.shape[0], -np.inf, np.float32)
        full[idx] = np.einsum("kh,h->k", np.asarray(self.head_rows[idx], np.float32), out.astype(np.float32))
        return full

    def extend(self, state: DecodeState, embeds: np.ndarray, positions: np.ndarray | None = None,
               chunk: int | None = None) -> np.ndarray:
        total = embeds.shape[1]
        positions = self._text_positions(state, total) if positions is None else positions
        self.reserve(state, state.length + total)
        chunk = chunk or total
        for lo in range(0, total, chunk):
            hi = min(lo + chunk, total)
            rows = slice(state.length, state.length + hi - lo)
            state.cos[rows], state.sin[rows] = rope_tables(positions[:, 0, lo:hi], self.freqs, self.sections)
            inputs = {"inputs_embeds": np.ascontiguousarray(embeds[:, lo:hi], dtype=np.float32),
                      "seqlens_k": np.array([state.length + hi - lo - 1], np.int32),
                      "total_sequence_length": np.array(state.length + hi - lo, np.int32),
                      "cos_cache": state.cos, "sin_cache": state.sin,
                      "position_ids": np.arange(rows.start, rows.stop, dtype=np.int64)[None],
                      **dict(zip(self.names, state.values))}
            outputs = {"hidden": None, **dict(zip(self.present, state.values))}  # the KV written in place
            hidden = self.session.run_bound(inputs, outputs, state.run_options)["hidden"]
            state.length += hi - lo
        return hidden[0]  # the last position's hidden state: `logits` turns it into logits

    def generate(self, embeds, positions, rope_delta, embed_tokens, max_new_tokens, eos_ids, answer=None,
                 min_new_tokens=0, prefill_chunk=None, run_options=None, state=None) -> Generation:
        if state is None:
            state = self.start(rope_delta, run_options)
        self.reserve(state, state.length + embeds.shape[1] + max_new_tokens + SCORE_MARGIN)
        return super().generate(embeds, positions, rope_delta, embed_tokens, max_new_tokens, eos_ids, answer,
                                min_new_tokens, prefill_chunk, run_options, state)

    def generate_batch(self, requests: list[dict], embed_tokens: Callable[[list[int]], np.ndarray], eos_ids: set[int],
                       min_new_tokens: int = 0) -> list[Generation]:
        """Several generations at once. Each request (a dict of `generate`'s arguments: embeds, positions,
        rope_delta, max_new_tokens, answer, prefill_chunk, run_options, state) is prefilled on its own (the CPU
        attention kernel takes several new tokens after a past only with batch 1, and a prefill is compute-bound
        anyway); then every decode step runs all unfinished rows in one graph run over one [rows, kv_heads,
        capacity, head_dim] buffer per layer and part, each row at its own length and position (position ids
        into a plain rotary table: decode tokens are text). A forced literal of several tokens is fed one token
        per step. Each row's result equals its own `generate` (tests/test_batch.py)."""
        rows = []
        for r in requests:
            run = _Run(r.get("answer"), r["max_new_tokens"], min_new_tokens, eos_ids)
            state = r.get("state") or self.start(r["rope_delta"], r.get("run_options"))
            self.reserve(state, state.length + r["embeds"].shape[1] + r["max_new_tokens"] + SCORE_MARGIN)
            need = run.rows()
            logits, state = self.prefill(r["embeds"], r["positions"], r["rope_delta"], r.get("prefill_chunk"),
                                         r.get("run_options"), state, need)
            run.prefilled(logits, state)
            rows.append({"run": run, "state": state, "logits": logits, "need": need, "queue": [], "done": False})
        for row in rows:  # each row's first choice reads its own prefill's logits
            feed = row["run"].take(row["logits"], lambda st=row["state"]: fork(st), row["need"])
            row["queue"], row["done"] = list(feed or []), feed is None
        if all(r["done"] for r in rows):
            return [r["run"].finish() for r in rows]
        capacity = max(r["state"].past[0].shape[2] for r in rows)
        arrays, values = self._alloc_batch(len(rows), capacity)
        for b, row in enumerate(rows):
            st = row["state"]
            for dst, src in zip(arrays, st.past):
                dst[b, :, :st.length] = src[0, :, :st.length]
            row["length"], row["delta"] = st.length, st.rope_delta
            row["state"] = None  # its own buffers are no longer needed: the batch buffers hold its cache
        # rows of the plain table: every position a row can reach, and no fewer than the longest cache (the kernel
        # wants cos_cache rows >= total_sequence_length)
        top = max(r["length"] + abs(r["delta"]) + r["run"].budget + 2 for r in rows)
        table = np.broadcast_to(np.arange(max(top, 1), dtype=np.int64), (3, max(top, 1)))
        cos, sin = rope_tables(table, self.freqs, self.sections)
        width = None
        while not all(r["done"] for r in rows):
            feeds, lengths, pos = [], [], []
            for row in rows:
                token = row["queue"].pop(0) if not row["done"] else None
                row["fed"] = token
                emb = embed_tokens([token if token is not None else 0])[0]
                width = emb.shape[0]
                feeds.append(emb)
                lengths.append(row["length"])
                pos.append(row["length"] + row["delta"])
            inputs = {"inputs_embeds": np.stack(feeds).astype(np.float32).reshape(len(rows), 1, width),
                      "seqlens_k": np.asarray(lengths, np.int32),
                      "total_sequence_length": np.array(max(lengths) + 1, np.int32),
                      "cos_cache": cos, "sin_cache": sin, "position_ids": np.asarray(pos, np.int64)[:, None],
                      **dict(zip(self.names, values))}
            hidden = self.session.run_bound(inputs, {"hidden": None, **dict(zip(self.present, values))})["hidden"]
            for b, row in enumerate(rows):
                if row["fed"] is None:
                    continue  # a finished row: its slot at `length` was rewritten, its cache below is untouched
                row["length"] += 1
                if row["queue"]:
                    continue  # inside a forced literal: these logits choose nothing (none are computed)
                need = row["run"].rows()
                feed = row["run"].take(self.logits(hidden[b], need),
                                       lambda b=b, n=row["length"]: self._row_state(arrays, b, n, row["delta"]), need)
                row["queue"], row["done"] = list(feed or []), feed is None
        return [r["run"].finish() for r in rows]

    def _alloc_batch(self, batch: int, capacity: int):
        arrays = [np.zeros((batch, self.kv_heads, capacity, self.head_dim), np.float32) for _ in range(2 * self.layers)]
        return arrays, [self.session.buffer(a) for a in arrays]

    def _row_state(self, arrays, row: int, length: int, rope_delta: int) -> DecodeState:
        """A one-request state holding a copy of batch row `row`'s first `length` cache rows (its verdict fork)."""
        return self.start(rope_delta, past=[a[row:row + 1] for a in arrays], length=length,
                          capacity=length + SCORE_MARGIN)
