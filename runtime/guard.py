"""`Guard`: moderate text, images, video and audio from a bundle, torch-free, failing closed."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .bundle import Bundle, SessionOptions, open_bundle
from .answer import MODES, Answer, AnswerTokens, first_code_probabilities
from .decode import SCORE_MARGIN, Decoder, FastDecoder, fork
from .encoder_cache import DEFAULT_BYTES, EncoderCache, content_key
from .encoders import encode_audio, encode_vision
from .errors import BundleError, InputError, MemoryBudgetError, NumericalError, OmniGuardError, describe, message_of
from .memory import (ALLOCATOR_SLACK, Geometry, MemoryBudget, RequestSizes, max_vision_patches, plan_request,
                     vision_bytes)
from .positions.audio import audio_output_length
from .positions import RopeIds, rope_index
from .preprocess.audio import MAX_RATE, MIN_RATE, AudioLimits, audio_features, check_sample_rate
from .preprocess.image import ImageConfig, ImageLimits, image_pixels, smart_resize
from .preprocess.video import MAX_FPS, VideoLimits, check_fps, video_pixels
from .prompt import MEDIA_KINDS, Conversation, Policy, PromptTokenizer, compose_guard_text
from .prompt.tokenize import Item
from .prefix import PrefixCache, reusable
from .verdict import ModerationResult, parse

log = logging.getLogger(__name__)
KINDS = ("image", "video", "audio")


@dataclass(frozen=True)
class GuardOptions:
    """Moderation settings; every field has a sane default."""

    policy: Policy = Policy()  # categories shown to the guard
    # verdict: stop once the verdict token is chosen; categories: once the categories line has ended (for `safe`:
    # at the verdict); full: the critique too, up to critique_max_new_tokens (runtime/answer.py)
    mode: str = "categories"
    max_new_tokens: int = 32  # budget of the verdict and categories modes
    critique_max_new_tokens: int = 256  # budget of the full mode
    # the answer grammar over both output styles (runtime/answer.py); False: free greedy decoding (parity checks)
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
    memory: MemoryBudget = MemoryBudget()  # working memory per request beyond the bundle (README "Memory")

    def __post_init__(self):
        def whole(name, lo, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
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


@dataclass
class _Request:
    """One request, ready for the decoder (Guard._prepare)."""

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


@dataclass
class _Prepared:
    items: list = field(default_factory=list)  # kinds in prompt order
    labels: list = field(default_factory=list)  # each item's parameter: "image", "audio[1]", "media[0] (video)"
    tokens: list = field(default_factory=list)  # each item's placeholder tokens, known before any encoder runs
    features: dict = field(default_factory=lambda: {k: [] for k in KINDS})
    grids: dict = field(default_factory=lambda: {"image": [], "video": []})
    video_seconds: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # what was changed to fit the memory budget

    def vision_grids(self) -> list[tuple[int, int, int]]:
        """The (t, h, w) patch grids of every image, then every video: the vision call's, in its order."""
        return [tuple(int(x) for x in g) for k in ("image", "video") for g in self.grids[k]]


# -- the API boundary: every argument is checked before any file is opened or any graph runs ----------------

_TEXT_FORM = "str (or UTF-8 bytes)"
_PATH_FORMS = "a path to a file (str or os.PathLike), bytes, or a binary file object (io.BytesIO, open(path, 'rb'))"
FORMS = {  # accepted forms of one media item, for messages
    "image": f"{_PATH_FORMS}, or an RGB uint8 numpy array [H, W, 3]",
    "audio": f"{_PATH_FORMS}, or a mono float numpy array [samples] with sample_rate=",
    "video": f"{_PATH_FORMS}, or a tuple (frames, fps): frames an RGB uint8 numpy array [T, H, W, 3], "
             f"fps a number in (0, {MAX_FPS:g}]",
}
MEDIA_FORM = ("media must be a list of (kind, item) pairs, kind one of 'image', 'video', 'audio' "
              "(e.g. media=[('image', 'a.png'), ('audio', 'b.wav')])")
# Normalisation in the tokenizer (NFC) can shrink text, by at most 3x in UTF-8 (Hangul jamo -> syllable); escaping
# only adds characters. Text of more bytes than this factor x the longest token x the prompt limit cannot fit.
_SHRINK = 4
# Text longer than the byte bound allows is counted in slices of about _SLICE characters, cut only where the
# tokenizer's pre-tokenizer always splits (before a space followed by a letter, before a digit), so the slices'
# token counts add up to the text's; counting stops as soon as the total passes the prompt limit.
_SLICE = 1 << 14
_CUT = re.compile(r"(?: (?=[^\W\d_])|(?=\d))")


def text_slices(text: str, size: int | None = None):
    """`text` in consecutive slices of about `size` (default _SLICE) characters, cut only at pre-token boundaries
    (`_CUT`); an unbroken run longer than that is one slice."""
    size = size or _SLICE
    pos = 0
    while pos < len(text):
        end = pos + size
        if end < len(text):
            cut = _CUT.search(text, end)
            end = cut.start() if cut is not None else len(text)
        yield text[pos:end]
        pos = end


def _is_number(value) -> bool:
    return isinstance(value, (int, float, complex, np.number, np.bool_))


def _type_name(value) -> str:
    return type(value).__name__


