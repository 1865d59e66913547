"""Streaming moderation: judge a reply while it is being generated (`Guard.stream`).

A stream holds the request (prompt or conversation, and media, preprocessed and encoded once) and the reply's
text so far. `feed(text)` appends text and judges the conversation at every check point the text crosses;
`check()` judges it now; `close()` judges the whole reply.

Check points are positions in the reply's text, a function of the text alone (never of how it arrives in
chunks): every `every` reply tokens, at sentence ends (`sentences=True`) and at most `span` characters apart
(runtime/checkpoints.py defines them). Every one a chunk crosses is judged, in the text's order, with the reply cut
there; a token point is judged once the text after it can no longer change it (about a word later).
`close()` makes the text final: the check points the last pieces held are judged, then the whole reply.

Each check is exactly `moderate` of the conversation so far (the guard prompt rendered and tokenized whole, so
every escaping rule holds for a marker split across chunks), computed incrementally: the decoder cache of the
prompt up to shortly before the reply's end is kept; a check rolls it back to the longest token prefix it shares
with the new prompt (the reply's last tokens, and the escaping of a marker still arriving, can change), extends it
with the new tokens, and runs the template's fixed tail (and the media placeholders, which follow the text in the
guard prompt: with media every check re-runs their tokens, their encoder features cached) with the answer on a
fork of the cache, which is then dropped. A check's cost is the reply's new tokens plus the tail, not the reply.

The reply continues the conversation's last agent turn when the conversation ends with one (the caller is
streaming the rest of a reply already begun), else it opens an agent turn after the last user turn.

Fail closed: a check past the prompt limit or the memory budget, or any error, is an `error` result and stops the
stream. A stop is also `hysteresis` consecutive checks that are not `safe` (`unsafe`, or `unknown`: an answer that
did not parse; default 1: the first): `feed` returns the checks up
to the stopping one at once, judges nothing after it, and the stream takes no more text. A higher hysteresis lets
a single borderline check pass at the price of later stops (more unsafe text reaches the user first).

For a host of many streams: `on_grow(nbytes)`, when set, is called before a check makes the kept cache grow, with
the bytes it will hold (an exception it raises stops the stream with an error check, before any memory is taken);
`feed(text, deadline=)` stops the stream with an error check when a check point is reached after the deadline
(part of the chunk was judged: the rest is not skipped silently). Once the media are encoded the stream keeps
their encoder features, not their preprocessed rows (pixels, mel features).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .arguments import as_text, check_arguments, listed
from .checked import is_int
from .checkpoints import CheckPoints, Since
from .decode import SCORE_MARGIN, FastDecoder, fork, kv_nbytes
from .errors import InputError, OmniGuardError
from .memory import kv_bytes
from .prefix import common_prefix
from .prompt import Conversation, Turn, template_kind
from .request import Request
from .verdict import ModerationResult

log = logging.getLogger(__name__)

TAIL_MARGIN = 2  # tokens before the tail that the cache leaves out (a reply's end can merge with the tail's start)


def _check_limit(limit) -> None:
    if limit is not None and (not is_int(limit) or limit < 1):
        raise InputError(f"limit must be None or an int >= 1 (checks to judge now), not {limit!r}")


def _rows(value) -> int:
    """Positions a cache tensor has room for: an array's, or an OrtValue's (a resident cache)."""
    return int(value.shape[2] if isinstance(value, np.ndarray) else value.shape()[2])


@dataclass(frozen=True)
class StreamCheck:
    """One check of a stream: the reply's first `position` characters judged (`result`); `stop` when this check
    ends the stream (`hysteresis` consecutive checks that are not safe, or an error)."""

    position: int
    result: ModerationResult
    stop: bool


class GuardStream:
    """A reply judged while it arrives (`Guard.stream` makes one; the module's docstring says how)."""

    def __init__(self, guard, text=None, conversation=None, image=None, audio=None, video=None, media=None,
                 sample_rate=None, every: int | None = 64, sentences: bool = True, hysteresis: int = 1,
                 span: int | None = None):
        if not is_int(hysteresis) or hysteresis < 1:
            raise InputError(f"hysteresis must be an int >= 1 (consecutive unsafe checks that stop the stream), "
                             f"not {hysteresis!r}")
        self.guard, self.hysteresis = guard, int(hysteresis)
        self.points = CheckPoints(guard.bundle.tokenizer, every, sentences, span)
        conv, items, rate = check_arguments(text, None, image, audio, video, media, conversation, sample_rate) \
            if (text is not None or conversation is not None or image is not None or audio is not None
                or video is not None or media is not None) else (None, [], None)
        turns = list(conv.turns) if conv is not None else [Turn("user", ""), Turn("agent", "")]
        # a conversation of an even number of messages ends with the agent: the reply continues that turn
        given = len(listed("conversation", conversation, "a list of turns")) \
            if isinstance(conversation, (list, tuple)) else 1
        self._opening = turns[-1].text if given % 2 == 0 else ""
        self._turns = turns[:-1]  # every turn before the reply's (from_messages adds an empty agent turn to odd ones)
        self.reply, self.checks, self.closed, self.stopped = "", [], False, None
        self._done, self._unsafe_run = 0, 0
        self._pending: list[int] = []  # check points crossed and not judged yet (feed's `limit`)
        self._since = Since()  # where the next scan of the reply starts (CheckPoints.scan)
        budget, limit = guard.prompt_limit()
        self._budget, self._limit = budget, limit
        self._max_bytes = guard.size_check.max_text_bytes(limit)
        self._prep = guard.media.prepare(items, rate, limit)
        # the plan of the request with an empty reply, before any encoder runs (as moderate plans before encoding)
        empty = guard.prompt_ids(self.conversation(""), self._prep.items, self._prep.tokens)
        self._feats = guard.media.encode(self._prep, {}, guard.plan(self._prep, len(empty), budget)[1])
        self._prep = self._prep.without_rows()  # the checks need the features, the grids and the sizes only
        self._state, self._ids, self.tail_tokens = None, [], self._tail_length()
        self.on_grow = None  # the host's memory account (the module's docstring)

    # -- the caller's side -----------------------------------------------------------------------------
    def feed(self, text, deadline: float | None = None, limit: int | None = None) -> list[StreamCheck]:
        """Append `text` to the reply; -> the checks of every check point it crossed, in order, up to a stop.
        `deadline` (time.monotonic()): a check point reached after it stops the stream with an error check.
        `limit`: judge at most this many now; the rest stay `pending` until `resume()` (a host that shares its
        threads between streams judges a long chunk in slices)."""
        self._accepting("feed")
        _check_limit(limit)  # before the text is taken
        if self._pending:
            raise InputError(f"feed: {len(self._pending)} check points of the text so far are still to be judged: "
                             "resume() first")
        text = as_text("text", text, optional=False)  # str or UTF-8 bytes; a lone surrogate is refused here
        self.reply += text
        size = len(self.reply.encode("utf-8"))
        if size > self._max_bytes:  # fail closed: a reply past the prompt limit is never judged in part
            return [self.fail(InputError(
                f"the reply is {size:,} bytes, more than the prompt limit of {self._limit} tokens can hold (at most "
                f"{self._max_bytes:,} bytes): the stream stops (a reply is judged whole or not at all)"))]
        try:
            points, self._since = self.points.scan(self.reply, False, self._since)
        except Exception as exc:  # noqa: BLE001 (fail closed: the stream stops with an error, it is never left open)
            return [self.fail(exc)]
        self._pending = points
        return self._run(deadline, limit)

    @property
    def pending(self) -> int:
        """Check points crossed and not judged yet (feed with a `limit`)."""
        return len(self._pending)

    def resume(self, deadline: float | None = None, limit: int | None = None) -> list[StreamCheck]:
        """Judge pending check points (at most `limit`), as feed does."""
        self._accepting("resume")
        return self._run(deadline, limit)

    def check(self) -> StreamCheck:
        """Judge the reply as it stands now (not a check point of the text: the caller's own)."""
        self._accepting("check")
        return self._evaluate(len(self.reply), point=False)

    def close(self) -> ModerationResult:
        """The text is final: judge the check points its last pieces held, then the whole reply; -> its result
        (or the stopping check's, when the stream stopped)."""
        if self.stopped is not None:
            self.closed = True
            return self.stopped.result
        self._accepting("close")
        self._pending += self.points.scan(self.reply, True, self._since)[0]
        self._run()
        if self.stopped is None and (not self.checks or self.checks[-1].position != len(self.reply)):
            self._evaluate(len(self.reply))  # the whole reply, unless its end was a check point
        self.closed = True
        self._state = None  # the cache goes with the stream
        return self.checks[-1].result

    @property
    def cache_bytes(self) -> int:
        """Bytes of the decoder cache the stream holds (0 once it is closed or stopped: the cache is released)."""
        return 0 if self._state is None else sum(kv_nbytes(p) for p in self._state.past)

    def fail(self, exc: Exception) -> StreamCheck:
        """Stop the stream with an error check at the reply's end (a limit of the caller's, e.g. a service's memory
        for all its streams); -> that check."""
        check = StreamCheck(len(self.reply), ModerationResult.failed(exc), True)
        self.checks.append(check)
        self.stopped, self._state, self._pending = check, None, []
        return check

    # -- checks ---------------------------------------------------------------------------------------------
    def _accepting(self, what: str) -> None:
        if self.closed:
            raise InputError(f"{what}: the stream is closed")
        if self.stopped is not None:
            raise InputError(f"{what}: the stream stopped at character {self.stopped.position} "
                             f"({self.stopped.result.verdict}); it takes no more text")

    def _run(self, deadline: float | None = None, limit: int | None = None) -> list[StreamCheck]:
        """Judge the pending points in order: up to `limit`, a stop, or the deadline."""
        _check_limit(limit)
        out = []
        while self._pending and (limit is None or len(out) < limit):
            p = self._pending.pop(0)
            if p <= self._done:
                continue
            if deadline is not None and time.monotonic() > deadline:
                out.append(self.fail(TimeoutError(
                    f"the check at character {p} was reached after the chunk's deadline: the stream stops (its "
                    "reply is not judged further)")))
                break
            out.append(self._evaluate(p))
            if out[-1].stop:
                break
        return out

    def _evaluate(self, position: int, point: bool = True) -> StreamCheck:
        timings, start = {}, time.perf_counter()
        try:
            result = self._judge(self.reply[:position], timings, start)
        except Exception as exc:  # fail closed: an error stops the stream
            if not isinstance(exc, OmniGuardError):
                log.exception("stream check failed")
            result = ModerationResult.failed(exc, timings)
        # `unknown` (an answer that did not parse: free decoding) is never safe: it counts as unsafe
        self._unsafe_run = self._unsafe_run + 1 if result.verdict != "safe" else 0
        stop = result.verdict == "error" or self._unsafe_run >= self.hysteresis
        check = StreamCheck(position, result, stop)
        self.checks.append(check)
        if point:  # a caller's check() is not a check point: the points before it are still judged
            self._done = max(self._done, position)
        if stop:
            self.stopped, self._state, self._pending = check, None, []
        return check

    def conversation(self, reply: str) -> Conversation:
        """The conversation judged at a check: the turns before the reply, then the agent's turn with it."""
        return Conversation(tuple(self._turns) + (Turn("agent", self._opening + reply),))

    def _tail_length(self) -> int:
        """Prompt tokens after the reply (the template's fixed tail, and the media placeholders after it): two
        probe replies differ from one token on."""
        g, p = self.guard, self._prep
        a, b = (g.prompt_ids(self.conversation(r), p.items, p.tokens) for r in ("a", "b"))
        return len(a) - common_prefix(a, b) - 1

    def _judge(self, reply: str, timings: dict, start: float) -> ModerationResult:
        g, prep = self.guard, self._prep
        conv = self.conversation(reply)
        t = time.perf_counter()
        ids = g.prompt_ids(conv, prep.items, prep.tokens)
        timings["prompt"] = time.perf_counter() - t
        if len(ids) > self._limit:
            raise InputError(f"the conversation with the reply so far takes {len(ids)} prompt tokens, over the limit "
                             f"of {self._limit}: the stream stops (a reply is judged whole or not at all)")
        plan, run_options = g.plan(prep, len(ids), self._budget)
        t = time.perf_counter()
        embeds = g.media.embed(ids, self._feats)
        positions, delta = prep.positions(ids, g.rope)
        timings["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        keep = max(0, len(ids) - self.tail_tokens - TAIL_MARGIN)  # the part of the prompt the next check likely shares
        state = self._cached(ids, keep, template_kind(conv, prep.items), positions, delta, embeds, run_options)
        timings["prefix"] = time.perf_counter() - t
        timings["generate_start"] = time.perf_counter() - start
        req = Request(ids, prep, embeds, positions, delta, self._budget, plan, run_options, fork(state), keep,
                      g.answer(), timings, start)
        return g.judge(req)

    def _cached(self, ids, keep, kind, positions, delta, embeds, run_options):
        """The decoder state holding the prompt's first `keep` positions: the cached one rolled back to the tokens
        it shares with `ids` and extended; on the first check, the policy prefix's. Its buffers (the fast decoder's)
        grow geometrically, with room for the tail and the answer, so that neither a check nor its fork copies the
        cache."""
        g = self.guard
        need = len(ids) + self._budget + SCORE_MARGIN
        have = 0 if self._state is None else _rows(self._state.past[0])
        capacity = have if have >= need else 2 * need  # the fast decoder's buffers grow geometrically
        if self.on_grow is not None:  # the rows the kept cache will hold: the fast decoder's buffers, or `keep`
            rows = capacity if isinstance(g.decoder, FastDecoder) else keep
            if rows > have:
                self.on_grow(kv_bytes(g.geometry, rows))
        fresh = self._state is None
        if fresh:
            state, reused = g.prefixes.start(ids, kind, positions, delta, run_options, capacity) \
                if g.options.prefix_cache else (None, 0)
            self._state = state if state is not None else g.decoder.start(delta, run_options, capacity=capacity)
            self._ids = list(ids[:reused])
        state = self._state
        shared = min(common_prefix(self._ids, ids), keep)
        g.decoder.truncate(state, shared)
        state.rope_delta, state.run_options = delta, run_options
        if not fresh and capacity > have:  # the fast decoder's buffers (the standard one's cache grows by itself)
            g.decoder.reserve(state, capacity)
        if keep > shared:
            g.decoder.extend(state, embeds[:, shared:keep], positions[:, :, shared:keep], g.decoder.prefill_chunk)
        self._ids = list(ids[:keep])
        return state
