"""A stream's bounds (runtime/stream.py, runtime/checkpoints.py): text that makes no token point or sentence end is
still judged every `span` characters, text of terminators cannot ask for a check per character, a host's memory
account is asked before the cache grows, a deadline stops the stream, and the stream keeps no preprocessed rows."""

from __future__ import annotations

import numpy as np
import pytest

from omniguard_edge.runtime.errors import InputError, MemoryBudgetError
from omniguard_edge.runtime.guard import Guard

PROMPT = "How do I get the thing done?"
P_TOL = 2.5e-5  # as tests/test_stream.py: fp32 logits within 1e-4


@pytest.fixture(scope="module")
def guard(tiny_bundle):
    return Guard.from_bundle(tiny_bundle)


def _feed(stream, text, size):
    out = []
    for i in range(0, len(text), size):
        out += stream.feed(text[i:i + size])
    return out


def test_a_reply_of_one_long_word_is_judged_every_span_characters(guard):
    """A word of 700 letters is one pre-tokenizer piece: its tokens are not final until it ends, so no token point
    is known inside it. Span points (every 256 characters here) judge it while it arrives, at the same positions
    whatever the chunking, each equal to a full moderation of the reply cut there."""
    reply = "Well, here: " + "zq" * 350 + " and that is all"
    runs = []
    for size in (1, 7, 100):
        stream = guard.stream(PROMPT, every=16, span=256, hysteresis=10**6)  # random weights: judge all
        early = []
        for i in range(0, len(reply), size):
            early += [c.position for c in stream.feed(reply[i:i + size]) if i + size < 712]
        stream.close()
        runs.append([c.position for c in stream.checks])
        if size < 100:  # returned while the word was still arriving
            assert len([p for p in early if 12 < p < 712]) >= 2, (size, early)
    assert runs[0] == runs[1] == runs[2]
    assert np.diff([0, *runs[0]]).max() <= 256
    for check in stream.checks:
        full = guard.moderate(PROMPT, reply[:check.position])
        assert check.result.verdict == full.verdict and abs(check.result.p_unsafe - full.p_unsafe) <= P_TOL


def test_line_breaks_cannot_ask_for_a_check_per_character(guard):
    """2,000 line breaks end 2,000 "sentences": only those 32 characters or more after the previous check point
    count (it made 1,999 checks before)."""
    stream = guard.stream(PROMPT, every=None)
    checks = stream.feed("\n" * 2000)
    positions = [c.position for c in checks]
    assert 0 < len(positions) <= 2000 // 32 and min(np.diff([0, *positions])) >= 32


def test_the_memory_account_is_asked_before_the_cache_grows(guard):
    """on_grow gets the bytes the kept cache will hold before it takes them; a refusal stops the stream with an
    error check and no cache."""
    asked = []
    stream = guard.stream(PROMPT, every=8)
    stream.on_grow = asked.append
    _feed(stream, "word " * 40, 5)
    assert asked and stream.cache_bytes == asked[-1]  # the fast decoder's buffers: what was asked is what it holds
    assert asked == sorted(asked)

    def refuse(nbytes):
        raise MemoryBudgetError(f"{nbytes} bytes: over the host's limit")

    stream = guard.stream(PROMPT, every=8)
    stream.on_grow = refuse
    checks = stream.feed("word " * 40)
    assert len(checks) == 1 and checks[0].stop and checks[0].result.verdict == "error"
    assert "over the host's limit" in checks[0].result.error and stream.cache_bytes == 0
    assert stream.close().verdict == "error"


def test_a_deadline_stops_the_stream_at_the_next_check_point(guard):
    import time

    stream = guard.stream(PROMPT, every=8)
    first = stream.feed("word " * 12, deadline=time.monotonic() + 60)
    assert first and all(c.result.verdict != "error" for c in first)
    late = stream.feed("word " * 12, deadline=time.monotonic() - 1)
    assert len(late) == 1 and late[0].stop and late[0].result.verdict == "error"
    assert "deadline" in late[0].result.error and stream.cache_bytes == 0


def test_a_stream_keeps_no_preprocessed_rows(guard, media_dir):
    """After encoding, the pixel rows are zero-byte views (their shapes kept for the memory plan), and the checks
    still equal full moderations."""
    image = media_dir / "colour_517x333.png"
    stream = guard.stream(PROMPT, image=image, every=8)
    rows = stream._prep.features["image"][0]
    assert rows.size > 1000 and all(s == 0 for s in rows.strides) and not rows.flags.writeable
    checks = stream.feed("It is fine, nothing to see here at all. ")
    full = guard.moderate(PROMPT, "It is fine, nothing to see here at all. "[:checks[0].position], image=image)
    assert abs(checks[0].result.p_unsafe - full.p_unsafe) <= P_TOL


def test_a_chunk_can_be_judged_in_slices(guard):
    """feed(limit=k) judges k check points and leaves the rest pending until resume(): the same checks as one feed;
    feeding more text while points are pending is refused (the order of the text would be lost)."""
    text = "word " * 60
    whole = guard.stream(PROMPT, every=4, hysteresis=10**6)
    expected = [(c.position, c.result.p_unsafe) for c in whole.feed(text)]
    sliced = guard.stream(PROMPT, every=4, hysteresis=10**6)
    got = sliced.feed(text, limit=3)
    assert len(got) == 3 and sliced.pending == len(expected) - 3
    with pytest.raises(InputError, match="resume"):
        sliced.feed("more")
    while sliced.pending:
        got += sliced.resume(limit=3)
    assert [(c.position, c.result.p_unsafe) for c in got] == expected
    with pytest.raises(InputError, match="limit must be"):
        sliced.resume(limit=0)
    with pytest.raises(InputError, match="limit must be"):
        sliced.feed("more text", limit=0)
    assert sliced.reply == text and sliced.pending == 0  # refused before the text was taken