def _as_text(name: str, value, optional: bool = True) -> str | None:
    """str as is, UTF-8 bytes decoded; anything else (or invalid UTF-8, or lone surrogates) is an InputError."""
    if value is None and optional:
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{name} is not valid UTF-8 ({exc}); {name} must be {_TEXT_FORM}") from exc
    if not isinstance(value, str):
        raise InputError(f"{name} must be {_TEXT_FORM}, got {_type_name(value)}")
    value = str.__str__(value)  # a plain str: a subclass's overridden methods are never called
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates (e.g. from a surrogate-escaped argv)
        raise InputError(f"{name} is not valid Unicode: a lone surrogate at index {exc.start}; "
                         f"{name} must be {_TEXT_FORM}") from exc
    return value


def _check_conversation(text, response, conversation) -> Conversation | None:
    text, response = _as_text("text", text), _as_text("response", response)
    if conversation is None:
        return Conversation.of_optional(text, response)
    if text is not None or response is not None:
        given = " and ".join(n for n, v in (("text", text), ("response", response)) if v is not None)
        raise InputError(f"give either text/response or conversation, not both ({given} and conversation were "
                         "given): conversation=[prompt, response, ...] holds every turn")
    if not isinstance(conversation, (list, tuple)):
        hint = " (a str would be read one turn per character: wrap it in a list)" \
            if isinstance(conversation, (str, bytes, bytearray)) else ""
        raise InputError(f"conversation must be a list (or tuple) of turns, each {_TEXT_FORM}; "
                         f"got {_type_name(conversation)}{hint}")
    conversation = _listed("conversation", conversation, f"a list (or tuple) of turns, each {_TEXT_FORM}")
    if not conversation:
        raise InputError(f"conversation must hold at least one turn (a list of {_TEXT_FORM})")
    return Conversation.from_messages([_as_text(f"conversation[{i}]", t, optional=False)
                                       for i, t in enumerate(conversation)])


def _listed(name: str, value, form: str) -> list:
    """A caller's list or tuple (or subclass) as a plain list; one whose iteration fails is an InputError."""
    try:
        return list(tuple.__iter__(value) if isinstance(value, tuple) else list.__iter__(value))
    except Exception as exc:
        raise InputError(f"{name} must be {form}; reading the {_type_name(value)} given failed ({describe(exc)})") \
            from exc


def _check_item(kind: str, label: str, value):
    """Type-level check of one media item (contents, sizes and files are checked by runtime/preprocess);
    returns the payload to preprocess (a video tuple with its fps as a float)."""
    if isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)):
        return value
    if isinstance(value, np.ndarray):
        if kind == "video":
            raise InputError(f"{label}: a video array needs its frame rate: pass (frames, fps); "
                             f"{label} must be {FORMS[kind]}")
        return value
    if kind == "video" and isinstance(value, tuple):
        if len(value) != 2:
            raise InputError(f"{label}: a video tuple must be exactly (frames, fps), got {len(value)} items")
        frames, fps = value
        if not isinstance(frames, np.ndarray):
            raise InputError(f"{label}: the frames of (frames, fps) must be an RGB uint8 numpy array [T, H, W, 3], "
                             f"got {_type_name(frames)}")
        return frames, check_fps(fps, f"{label}: fps")
    if hasattr(value, "read") and not isinstance(value, type):
        return value  # a file object: runtime/preprocess checks it is binary, readable and regular
    hint = f" (give several {kind}s as a list)" if isinstance(value, tuple) else ""
    raise InputError(f"{label} must be {FORMS[kind]}; got {_type_name(value)}{hint}")


def _keyword_items(kind: str, value) -> list[tuple[str, str, object]]:
    """image=/audio=/video=: one item or a list of items -> (kind, label, item)."""
    if value is None:
        return []
    if not isinstance(value, list):
        return [(kind, kind, value)]
    value = _listed(kind, value, f"one item or a list of items, each {FORMS[kind]}")
    if value and _is_number(value[0]):
        arrays = {"image": "an RGB uint8 numpy array [H, W, 3]", "video": "a tuple (frames, fps)",
                  "audio": "a numpy float array [samples] (np.asarray(samples, np.float32)) with sample_rate="}
        raise InputError(f"{kind}: got a list of {len(value):,} numbers, which would be {len(value):,} {kind} items; "
                         f"an {kind} array must be {arrays[kind]}" if kind != "video" else
                         f"{kind}: got a list of {len(value):,} numbers; a video array must be {arrays[kind]}")
    return [(kind, f"{kind}[{i}]", x) for i, x in enumerate(value)]


