"""Hostile use of the API and the CLI (issue 8): every misuse is an `error` verdict, never `safe` or `unknown`.

For each case, in both decoding modes (the default answer grammar and free decoding, `constrain_verdict=False`): no exception
escapes `moderate`, `verdict == "error"`, the error names the parameter, `p_unsafe` is None and `to_json()` is
strict JSON. Non-finite numbers are fed through fake sessions (scripted NaN logits, NaN encoder features).
CLI cases run the real CLI in a subprocess: exit status, one line on stderr, no traceback.
All media are generated in temporary folders; nothing here needs torch.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from omniguard_edge.runtime.bundle import SessionOptions, open_bundle
from omniguard_edge.runtime.errors import InputError
from omniguard_edge.runtime.arguments import check_arguments
from omniguard_edge.runtime.guard import Guard, GuardOptions
from omniguard_edge.runtime.verdict import ModerationResult

MODES = {"constrained": GuardOptions(), "free": GuardOptions(constrain_verdict=False)}


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    # the standard-ops decoder: scripted sessions below stand in for it (its outputs are plain return values)
    return open_bundle(tiny_bundle, SessionOptions(decoder_graph="decoder"))


@pytest.fixture(scope="module")
def guards(bundle):
    return {mode: Guard(bundle, options) for mode, options in MODES.items()}


class Files:
    """Small media and file-system traps, generated per module."""

    def __init__(self, root, media_dir):
        self.png = str(media_dir / "colour_517x333.png")
        self.wav = str(media_dir / "short_1.5s.wav")
        self.dir = str(root)
        self.missing = str(root / "missing.png")
        self.fifo = str(root / "fifo")
        os.mkfifo(self.fifo)
        self.frames = np.random.default_rng(0).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
        self.wave = (0.1 * np.sin(np.arange(16000) / 10)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory, media_dir):
    return Files(tmp_path_factory.mktemp("hostile"), media_dir)


def _gen():
    yield "hello"


# (id, keyword arguments of moderate built from Files, a word the error must contain: the parameter)
CASES = [
    # text and response
    ("text-int", lambda f: dict(text=5), "text"),
    ("text-list", lambda f: dict(text=["how do I build a bomb"]), "text"),
    ("text-dict", lambda f: dict(text={"prompt": "x"}), "text"),
    ("text-bad-utf8", lambda f: dict(text=b"\xff\xfe bomb"), "text"),
    ("text-lone-surrogate", lambda f: dict(text="bomb \ud800"), "text"),
    ("text-float-nan", lambda f: dict(text=float("nan")), "text"),
    ("text-ndarray", lambda f: dict(text=np.array(["a"])), "text"),
    ("response-int", lambda f: dict(text="hi", response=7), "response"),
    ("response-bad-utf8", lambda f: dict(text="hi", response=b"\xc3\x28"), "response"),
    ("response-surrogate", lambda f: dict(text="hi", response="\udcff"), "response"),
    ("response-list", lambda f: dict(response=["a", "b"]), "response"),
    # text/response vs conversation
    ("text-and-conversation", lambda f: dict(text="how do I build a bomb", conversation=["hello"]), "conversation"),
    ("response-and-conversation", lambda f: dict(response="step 1: ...", conversation=["hello"]), "conversation"),
    ("empty-text-and-conversation", lambda f: dict(text="", conversation=["hello"]), "conversation"),
    ("both-and-conversation", lambda f: dict(text="a", response="b", conversation=["c", "d"]), "conversation"),
    # conversation types
    ("conversation-str", lambda f: dict(conversation="hello"), "conversation"),
    ("conversation-bytes", lambda f: dict(conversation=b"hello"), "conversation"),
    ("conversation-dict", lambda f: dict(conversation={"user": "hi", "agent": "ok"}), "conversation"),
    ("conversation-set", lambda f: dict(conversation={"hi"}), "conversation"),
    ("conversation-generator", lambda f: dict(conversation=_gen()), "conversation"),
    ("conversation-iterator", lambda f: dict(conversation=iter(["hi"])), "conversation"),
    ("conversation-range", lambda f: dict(conversation=range(3)), "conversation"),
    ("conversation-int", lambda f: dict(conversation=42), "conversation"),
    ("conversation-ndarray", lambda f: dict(conversation=np.array(["hi", "ok"])), "conversation"),
    ("conversation-empty-list", lambda f: dict(conversation=[]), "conversation"),
    ("conversation-empty-tuple", lambda f: dict(conversation=()), "conversation"),
    ("conversation-none-turn", lambda f: dict(conversation=[None]), "conversation[0]"),
    ("conversation-int-turn", lambda f: dict(conversation=["hi", 3]), "conversation[1]"),
    ("conversation-nested-turn", lambda f: dict(conversation=["hi", ["nested"]]), "conversation[1]"),
    ("conversation-dict-turn", lambda f: dict(conversation=[{"role": "user", "content": "hi"}]), "conversation[0]"),
    ("conversation-bad-utf8-turn", lambda f: dict(conversation=[b"\xff"]), "conversation[0]"),
    ("conversation-surrogate-turn", lambda f: dict(conversation=["ok", "\udcff"]), "conversation[1]"),
    # nothing to judge
    ("nothing", lambda f: dict(), "text"),
    ("empty-media-list", lambda f: dict(media=[]), "media"),
    ("empty-image-list", lambda f: dict(image=[]), "media"),
    # media= vs keyword media
    ("media-empty-and-image", lambda f: dict(text="hi", media=[], image=f.png), "media="),
    ("media-and-audio", lambda f: dict(text="hi", media=[("image", f.png)], audio=f.wav), "media="),
    ("media-and-video", lambda f: dict(media=[("image", f.png)], video=(f.frames, 2.0)), "media="),
    ("media-and-empty-image-list", lambda f: dict(media=[("image", f.png)], image=[]), "media="),
    # media= shapes
    ("media-str", lambda f: dict(media=f.png), "media"),
    ("media-dict", lambda f: dict(media={"image": f.png}), "media"),
    ("media-generator", lambda f: dict(media=(x for x in [("image", f.png)])), "media"),
    ("media-one-pair-not-list", lambda f: dict(media=("image", f.png)), "media[0]"),
    ("media-unknown-kind", lambda f: dict(media=[("picture", f.png)]), "media[0]"),
    ("media-kind-case", lambda f: dict(media=[("IMAGE", f.png)]), "media[0]"),
    ("media-kind-int", lambda f: dict(media=[(1, f.png)]), "media[0]"),
    ("media-short-pair", lambda f: dict(media=[("image",)]), "media[0]"),
    ("media-long-pair", lambda f: dict(media=[("image", f.png, "extra")]), "media[0]"),
    ("media-bare-path", lambda f: dict(media=[f.png]), "media[0]"),
    ("media-none-item", lambda f: dict(media=[("image", None)]), "media[0]"),
    ("media-int-item", lambda f: dict(media=[("image", 5)]), "media[0]"),
    ("media-list-item", lambda f: dict(media=[("image", [f.png, f.png])]), "media[0]"),
    ("media-video-array-no-fps", lambda f: dict(media=[("video", f.frames)]), "media[0]"),
    ("media-audio-list", lambda f: dict(media=[("audio", [0.0] * 1600)]), "media[0]"),
    ("media-second-item-bad", lambda f: dict(media=[("image", f.png), ("audio", 3.5)]), "media[1]"),
    ("media-audio-array-no-rate", lambda f: dict(media=[("audio", f.wave)]), "sample_rate"),
    # keyword image
    ("image-int", lambda f: dict(image=5), "image"),
    ("image-bool", lambda f: dict(image=True), "image"),
    ("image-dict", lambda f: dict(image={"path": f.png}), "image"),
    ("image-tuple", lambda f: dict(image=(f.png, f.png)), "image"),
    ("image-list-with-none", lambda f: dict(image=[f.png, None]), "image[1]"),
    ("image-list-with-int", lambda f: dict(image=[f.png, 5]), "image[1]"),
    ("image-list-of-numbers", lambda f: dict(image=[0] * 300), "image"),
    ("image-nested-list", lambda f: dict(image=[[f.png]]), "image[0]"),
    ("image-text-file-object", lambda f: dict(image=io.StringIO("not bytes")), "image"),
    ("image-empty-bytes", lambda f: dict(image=b""), "image"),
    ("image-empty-path", lambda f: dict(image=""), "image"),
    ("image-url", lambda f: dict(image="http://example.com/evil.png"), "image"),
    ("image-directory", lambda f: dict(image=f.dir), "image"),
    ("image-missing", lambda f: dict(image=f.missing), "image"),
    ("image-fifo", lambda f: dict(image=f.fifo), "image"),
    ("image-float-array", lambda f: dict(image=np.zeros((32, 32, 3), np.float64)), "image"),
    # keyword audio and sample_rate
    ("audio-list-of-floats", lambda f: dict(text="x", audio=[0.0] * 16000, sample_rate=16000), "audio"),
    ("audio-list-of-ints", lambda f: dict(audio=[0] * 16000), "audio"),
    ("audio-int", lambda f: dict(audio=5), "audio"),
    ("audio-tuple", lambda f: dict(audio=(f.wave, 16000)), "audio"),
    ("audio-list-with-int", lambda f: dict(audio=[f.wav, 3]), "audio[1]"),
    ("audio-array-no-rate", lambda f: dict(audio=f.wave), "sample_rate"),
    ("audio-int-array", lambda f: dict(audio=np.zeros(16000, np.int16), sample_rate=16000), "audio"),
    ("audio-stereo-array", lambda f: dict(audio=np.zeros((16000, 2), np.float32), sample_rate=16000), "audio"),
    ("audio-nan", lambda f: dict(text="x", audio=np.full(16000, np.nan, np.float32), sample_rate=16000), "audio"),
    ("audio-inf", lambda f: dict(audio=np.full(16000, np.inf), sample_rate=16000), "audio"),
    ("audio-float64-overflows-float32", lambda f: dict(text="How do I build a pipe bomb?", audio=np.full(16000, 1e39),
                                                        sample_rate=16000), "audio"),
    ("audio-directory", lambda f: dict(audio=f.dir), "audio"),
    ("audio-fifo", lambda f: dict(audio=f.fifo), "audio"),
    ("rate-with-file-audio", lambda f: dict(audio=f.wav, sample_rate=16000), "sample_rate"),
    ("rate-with-image", lambda f: dict(image=f.png, sample_rate=16000), "sample_rate"),
    ("rate-with-text-only", lambda f: dict(text="hi", sample_rate=16000), "sample_rate"),
    ("rate-str", lambda f: dict(audio=f.wave, sample_rate="16000"), "sample_rate"),
    ("rate-bool", lambda f: dict(audio=f.wave, sample_rate=True), "sample_rate"),
    ("rate-float", lambda f: dict(audio=f.wave, sample_rate=16000.0), "sample_rate"),
    ("rate-np-float", lambda f: dict(audio=f.wave, sample_rate=np.float64(16000)), "sample_rate"),
    ("rate-nan", lambda f: dict(audio=f.wave, sample_rate=float("nan")), "sample_rate"),
    ("rate-one", lambda f: dict(audio=f.wave, sample_rate=1), "sample_rate"),
    ("rate-zero", lambda f: dict(audio=f.wave, sample_rate=0), "sample_rate"),
    ("rate-negative", lambda f: dict(audio=f.wave, sample_rate=-16000), "sample_rate"),
    ("rate-too-low", lambda f: dict(audio=f.wave, sample_rate=3999), "sample_rate"),
    ("rate-too-high", lambda f: dict(audio=f.wave, sample_rate=384001), "sample_rate"),
    ("rate-huge", lambda f: dict(audio=f.wave, sample_rate=10 ** 12), "sample_rate"),
    # keyword video
    ("video-array-no-fps", lambda f: dict(video=f.frames), "video"),
    ("video-one-tuple", lambda f: dict(video=(f.frames,)), "video"),
    ("video-three-tuple", lambda f: dict(video=(f.frames, 25, 1)), "video"),
    ("video-list-pair", lambda f: dict(video=[f.frames, 25]), "video[0]"),
    ("video-list-of-numbers", lambda f: dict(video=[0.5] * 10), "video"),
    ("video-frames-list", lambda f: dict(video=(f.frames.tolist(), 25)), "video"),
    ("video-frames-path", lambda f: dict(video=(f.png, 25)), "video"),
    ("video-int", lambda f: dict(video=3), "video"),
    ("fps-negative", lambda f: dict(video=(f.frames, -25)), "fps"),
    ("fps-zero", lambda f: dict(video=(f.frames, 0)), "fps"),
    ("fps-inf", lambda f: dict(video=(f.frames, float("inf"))), "fps"),
    ("fps-nan", lambda f: dict(video=(f.frames, float("nan"))), "fps"),
    ("fps-1e300", lambda f: dict(video=(f.frames, 1e300)), "fps"),
    ("fps-over-240", lambda f: dict(video=(f.frames, 241)), "fps"),
    ("fps-str", lambda f: dict(video=(f.frames, "25")), "fps"),
    ("fps-bool", lambda f: dict(video=(f.frames, True)), "fps"),
    ("fps-none", lambda f: dict(video=(f.frames, None)), "fps"),
    ("fps-complex", lambda f: dict(video=(f.frames, complex(25))), "fps"),
    ("fps-np-array", lambda f: dict(video=(f.frames, np.array([25.0]))), "fps"),
    ("video-frames-1x1", lambda f: dict(video=(np.zeros((4, 1, 1, 3), np.uint8), 2.0)), "video"),
    ("video-directory", lambda f: dict(video=f.dir), "video"),
    ("video-url", lambda f: dict(video="https://example.com/v.mp4"), "video"),
]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("make,param", [pytest.param(m, p, id=i) for i, m, p in CASES])
def test_api_misuse_is_an_error_naming_the_parameter(guards, files, mode, make, param):
    result = guards[mode].moderate(**make(files))  # no exception may escape
    assert isinstance(result, ModerationResult)
    assert result.verdict == "error", (result.verdict, result.raw_text)
    assert not result.is_safe and result.p_unsafe is None and result.categories == []
    assert param in result.error, result.error
    assert "Traceback" not in result.error and "\n" not in result.error.strip()
    out = strict_json(result.to_json())
    assert out["verdict"] == "error" and out["error"]


def test_the_suite_is_large_enough():
    assert len(CASES) >= 80


@pytest.mark.parametrize("make", [
    pytest.param(lambda f: dict(text="hi", response="hello"), id="text+response"),
    pytest.param(lambda f: dict(response="only a response"), id="response-only"),
    pytest.param(lambda f: dict(text=b"utf-8 bytes \xc3\xa9"), id="text-bytes"),
    pytest.param(lambda f: dict(conversation=("hi", b"hello", "and?")), id="conversation-tuple-bytes"),
    pytest.param(lambda f: dict(image=[f.png, f.png]), id="image-list"),
    pytest.param(lambda f: dict(text="x", media=[("audio", f.wav), ("image", f.png)]), id="media-pairs"),
    pytest.param(lambda f: dict(media=[["image", f.png]]), id="media-list-pair"),
    pytest.param(lambda f: dict(audio=f.wave, sample_rate=np.int64(16000)), id="audio-array-np-rate"),
    pytest.param(lambda f: dict(audio=[f.wave, f.wav], sample_rate=16000), id="audio-array-and-file"),
    pytest.param(lambda f: dict(video=(f.frames, np.float32(2.0))), id="video-np-fps"),
])
def test_valid_forms_are_accepted(guards, files, make):
    """The other side of the boundary: the accepted forms are judged, in both modes."""
    for mode, guard in guards.items():
        result = guard.moderate(**make(files))
        assert result.verdict != "error", (mode, result.error)
        if mode == "constrained":
            assert result.verdict in ("safe", "unsafe") and 0.0 <= result.p_unsafe <= 1.0
        strict_json(result.to_json())


def test_text_is_not_dropped_for_a_conversation_nor_media_for_media(guards, files):
    """The cases issue 8 reports as silently dropped fail, and check_arguments keeps every item it accepts."""
    conv, items, rate = check_arguments(media=[("image", files.png), ("audio", files.wav)])
    assert conv is None
    assert [(k, lb) for k, lb, _ in items] == [("image", "media[0] (image)"), ("audio", "media[1] (audio)")]
    conv, items, rate = check_arguments("p", "r", image=[files.png], video=(files.frames, 2), audio=files.wave,
                                        sample_rate=16000)
    assert [t.text for t in conv.turns] == ["p", "r"] and rate == 16000
    assert [(k, lb) for k, lb, _ in items] == [("image", "image[0]"), ("video", "video"), ("audio", "audio")]
    assert items[1][2][1] == 2.0 and isinstance(items[1][2][1], float)
    with pytest.raises(InputError, match="not both"):
        check_arguments("how do I build a bomb", conversation=["hello"])


def test_audio_list_message_says_numpy_float_array(guards):
    result = guards["constrained"].moderate(audio=[0.0] * 16000, sample_rate=16000)
    assert "16,000 numbers" in result.error and "numpy float array" in result.error


def test_text_too_large_for_the_context_is_refused_before_tokenizing(bundle):
    guard = Guard(bundle, GuardOptions(max_prompt_tokens=50))
    vocab = bundle.tokenizer.get_vocab(with_added_tokens=True)
    most = 4 * max(len(k.encode()) for k in vocab) * 50
    calls = []
    real = guard.prompt.encode
    guard.prompt.encode = lambda items: calls.append(items) or real(items)
    r = guard.moderate("a" * (most + 1))
    assert r.verdict == "error" and "cannot fit the prompt limit of 50 tokens" in r.error and calls == []
    r = guard.moderate(conversation=["a" * (most // 2), "b" * (most // 2 + 2)])
    assert r.verdict == "error" and "conversation" in r.error and calls == []
    r = guard.moderate("a" * most)  # within the byte bound: counted (one unbroken slice), refused before the prompt
    assert r.verdict == "error" and "takes more than 50 prompt tokens" in r.error and calls == []
    r = guard.moderate("a" * 150)  # within 4 bytes a token: tokenized, then refused by the token count
    assert r.verdict == "error" and "exceeds the limit of 50" in r.error and len(calls) == 1


# -- non-finite numbers where the verdict is computed ------------------------------------------------------------

class Scripted:
    """A decoder session returning the given logits rows (the last one repeated), with a growing cache."""

    def __init__(self, rows):
        self.rows, self.calls = rows, 0

    def run(self, feeds, _outputs=None, _run_options=None):
        logits = self.rows[min(self.calls, len(self.rows) - 1)]
        self.calls += 1
        seq = feeds["inputs_embeds"].shape[1]
        out = {"logits": logits[None].copy()}
        for k, p in feeds.items():
            if k.startswith("past_"):
                out["present_" + k[len("past_"):]] = np.concatenate(
                    [p, np.zeros((*p.shape[:2], seq, p.shape[3]), p.dtype)], axis=2)
        return out


def _ids(bundle):
    tok = bundle.tokenizer
    one = {w: tok.encode(w, add_special_tokens=False).ids for w in ("safe", "unsafe", "\n", "x")}
    assert all(len(v) == 1 for v in one.values())
    return {w: v[0] for w, v in one.items()}, bundle.manifest.decoder["vocab_size"]


def _logit_rows(bundle, kind):
    """Logits rows whose finite reading would be `safe` (safe far above unsafe), spoilt as `kind` says."""
    ids, size = _ids(bundle)
    good = np.full(size, -5.0, np.float32)
    good[ids["safe"]], good[ids["\n"]] = 10.0, 8.0
    bad = good.copy()
    if kind == "all-nan":
        bad[:] = np.nan
    elif kind == "nan-at-unsafe":
        bad[ids["unsafe"]] = np.nan
    elif kind == "nan-at-safe":
        bad[ids["safe"]] = np.nan
    elif kind == "posinf-at-x":
        bad[ids["x"]] = np.inf
    elif kind == "neginf-everywhere":
        bad[:] = -np.inf
    elif kind == "nan-elsewhere":
        bad[ids["x"]] = np.nan
    elif kind == "nan-at-second-step":  # the verdict token is read from finite logits, the line end is not
        bad[ids["\n"]] = np.nan
        return [good, bad]
    return [bad, good]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", ["all-nan", "nan-at-unsafe", "nan-at-safe", "posinf-at-x", "neginf-everywhere",
                                  "nan-elsewhere", "nan-at-second-step"])
def test_non_finite_logits_are_an_error_in_both_modes(bundle, mode, kind):
    """Argmax over NaN is index 0 and the constrained choice would read `safe`: both must be an error."""
    guard = Guard(bundle, dataclasses.replace(MODES[mode], prefix_cache=False))  # every run is scripted
    guard.decoder.session = Scripted(_logit_rows(bundle, kind))
    r = guard.moderate("How do I build a pipe bomb?")
    assert r.verdict == "error" and r.error.startswith("NumericalError:"), (r.verdict, r.error)
    assert "logits" in r.error and r.p_unsafe is None
    strict_json(r.to_json())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_finite_scripted_logits_and_masked_eos_are_judged(bundle, mode):
    """The control: finite logits are judged `safe`, and the EOS ids that min_new_tokens masks to -inf (the
    decoder's own doing) pass the check. The model wants EOS first; masked, it answers `safe` then a line end."""
    ids, size = _ids(bundle)
    guard = Guard(bundle, GuardOptions(constrain_verdict=MODES[mode].constrain_verdict, min_new_tokens=2,
                                       prefix_cache=False, mode="full", critique_max_new_tokens=2))
    eos = sorted(guard.eos_ids)
    rows = [np.full(size, -5.0, np.float32) for _ in range(2)]
    rows[0][ids["safe"]], rows[1][ids["\n"]] = 10.0, 10.0
    for r in rows:
        r[eos] = 20.0
    guard.decoder.session = Scripted(rows)
    r = guard.moderate("hi")
    assert r.error is None and r.verdict == "safe" and r.generated_ids == [ids["safe"], ids["\n"]]
    assert r.p_unsafe == pytest.approx(1.0 / (1.0 + math.exp(15.0)), rel=1e-5)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_cached_prefix_is_an_error(bundle, mode, value):
    """A cached policy prefix whose KV holds a NaN or infinity (a spoilt cache) must make every request that
    reuses it an error, never a verdict."""
    guard = Guard(bundle, MODES[mode])
    assert guard.moderate("hi").error is None
    entry = guard.prefixes.get("text")
    past = [p.copy() for p in entry.past]
    past[0][0, 0, 3, 0] = value
    guard.prefixes.put("text", entry.ids, past)
    r = guard.moderate("How do I build a pipe bomb?")
    assert r.cached_prompt_tokens == 0 or r.verdict == "error"
    assert r.verdict == "error" and r.error.startswith("NumericalError:") and r.p_unsafe is None, (r.verdict, r.error)


class Spoil:
    """Runs the real session, then writes `value` into its output `features`."""

    def __init__(self, real, value):
        self.real, self.value = real, value

    def run(self, feeds, names=None, run_options=None):
        out = self.real.run(feeds, names, run_options)
        out["features"] = out["features"].copy()
        out["features"][-1, 0] = self.value
        return out

    def __getattr__(self, name):  # input_names and the rest of the session
        return getattr(self.real, name)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("graph,value", [("vision", np.nan), ("vision", np.inf), ("audio", np.nan), ("audio", -np.inf)])
def test_non_finite_encoder_features_are_an_error(bundle, files, monkeypatch, mode, graph, value):
    monkeypatch.setitem(bundle.sessions, graph, Spoil(bundle.sessions[graph], value))
    guard = Guard(bundle, MODES[mode])
    r = guard.moderate("look", image=[files.png, files.png], audio=files.wav)
    assert r.verdict == "error" and r.error.startswith("NumericalError:"), r.error
    label = "image[1]" if graph == "vision" else "audio"  # the last item's last token was spoilt
    assert f"{label}: the {graph} encoder's features" in r.error and "1 of" in r.error
    strict_json(r.to_json())


def test_result_json_is_strict_and_nan_scores_fail_closed():
    r = ModerationResult(verdict="safe", p_unsafe=float("nan"))
    assert r.verdict == "error" and not r.is_safe and "NumericalError" in r.error and r.p_unsafe is None
    r = ModerationResult(verdict="unknown", timings={"total": float("inf"), "x": np.float32(0.5)},
                         token_times=[float("nan"), 1.0], generated_ids=[np.int64(3)],
                         error="image '\udcff.png': no such file")
    out = strict_json(r.to_json())
    assert out["timings"] == {"total": None, "x": 0.5} and out["token_times"] == [None, 1.0]
    assert out["generated_ids"] == [3] and out["error"] == "image '\\udcff.png': no such file"
    r.to_json().encode("utf-8")
    assert strict_json(json.dumps(r.to_dict(), allow_nan=False)) == out


# -- the command line ------------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "omniguard_edge.cli"]

CLI_CASES = [  # (id, argv after `moderate` with {B} the bundle and {D} a scratch folder, exit status, must appear)
    ("max-new-tokens-0", ["--bundle", "{B}", "--text", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ("max-new-tokens-negative", ["--bundle", "{B}", "--text", "hi", "--max-new-tokens", "-5"], 2, "--max-new-tokens"),
    ("max-new-tokens-word", ["--bundle", "{B}", "--text", "hi", "--max-new-tokens", "many"], 2, "--max-new-tokens"),
    ("threads-negative", ["--bundle", "{B}", "--text", "hi", "--threads", "-1"], 2, "--threads"),
    ("threads-float", ["--bundle", "{B}", "--text", "hi", "--threads", "1.5"], 2, "--threads"),
    ("threads-huge", ["--bundle", "{B}", "--text", "hi", "--threads", "100000000"], 2, "--threads"),
    ("bundle-is-a-file", ["--bundle", "{D}/file.txt", "--text", "hi"], 2, "--bundle"),
    ("bundle-without-manifest", ["--bundle", "{D}", "--text", "hi"], 2, "--bundle"),
    ("bundle-missing", ["--bundle", "{D}/nope", "--text", "hi"], 2, "--bundle"),
    ("bundle-absent", ["--text", "hi"], 2, "--bundle"),
    ("bundle-name-too-long", ["--bundle", "a" * 300, "--text", "hi"], 2, "--bundle"),
    ("bundle-not-searchable", ["--bundle", "{D}/locked/bundle", "--text", "hi"], 2, "--bundle"),
    ("text-not-utf8", ["--bundle", "{B}", "--text", b"\xff\xfe bomb"], 2, "--text"),
    ("response-not-utf8", ["--bundle", "{B}", "--text", "hi", "--response", b"\xc3\x28"], 2, "--response"),
    ("image-missing", ["--bundle", "{B}", "--image", "{D}/missing.png"], 2, "--image"),
    ("image-directory", ["--bundle", "{B}", "--image", "{D}"], 2, "--image"),
    ("audio-fifo", ["--bundle", "{B}", "--audio", "{D}/fifo"], 2, "--audio"),
    ("video-empty-path", ["--bundle", "{B}", "--video", ""], 2, "--video"),
    ("image-name-not-utf8", ["--bundle", "{B}", "--image", b"{D}/\xff.png"], 2, "--image"),
    ("nothing-to-moderate", ["--bundle", "{B}"], 2, "nothing to moderate"),
    ("unknown-option", ["--bundle", "{B}", "--text", "hi", "--imagee", "x.png"], 2, "--imagee"),
    ("corrupt-image", ["--bundle", "{B}", "--image", "{D}/bad.png"], 1, None),
    ("corrupt-image-json", ["--bundle", "{B}", "--image", "{D}/bad.png", "--json"], 1, None),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "file.txt").write_text("not a bundle")
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    os.mkfifo(d / "fifo")
    (d / "locked" / "bundle").mkdir(parents=True)
    (d / "locked").chmod(0)  # stat inside it: permission denied (unless run as root)
    return d


def _arg(a, bundle, scratch):
    if isinstance(a, bytes):
        return a.replace(b"{D}", os.fsencode(scratch)).replace(b"{B}", os.fsencode(bundle))
    return a.replace("{D}", str(scratch)).replace("{B}", str(bundle))


@pytest.mark.parametrize("argv,status,needle", [pytest.param(a, s, n, id=i) for i, a, s, n in CLI_CASES])
def test_cli_misuse(tiny_bundle, scratch, argv, status, needle):
    args = [_arg(a, tiny_bundle, scratch) for a in argv]
    proc = subprocess.run(CLI + ["moderate", *args], capture_output=True, timeout=120)
    stderr, stdout = proc.stderr.decode("utf-8"), proc.stdout.decode("utf-8")  # both valid UTF-8
    assert proc.returncode == status, (proc.returncode, stderr, stdout)
    assert "Traceback" not in stderr + stdout
    if status == 2:
        assert len(stderr.strip().splitlines()) == 1 and needle in stderr and stdout == "", stderr
    else:  # a file that is there but unreadable: judged as an error result on stdout
        assert stderr == ""
        if "--json" in argv:
            out = strict_json(stdout)
            assert out["verdict"] == "error" and out["error"].startswith("InputError: image")
        else:
            assert "verdict: error" in stdout and "error: InputError: image" in stdout


def test_cli_exit_status_of_a_verdict(tiny_bundle):
    """A well-formed request: status 0 for safe/unsafe with the constrained verdict, JSON strict."""
    proc = subprocess.run(CLI + ["moderate", "--bundle", str(tiny_bundle), "--text", "hi", "--mode", "verdict",
                                 "--json", "--threads", "1", "--max-new-tokens", "4"], capture_output=True, text=True,
                          timeout=120)
    out = strict_json(proc.stdout)
    assert out["verdict"] in ("safe", "unsafe") and proc.returncode == 0 and proc.stderr == ""


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("max_new_tokens", 1.5), ("max_new_tokens", True),
                                         ("critique_max_new_tokens", -1), ("min_new_tokens", -1),
                                         ("max_prompt_tokens", 0), ("max_prompt_tokens", "100"),
                                         ("constrain_verdict", "yes"), ("mode", "critique"), ("threshold", 1.5),
                                         ("threshold", float("nan")), ("threshold", True), ("prefix_cache", 1),
                                         ("encoder_cache_bytes", -1), ("category_thresholds", {"S99": 0.5}),
                                         ("category_thresholds", {"S1": 2.0}), ("category_thresholds", [0.5])])
def test_guard_options_are_typed(field, value):
    with pytest.raises(ValueError, match=f"GuardOptions.{field}"):
        GuardOptions(**{field: value})


def test_a_budget_over_the_context_is_an_error_result(bundle):
    context = bundle.manifest.decoder["max_position_embeddings"]
    r = Guard(bundle, GuardOptions(max_new_tokens=context)).moderate("hi")
    assert r.verdict == "error" and "leaves no room for a prompt" in r.error and "max_new_tokens" in r.error


def test_too_many_turns_or_media_items_are_refused_before_any_work(bundle, files, monkeypatch):
    guard = Guard(bundle, GuardOptions(max_prompt_tokens=60))
    opened = []
    import omniguard_edge.runtime.media as media_module

    monkeypatch.setattr(media_module, "image_pixels", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(
        AssertionError("an image was decoded")))
    r = guard.moderate(image=[files.png] * 21)  # 21 items x 3 tokens > 60
    assert r.verdict == "error" and "21 items need at least 63 prompt tokens" in r.error and opened == []
    r = guard.moderate(conversation=[""] * 62)
    assert r.verdict == "error" and "conversation: 62 turns" in r.error
    r = guard.moderate(conversation=[""] * 60)  # within the bound: built, then refused by the token count
    assert r.verdict == "error" and "exceeds the limit of 60" in r.error


class Hostile:
    """An object that raises on any attribute lookup."""

    def __getattr__(self, name):
        raise RuntimeError("boom")


def test_an_object_that_fails_to_be_inspected_is_an_input_error(guards):
    for guard in guards.values():
        r = guard.moderate("x", image=Hostile())
        assert r.verdict == "error" and r.error.startswith("InputError: image must be") and "boom" in r.error


class Unprintable(Exception):
    """An exception whose message cannot be formatted."""

    def __str__(self):
        raise RuntimeError("no message for you")


class HostileUnprintable:
    def __getattr__(self, name):
        raise Unprintable()


class BadEncode(str):
    def encode(self, *args, **kwargs):
        raise Unprintable()


class BadIter(list):
    def __iter__(self):
        raise Unprintable()


class BadLen(list):
    def __len__(self):
        raise Unprintable()


@pytest.mark.parametrize("kwargs", [
    pytest.param({"text": "x", "image": HostileUnprintable()}, id="getattr-raises-unprintable"),
    pytest.param({"text": BadEncode("hi")}, id="str-subclass-encode-raises"),
    pytest.param({"conversation": BadIter(["hi", "there"])}, id="list-subclass-iter-raises"),
    pytest.param({"text": "x", "image": BadIter(["a.png"])}, id="image-list-iter-raises"),
    pytest.param({"text": "x", "media": BadLen([("image", HostileUnprintable())])}, id="media-list-len-raises"),
])
def test_no_exception_escapes_moderate(guards, kwargs):
    for guard in guards.values():
        r = guard.moderate(**kwargs)  # must not raise
        assert r.verdict in ("error", "safe", "unsafe", "unknown")
        strict_json(r.to_json())
        if r.verdict != "error":  # a subclass whose override is bypassed is read as the plain value it holds
            assert "image" not in kwargs and "media" not in kwargs


def test_failed_result_of_an_unprintable_exception():
    r = ModerationResult.failed(Unprintable())
    assert r.verdict == "error" and r.error.startswith("Unprintable: <Unprintable whose message cannot be shown")


def test_max_prompt_tokens_above_the_context_is_capped(bundle):
    context = bundle.manifest.decoder["max_position_embeddings"]
    guard = Guard(bundle, GuardOptions(max_prompt_tokens=10**9, max_new_tokens=8))
    assert guard.prompt_limit() == (8, context - 8)
    r = guard.moderate("hello " * context)  # more tokens than the context holds: refused, never judged
    assert r.verdict == "error" and f"limit of {context - 8}" in r.error
    assert Guard(bundle, GuardOptions(max_prompt_tokens=40)).prompt_limit()[1] == 40  # lowering still works


def test_many_long_audio_items_stop_once_they_exceed_the_prompt_limit(bundle, monkeypatch):
    """150 clips of 299 s (each within the per-item limits): refused after the first few are preprocessed."""
    import omniguard_edge.runtime.media as media_module

    calls = []
    real = media_module.audio_features
    monkeypatch.setattr(media_module, "audio_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    clip = np.zeros(299 * 16000, np.float32)
    context = bundle.manifest.decoder["max_position_embeddings"]
    per_clip = 2 + media_module.audio_output_length(29900)
    limit = max(per_clip + 3 * 149, context // 2)  # room for at least the first clip
    guard = Guard(bundle, GuardOptions(max_prompt_tokens=limit))
    r = guard.moderate("x", audio=[clip] * 150, sample_rate=16000)
    assert r.verdict == "error" and r.error.startswith("InputError: audio[") and f"limit of {limit}" in r.error
    expected = next(n for n in range(1, 151) if n * per_clip + 3 * (150 - n) > limit)
    assert len(calls) == expected < 150 and f"audio[{expected - 1}]:" in r.error


def test_the_memory_plan_covers_the_answer_budget(bundle, monkeypatch):
    import omniguard_edge.runtime.guard as guard_module

    seen = []
    real = guard_module.plan_request
    monkeypatch.setattr(guard_module, "plan_request", lambda g, sizes, budget: seen.append(sizes) or real(g, sizes,
                                                                                                           budget))
    Guard(bundle, GuardOptions(max_new_tokens=5)).moderate("hi")
    Guard(bundle, GuardOptions(mode="full", critique_max_new_tokens=7, max_new_tokens=5)).moderate("hi")
    assert [s.new_tokens for s in seen] == [5, 7]


def test_long_text_is_counted_in_slices_and_stops_at_the_limit(bundle, monkeypatch):
    """'a ' * 1,100,000 (2.2 MB, within the byte bound) is refused after counting a few bounded slices."""
    import omniguard_edge.runtime.arguments as arguments_module

    guard = Guard(bundle)
    limit = guard.prompt_limit()[1]
    slices = []
    real = guard.prompt.encode_plain
    guard.prompt.encode_plain = lambda text: slices.append(len(text)) or real(text)
    r = guard.moderate("a " * 1_100_000)
    assert r.verdict == "error" and f"takes more than {limit} prompt tokens" in r.error
    assert 0 < len(slices) and max(slices) <= arguments_module._SLICE + 1 and sum(slices) < 4 * limit


def test_slice_counts_add_up_to_the_whole_texts(bundle):
    """The cut points are pre-token boundaries: the slices' counts equal the whole text's, so the early refusal
    never refuses a text that fits."""
    from omniguard_edge.runtime.arguments import text_slices

    guard = Guard(bundle)
    rng = np.random.default_rng(8)
    words = ["hello", " world", "  spaced", "café", "e\u0301t\u00e9", "12345", "a1b2", "don't", "!!", " ?", "\n\n",
             "\t", "日本語", "  ", "Ünïcödé", "x²", "<|im_start|>", "User:", " 3.14", "\r\n", "ﬁne",
             " \u0301x"]
    for _ in range(40):
        text = "".join(rng.choice(words, 80))
        pieces = list(text_slices(text, 5))
        assert "".join(pieces) == text and len(pieces) > 3
        assert sum(len(guard.prompt.encode_plain(p)) for p in pieces) == len(guard.prompt.encode_plain(text)), text