def check_arguments(text=None, response=None, image=None, audio=None, video=None, media=None, conversation=None,
                    sample_rate=None):
    """Every argument of `Guard.moderate`, checked before any work: -> (conversation or None,
    [(kind, label, item)] in prompt order, sample_rate). An InputError names the parameter and what it accepts."""
    conv = _check_conversation(text, response, conversation)
    keywords = {"image": image, "video": video, "audio": audio}
    if media is not None:
        given = [f"{k}=" for k, v in keywords.items() if v is not None]
        if given:
            raise InputError(f"give media either as media=[(kind, item), ...] or as image=/audio=/video=, not both "
                             f"(media= and {', '.join(given)} were given)")
        if not isinstance(media, (list, tuple)):
            raise InputError(f"{MEDIA_FORM}; got {_type_name(media)}")
        media = _listed("media", media, "a list of (kind, item) pairs")
        items = []
        for i, pair in enumerate(media):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InputError(f"media[{i}] must be a (kind, item) pair; {MEDIA_FORM}")
            kind, value = pair
            if not isinstance(kind, str) or kind not in KINDS:
                raise InputError(f"media[{i}]: unknown media kind {kind!r}: use 'image', 'video' or 'audio'")
            items.append((kind, f"media[{i}] ({kind})", value))
    else:  # images, then videos, then audios (README "Prompt rules"; MEDIA_KINDS is that order)
        items = [it for kind in MEDIA_KINDS for it in _keyword_items(kind, keywords[kind])]
    checked = []
    for kind, label, value in items:
        try:
            checked.append((kind, label, _check_item(kind, label, value)))
        except InputError:
            raise
        except Exception as exc:  # a caller's object that fails even to be inspected (a raising __getattr__ ...)
            raise InputError(f"{label} must be {FORMS[kind]}; inspecting the {_type_name(value)} given failed "
                             f"({describe(exc)})") from exc
    items = checked
    arrays = [label for kind, label, value in items if kind == "audio" and isinstance(value, np.ndarray)]
    if sample_rate is not None:
        if not arrays:
            raise InputError("sample_rate applies only to audio given as a numpy array (audio files carry their own "
                             "rate): remove sample_rate= or pass the samples as a float array")
        sample_rate = check_sample_rate(sample_rate)
    elif arrays:
        raise InputError(f"{arrays[0]}: an audio array needs sample_rate= (an int in [{MIN_RATE}, "
                         f"{MAX_RATE}] Hz)")
    if conv is None and not items:
        raise InputError("nothing to moderate: give text, a response, a conversation or media")
    return conv, items, sample_rate


def _labelled(exc: Exception, label: str) -> Exception:
    """The same exception with its message starting with the item's parameter name."""
    message = message_of(exc)
    if not message.startswith(label):
        exc.args = (f"{label}: {message}",)
    return exc


def require_finite(array: np.ndarray, what: str, finite: np.ndarray | None = None) -> None:
    """NumericalError unless every value is finite (`finite`: a precomputed mask of the values that pass)."""
    finite = np.isfinite(array) if finite is None else finite
    if not finite.all():
        bad = finite.size - int(finite.sum())
        nan = int(np.isnan(array).sum())
        raise NumericalError(f"{what}: {bad} of {finite.size} values are not finite ({nan} NaN, {bad - nan} "
                             "infinite); nothing was judged")


class Guard:
    def __init__(self, bundle: Bundle, options: GuardOptions = GuardOptions()):
        self.bundle, self.options = bundle, options
        m = bundle.manifest
        self.prompt = PromptTokenizer(bundle.tokenizer, bundle.chat_template)
        fast = bundle.decoder_graph == "decoder_gqa"
        session = bundle.sessions["decoder"]
        profile = getattr(session, "profile", None)  # TensorRT engines: built for a budget of new tokens
        budget = options.answer_budget
        if profile is not None and budget > profile.limits["new_tokens"]:
            raise InputError(f"mode {options.mode!r} answers in up to {budget} tokens, but the TensorRT engines are "
                             f"for --new-tokens {profile.limits['new_tokens']}: build and open them with "
                             f"--new-tokens {budget}")
        vision = getattr(bundle.sessions.get("vision"), "profile", None)
        # TensorRT's vision profile: images are fitted to its patches, as to the memory budget
        self._profile_patches = vision.shapes["pixel_values"][2][0] if vision is not None else None
        resident = options.session.kv_on_device
        resident = getattr(session, "device", "cpu") != "cpu" if resident is None else resident
        self.decoder = FastDecoder(session, m.decoder, head=lambda: bundle.session("decoder_head"),
                                   head_rows=bundle.head_rows) if fast else Decoder(session, m.decoder,
                                                                                     resident=resident)
        self.geometry = Geometry.from_manifest(m)
        self.image_cfg = ImageConfig.from_preprocess(m.preprocess)
        self.mel_filters = np.load(bundle.file("mel_filters.npy"))
        self.rope = RopeIds(m.special_ids["image"], m.special_ids["video"], m.special_ids["audio"],
                            m.vision.spatial_merge_size, m.decoder.position_id_per_seconds)
        gen = json.loads(bundle.file("generation_config.json").read_text()) if "generation_config.json" in m.files else {}
        eos = gen.get("eos_token_id", m.special_ids["im_end"])
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        tok = bundle.tokenizer
        self.answer_tokens = AnswerTokens.build(self.prompt.encode_plain, lambda i: tok.decode([i]),
                                                min(m.special_ids.values()), self.eos_ids)
        if options.constrain_verdict and self.answer_tokens is None:
            raise BundleError(f"{bundle.path}: `safe`, `unsafe` (also after a space) and the newline are not single "
                              "tokens in this tokenizer, so the answer grammar cannot constrain the verdict; pass "
                              "GuardOptions(constrain_verdict=False) to decode freely (threshold and "
                              "category_thresholds then do not apply)")
        self.prefixes = PrefixCache()  # README "Time to verdict"
        self._prefix_lock = threading.Lock()  # one build per template when threads share the Guard
        self.encoder_cache = EncoderCache(options.encoder_cache_bytes)
        self._media_ids = {m.special_ids[k] for k in KINDS}
        self._token_bytes: int | None = None  # UTF-8 bytes of the longest vocabulary entry, built on first use

    @classmethod
    def from_bundle(cls, path, options: GuardOptions = GuardOptions(), verify: str = "auto") -> Guard:
        return cls(open_bundle(path, options.session, verify=verify), options)

    # -- preprocessing -------------------------------------------------------------------------------
    def _prepare_media(self, media: list[tuple[str, str, object]], sample_rate: int | None,
                       limit: int | None = None) -> _Prepared:
        """(kind, label, item) -> pixel rows / log-mels. An error names the item's parameter (its label).
        With `limit`: the prompt tokens of the items preprocessed so far (their placeholders, start and end
        tokens), plus 3 for each item still to come, are counted after every item, and the request is refused
        as soon as that exceeds the limit, before the next item is decoded (150 long audio clips must not all
        be decoded to learn that they cannot fit)."""
        prep, opts = _Prepared(), self.options
        unit = self.bundle.manifest.vision.spatial_merge_size ** 2
        tokens = 0  # prompt tokens of the items preprocessed so far
        visual = sum(kind in ("image", "video") for kind, _, _ in media)
        share = max_vision_patches(self.geometry, opts.memory.bytes) // max(1, visual)  # patches per visual item
        if self._profile_patches is not None:
            share = min(share, self._profile_patches // max(1, visual))
        for kind, label, payload in media:
            try:
                if kind == "image":
                    rows, grid = self._image_within_budget(payload, label, share, prep)
                    prep.features["image"].append(rows)
                    prep.grids["image"].append(grid)
                elif kind == "video":
                    lim = self._video_limits(share)
                    check = None if limit is None else functools.partial(
                        self._video_fits, label=label, lim=lim, tokens=tokens, limit=limit,
                        after=len(media) - len(prep.items) - 1)  # refuses from the metadata, before decoding
                    rows, grid, seconds = video_pixels(payload, self.image_cfg, lim, check)
                    prep.features["video"].append(rows)
                    prep.grids["video"].append(grid)
                    prep.video_seconds.append(seconds)
                elif kind == "audio":
                    prep.features["audio"].append(audio_features(payload, self.mel_filters, sample_rate,
                                                                 opts.audio_limits))
                else:
                    raise InputError(f"unknown media kind {kind!r}: use image, video or audio")
            except OmniGuardError as exc:
                raise _labelled(exc, label)
            except MemoryError:
                raise
            except Exception as exc:  # a decoder library's own failure on this item: say which item and what it takes
                raise InputError(f"{label}: cannot be read ({describe(exc)}); {label} must be "
                                 f"{FORMS[kind]}") from exc
            prep.items.append(kind)
            prep.labels.append(label)
            if kind == "audio":
                prep.tokens.append(audio_output_length(int(prep.features["audio"][-1].shape[1])))
            else:
                t, h, w = prep.grids[kind][-1]
                prep.tokens.append(int(t) * int(h) * int(w) // unit)
            if limit is not None:
                tokens += 2 + prep.tokens[-1]
                later = 3 * (len(media) - len(prep.items))
                if tokens + later > limit:
                    raise InputError(f"{label}: the media up to this item take {tokens:,} prompt tokens"
                                     f"{f' (and the {later // 3} items after it at least {later})' if later else ''}"
                                     f", over the limit of {limit}: inputs are refused, not truncated "
                                     "(fewer or shorter items, or a lower resolution)")
        return prep

    def _video_fits(self, grid, label: str, lim: VideoLimits, tokens: int, limit: int, after: int) -> None:
        """A video's planned grid against the prompt limit, before any frame is decoded: InputError naming what
        makes it large (its sampled frames and their size) and the limits that would shrink it."""
        t, h, w = (int(x) for x in grid)
        own = 2 + t * h * w // self.bundle.manifest.vision.spatial_merge_size ** 2
        if tokens + own + 3 * after > limit:
            p = self.image_cfg.patch_size
            raise InputError(
                f"{label}: its {t * self.image_cfg.temporal_patch_size} sampled frames ({lim.fps:g} per second) at "
                f"{w * p}x{h * p} pixels take {own:,} prompt tokens"
                f"{f' after {tokens:,} for the items before it' if tokens else ''}"
                f"{f' and at least {3 * after} for the {after} after it' if after else ''}, over the limit of "
                f"{limit}; refused before decoding: a shorter clip, or lower VideoLimits.fps, max_frames or "
                f"max_pixels")

    def _image_within_budget(self, payload, label: str, share: int, prep: _Prepared):
        """Pixel rows of an image, decoded once: at the default limits when its share of the vision budget
        (`share` patches) allows them, else at the budget's pixel cap (decoded at reduced size, never at full
        size first). An image that the cap made smaller is noted (downscale policy) or refused (refuse policy)."""
        opts, cfg = self.options, self.image_cfg
        default, p = opts.image_limits, cfg.patch_size
        cap = share * p**2
        if cap >= default.max_pixels:
            return image_pixels(payload, cfg, default)
        if cap < default.min_pixels:
            raise MemoryBudgetError(f"{label}: even the smallest image ({default.min_pixels} pixels) exceeds "
                                    f"the memory budget of {opts.memory.bytes / 2**30:.2f} GiB")
        info: dict = {}
        rows, grid = image_pixels(payload, cfg, dataclasses.replace(default, max_pixels=cap), info)
        full = smart_resize(*info["source_size"], cfg.factor, default.min_pixels, default.max_pixels)
        if full == (grid[1] * p, grid[2] * p):
            return rows, grid  # the cap changed nothing
        if opts.memory.image_policy == "refuse":
            need = vision_bytes(self.geometry, [(1, full[0] // p, full[1] // p)]) + ALLOCATOR_SLACK
            raise MemoryBudgetError(f"{label}: {full[1]}x{full[0]} pixels exceeds the memory budget of "
                                    f"{opts.memory.bytes / 2**30:.2f} GiB by {(need - opts.memory.bytes) / 2**30:.2f} GiB "
                                    f"(the vision encoder needs an estimated {need / 2**30:.2f} GiB; {share} patches "
                                    "fit); lower the resolution or use MemoryBudget(image_policy='downscale')")
        prep.notes.append(f"{label}: downscaled from {full[1]}x{full[0]} to {grid[2] * p}x{grid[1] * p} pixels "
                          f"to fit the memory budget of {opts.memory.bytes / 2**30:.2f} GiB")
        return rows, grid

    def _video_limits(self, share: int) -> VideoLimits:
        """The video limits with all frames together capped to the item's share of the vision budget."""
        lim = self.options.video_limits
        cap = share * self.image_cfg.patch_size**2 * 2  # two frames per temporal patch
        if cap >= lim.total_pixels:
            return lim
        if cap < lim.min_frames * lim.min_pixels:
            raise MemoryBudgetError(f"video: even its smallest form ({lim.min_frames} frames of {lim.min_pixels} pixels) "
                                    f"exceeds the memory budget of {self.options.memory.bytes / 2**30:.2f} GiB")
        return dataclasses.replace(lim, total_pixels=float(cap))

    def _run_options(self, plan):
        """Arena shrinkage for a request whose planned working memory is large (SessionOptions.arena_shrink_above):
        its buffers go back to the system when its runs end, while small requests keep the arena warm."""
        session = self.options.session
        if not session.cpu_mem_arena or session.arena_shrink_above is None:
            return None
        if plan.estimate.peak - plan.estimate.slack <= session.arena_shrink_above:
            return None
        from .bundle import shrink_run_options

        return shrink_run_options()

    def _plan(self, ids: list[int], prep: _Prepared, budget: int = 0):
        """The request's memory plan from its sizes and the answer's token budget, before any graph runs
        (MemoryBudgetError if it cannot fit)."""
        grids = tuple(prep.vision_grids())
        frames = tuple(int(m.shape[1]) for m in prep.features["audio"])
        return plan_request(self.geometry, RequestSizes(len(ids), grids, frames, budget), self.options.memory)

    def _encode(self, prep: _Prepared, timings: dict, run_options=None) -> dict[str, list[np.ndarray]]:
        """Encoder features per item (from the encoder cache when the same input was encoded before); every value
        must be finite (NumericalError naming the item otherwise)."""
        out = {k: [] for k in KINDS}
        m, sessions, cache = self.bundle.manifest, self.bundle.sessions, self.encoder_cache
        labels = {k: [lb for kind, lb in zip(prep.items, prep.labels) if kind == k] for k in KINDS}
        keys = {k: [content_key(k, prep.features[k][i], prep.grids[k][i] if k != "audio" else None) if cache.max_bytes
                    else None for i in range(len(prep.features[k]))] for k in KINDS}
        found = {k: [cache.get(key) if key else None for key in keys[k]] for k in KINDS}
        visual = [(k, i) for k in ("image", "video") for i in range(len(prep.features[k])) if found[k][i] is None]
        if visual:
            if "vision" not in sessions:
                raise InputError("this Guard was opened without the vision graph (SessionOptions.graphs)")
            t = time.perf_counter()
            session, vision_options = self.options.session, run_options
            if vision_options is None and not session.cpu_mem_arena and "vision" in session.exact_arena_graphs:
                from .bundle import shrink_run_options

                vision_options = shrink_run_options()  # the exact-size arena gives its memory back after the run
            feats = encode_vision(sessions["vision"], [prep.features[k][i] for k, i in visual],
                                  [prep.grids[k][i] for k, i in visual], m.vision, vision_options)
            for (k, i), f in zip(visual, feats):
                require_finite(f, f"{labels[k][i]}: the vision encoder's features")
                found[k][i] = f
                if keys[k][i]:
                    cache.put(keys[k][i], f)
            timings["vision"] = time.perf_counter() - t
        audio = [i for i, f in enumerate(found["audio"]) if f is None]
        if audio:
            if "audio" not in sessions:
                raise InputError("this Guard was opened without the audio graph (SessionOptions.graphs)")
            t = time.perf_counter()
            feats = encode_audio(sessions["audio"], [prep.features["audio"][i] for i in audio], m.audio, run_options)
            for i, f in zip(audio, feats):
                require_finite(f, f"{labels['audio'][i]}: the audio encoder's features")
                found["audio"][i] = f
                if keys["audio"][i]:
                    cache.put(keys["audio"][i], f)
            timings["audio"] = time.perf_counter() - t
        for k in KINDS:
            out[k] = found[k]
        return out

    # -- prompt and embeddings -----------------------------------------------------------------------
    def _prompt_ids(self, conversation: Conversation | None, prep: _Prepared) -> list[int]:
        text = compose_guard_text(conversation, prep.items, self.options.policy)  # README "Prompt rules"
        items = [Item("text", text)] + [Item(k, tokens=n) for k, n in zip(prep.items, prep.tokens)]
        return self.prompt.encode(items)

    def _embed(self, ids: list[int], feats: dict) -> np.ndarray:
        ids_arr = np.asarray(ids, np.int64)
        embeds = np.asarray(self.bundle.embedding[ids_arr], dtype=np.float32)
        special = self.bundle.manifest.special_ids
        for kind in KINDS:
            where = np.flatnonzero(ids_arr == special[kind])
            have = sum(len(f) for f in feats[kind])
            if len(where) != have:
                raise InputError(f"{kind}: {len(where)} placeholder tokens but {have} encoder features")
            if have:
                embeds[where] = np.concatenate(feats[kind], axis=0)
        return embeds[None]

    # -- decoding --------------------------------------------------------------------------------------
    def _answer(self) -> Answer:
        opts = self.options
        codes = tuple(c.code for c in opts.policy.categories)
        # constrain_verdict without answer tokens was refused in __init__
        return Answer(self.answer_tokens, codes, opts.mode, float(opts.threshold), bool(opts.constrain_verdict),
                      self.prompt.decode)

    def _prefix(self, ids: list[int], kind: str, run_options) -> tuple[object, int]:
        """(decoder state holding the cached prefix's first M positions, M) for these prompt ids; builds the
        template's prefix on first use (README "Time to verdict")."""
        entry = self.prefixes.get(kind)
        if entry is None:
            with self._prefix_lock:
                entry = self.prefixes.get(kind) or self._build_prefix(kind, run_options)
        if entry is None:
            return None, 0
        m = reusable(ids, entry, self._media_ids)
        if m < 1:
            return None, 0
        return self.decoder.first(list(entry.past), m), m

    def _build_prefix(self, kind: str, run_options):
        """The template's fixed opening: the common ids of two probe requests, up to the first media token."""
        probes = [self._prompt_ids(Conversation.of(p) if kind == "text" else None,
                                   _Prepared(items=[] if kind == "text" else ["image"],
                                             tokens=[] if kind == "text" else [1])) for p in ("a", "1")]
        n = min(len(probes[0]), len(probes[1]))
        same = next((i for i in range(n) if probes[0][i] != probes[1][i]), n)
        media = [i for i, t in enumerate(probes[0][:same]) if t in self._media_ids]
        prefix = probes[0][: media[0] if media else same]
        if len(prefix) < 2:
            return None
        state = self.decoder.start(0, run_options)
        self.decoder.extend(state, self._embed_tokens(prefix)[None])
        return self.prefixes.put(kind, prefix, self.decoder.cache(state))

    def _scores(self, answer: Answer, gen) -> dict:
        """Category scores (runtime/answer.py): P(unsafe) x q(code), q from runs that continue a fork of the
        verdict position's state with the verdict `unsafe`."""
        if not answer.constrain or gen.verdict_state is None or answer.p_unsafe is None:
            return {}
        base, head = gen.verdict_state, answer.score_path()
        states = {(): base}

        def logits_after(path: list[int], rows: list[int]) -> np.ndarray:
            full = tuple(head + path)
            k = max(len(p) for p in states if full[: len(p)] == p)
            state = fork(states[full[:k]])
            out = self.decoder.extend(state, self._embed_tokens(list(full[k:]))[None])
            states[full] = state
            return self.decoder.logits(out, rows)

        q = first_code_probabilities(answer, logits_after)
        # q sums to 1 up to rounding (finite: its logits were checked), so a score can exceed 1 by an ulp
        return {code: min(1.0, max(0.0, float(answer.p_unsafe * v))) for code, v in q.items()}

    def _reported(self, answer: Answer, scores: dict) -> list[str]:
        """The category codes an `unsafe` result reports: those of the answer's categories line (constrained) or of
        its text (free). With `category_thresholds`, a code that has a threshold is reported exactly when its score
        reaches it (written in the line or not: the scores are first-code probabilities, so a second code written
        would rarely reach one), codes without one as written; written codes first, then the others by score."""
        if answer.verdict != "unsafe" and answer.constrain:
            return []
        codes = answer.line_codes if answer.constrain else list(parse(self.prompt.decode(answer.generated),
                                                                      self.options.policy).categories)
        limits = self.options.category_thresholds
        if limits and scores:
            kept = [c for c in codes if c not in limits or scores.get(c, 0.0) >= limits[c]]
            extra = sorted((c for c, t in limits.items() if c not in codes and scores.get(c, 0.0) >= t),
                           key=lambda c: -scores[c])
            codes = kept + extra
        return codes

    def _prompt_limit(self) -> tuple[int, int]:
        """(token budget of the answer, the most prompt tokens allowed)."""
        budget = self.options.answer_budget
        context = self.bundle.manifest.decoder.max_position_embeddings
        # max_prompt_tokens may lower the limit, never raise it past the context: positions beyond it are
        # outside what the decoder was trained on, so a prompt there is refused, not judged
        limit = min(self.options.max_prompt_tokens or context, context - budget)
        if limit < 1:
            raise InputError(f"GuardOptions: a token budget of {budget} leaves no room for a prompt in the "
                             f"decoder's context of {context} tokens (lower max_new_tokens / critique_max_new_tokens)")
        return budget, limit

    def _check_sizes(self, conv: Conversation | None, media: list, limit: int) -> None:
        """Refuse requests that cannot fit the prompt limit before any work (a 1 GB string must not be tokenized,
        nor 10,000 images decoded, to learn that): every media item takes at least 3 prompt tokens (its start,
        one placeholder, its end), every turn at least one (its role label), and text no fewer tokens than its
        UTF-8 bytes / (_SHRINK x the longest token)."""
        if 3 * len(media) > limit:
            raise InputError(f"media: {len(media):,} items need at least {3 * len(media):,} prompt tokens, over the "
                             f"limit of {limit}: inputs are refused, not truncated")
        if conv is None:
            return
        if len(conv.turns) > limit:
            raise InputError(f"conversation: {len(conv.turns):,} turns need at least as many prompt tokens, over the "
                             f"limit of {limit}: inputs are refused, not truncated")
        size = sum(len(t.text.encode("utf-8")) for t in conv.turns)
        if size <= _SHRINK * limit:
            return
        if self._token_bytes is None:
            vocab = self.bundle.tokenizer.get_vocab(with_added_tokens=True)
            self._token_bytes = max(len(k.encode("utf-8")) for k in vocab)
        most = _SHRINK * self._token_bytes * limit
        if size > most:
            raise InputError(f"text/response/conversation: {size:,} bytes of text cannot fit the prompt limit of "
                             f"{limit} tokens (at most {most:,} bytes could): inputs are refused, not truncated")
        count = 0
        for i, turn in enumerate(conv.turns):
            for piece in text_slices(turn.text):
                count += len(self.prompt.encode_plain(piece))
                if count > limit:
                    raise InputError(f"text/response/conversation: the text takes more than {limit} prompt tokens "
                                     f"(counted {count:,} within its first {i + 1} turn(s)), over the limit of "
                                     f"{limit}: inputs are refused, not truncated")

    def moderate(self, text: str | None = None, response: str | None = None, *, image=None, audio=None,
                 video=None, media: list[tuple[str, object]] | None = None, conversation: list[str] | None = None,
                 sample_rate: int | None = None) -> ModerationResult:
        """Judge a prompt (and response) or a conversation, with any media. Never raises for bad input: every
        argument is checked first (`check_arguments`), and any error, including a non-finite number in the
        features or logits (NumericalError), gives `verdict="error"` with the reason (fail closed).

        - `text`, `response`: str or UTF-8 bytes; or `conversation`: a list (or tuple) of such turns
          (user, agent, user, ...), not both.
        - media either as `image=`/`audio=`/`video=` (each one item or a list of items) or as
          `media=[(kind, item), ...]`, not both; items are paths, bytes, binary file objects or arrays
          (`FORMS`); a video array is a tuple (frames, fps); `sample_rate` goes with audio arrays only."""
        timings, start = {}, time.perf_counter()
        try:
            return self._moderate(text, response, image, audio, video, media, conversation, sample_rate, timings, start)
        except Exception as exc:  # the fail-closed boundary: a failure must not read as "safe"
            return self._failed(exc, timings)

    def _moderate(self, text, response, image, audio, video, media, conversation, sample_rate, timings, start):
        req = self._prepare(text, response, image, audio, video, media, conversation, sample_rate, timings, start)
        gen = self.decoder.generate(**req.generate_args(), embed_tokens=self._embed_tokens, eos_ids=self.eos_ids,
                                    min_new_tokens=self.options.min_new_tokens)
        return self._result(req, gen)

    def _embed_tokens(self, tokens: list[int]) -> np.ndarray:
        return np.asarray(self.bundle.embedding[np.asarray(tokens)], np.float32)

    def _prepare(self, text, response, image, audio, video, media, conversation, sample_rate, timings, start
                 ) -> _Request:
        """Everything before the decoder: arguments checked, media preprocessed and encoded, prompt ids,
        embeddings, positions, the memory plan and the cached prefix."""
        conv, media, sample_rate = check_arguments(text, response, image, audio, video, media, conversation,
                                                   sample_rate)
        budget, limit = self._prompt_limit()
        self._check_sizes(conv, media, limit)
        t = time.perf_counter()
        prep = self._prepare_media(media, sample_rate, limit)
        timings["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        ids = self._prompt_ids(conv, prep)
        timings["prompt"] = time.perf_counter() - t
        if len(ids) > limit:
            raise InputError(f"prompt of {len(ids)} tokens exceeds the limit of {limit}: inputs are refused, "
                             "not truncated (shorten the text or lower media resolution)")
        plan = self._plan(ids, prep, budget)  # before any graph runs: fits the memory budget or is refused
        run_options = self._run_options(plan)
        feats = self._encode(prep, timings, run_options)
        t = time.perf_counter()
        embeds = self._embed(ids, feats)
        positions, delta = rope_index(np.asarray([ids]), self.rope, image_grid_thw=prep.grids["image"] or None,
                                      video_grid_thw=prep.grids["video"] or None,
                                      video_second_per_grid=prep.video_seconds or None)
        timings["embed"] = time.perf_counter() - t
        state, reused = None, 0
        if self.options.prefix_cache:
            t = time.perf_counter()
            kind = "image" if prep.items and all(k == "image" for k in prep.items) and \
                (conv is None or not conv.has_content()) else "text"
            past, reused = self._prefix(ids, kind, run_options)
            if reused and np.array_equal(positions[:, 0, :reused], np.broadcast_to(np.arange(reused), (3, reused))):
                state = self.decoder.start(int(delta[0, 0]), run_options, past, reused,
                                           capacity=len(ids) + budget + SCORE_MARGIN)
            else:
                reused = 0
            timings["prefix"] = time.perf_counter() - t
        timings["generate_start"] = time.perf_counter() - start
        return _Request(ids, prep, embeds, positions, int(delta[0, 0]), budget, plan, run_options, state, reused,
                        self._answer(), timings, start)

    def _result(self, req: _Request, gen) -> ModerationResult:
        timings, answer = req.timings, req.answer
        timings.update(gen.timings)
        if "verdict" in gen.timings:
            timings["verdict"] = timings["generate_start"] + gen.timings["verdict"]
        t = time.perf_counter()
        scores = self._scores(answer, gen)
        if scores:
            timings["scores"] = time.perf_counter() - t
        raw = self.prompt.decode(gen.tokens)
        parsed = parse(raw, self.options.policy)
        verdict = answer.verdict if answer.constrain and answer.verdict else parsed.verdict
        codes = self._reported(answer, scores) if verdict == "unsafe" else []
        timings["total"] = time.perf_counter() - req.start
        return ModerationResult(
            verdict=verdict,
            categories=[{"code": c, "name": self.options.policy.name_of(c)} for c in codes],
            # free decoding: P(unsafe) at the verdict token of the style written, or, when the answer parsed to no
            # verdict (`unknown`, never safe), at the first position from the plain pair, as the PyTorch reference does
            critique=parsed.critique, raw_text=raw, p_unsafe=answer.p_unsafe, category_scores=scores,
            style=answer.branch if answer.constrain else parsed.style, mode=self.options.mode,
            prompt_tokens=len(req.ids), cached_prompt_tokens=req.reused, generated_tokens=len(gen.tokens),
            stop_reason=gen.stop_reason, timings=timings, generated_ids=gen.tokens, token_times=gen.token_times,
            notes=req.prep.notes,
            vision_grids=[list(g) for g in req.prep.vision_grids()],
        )

    def moderate_batch(self, requests: list) -> list[ModerationResult]:
        """Judge several requests together; one result per request, in order, each what `moderate` would give
        for it alone (tokens equal; P(unsafe) within float rounding). Each request is a str (the prompt) or a
        dict of `moderate`'s keyword arguments. A request that fails (bad input, a non-finite number) gets its
        own `error` result; the others are judged.

        With the fast decoder graph, each request is prefilled on its own (from the cached prefix) and the decode
        steps of all of them run as one batch, each row at its own length and position; with the standard graph
        the requests run one after another."""
        if not isinstance(requests, (list, tuple)):
            raise InputError(f"requests must be a list of requests (each a str or a dict of moderate's keyword "
                             f"arguments), got {_type_name(requests)}")
        requests = _listed("requests", requests, "a list of requests")
        allowed = {"text", "response", "image", "audio", "video", "media", "conversation", "sample_rate"}
        results: list[ModerationResult | None] = [None] * len(requests)
        prepared = []
        for i, item in enumerate(requests):
            timings, start = {}, time.perf_counter()
            try:
                if isinstance(item, (str, bytes, bytearray)):
                    kwargs = {"text": item}
                elif isinstance(item, dict):
                    unknown = sorted(str(k) for k in item if k not in allowed)
                    if unknown:
                        raise InputError(f"requests[{i}]: unknown argument(s) {unknown}; a request dict takes "
                                         f"{', '.join(sorted(allowed))}")
                    kwargs = dict(item)
                else:
                    raise InputError(f"requests[{i}] must be a str (the prompt) or a dict of moderate's keyword "
                                     f"arguments, got {_type_name(item)}")
                if not isinstance(self.decoder, FastDecoder):
                    results[i] = self.moderate(**kwargs)
                    continue
                args = [kwargs.get(k) for k in ("text", "response", "image", "audio", "video", "media",
                                                "conversation", "sample_rate")]
                prepared.append((i, self._prepare(*args, timings, start)))
            except Exception as exc:  # fail closed, per request
                results[i] = self._failed(exc, timings)
        if prepared:
            try:
                gens = self.decoder.generate_batch([req.generate_args() for _, req in prepared], self._embed_tokens,
                                                   self.eos_ids, self.options.min_new_tokens)
            except Exception as exc:  # the batch's decoder failed: every request in it is an error
                for i, req in prepared:
                    results[i] = self._failed(exc, req.timings)
                return results
            for (i, req), gen in zip(prepared, gens):
                try:
                    results[i] = self._result(req, gen)
                except Exception as exc:
                    results[i] = self._failed(exc, req.timings)
        return results

    def _failed(self, exc: BaseException, timings: dict) -> ModerationResult:
        """`verdict="error"` for `exc`; an unexpected failure (not an OmniGuardError) is logged with its traceback."""
        if not isinstance(exc, OmniGuardError):
            try:
                log.exception("moderation failed")
            except Exception:  # noqa: S110 (a caller's exception that cannot even be logged is still an error)
                pass
        return ModerationResult.failed(exc, timings)
