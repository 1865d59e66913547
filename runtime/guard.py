"""`Guard`: moderate text, images, video and audio from a bundle, torch-free, failing closed."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .bundle import Bundle, SessionOptions, open_bundle
from .decode import Decoder
from .encoders import encode_audio, encode_vision
from .errors import InputError, OmniGuardError
from .positions import RopeIds, rope_index
from .preprocess.audio import AudioLimits, audio_features
from .preprocess.image import ImageConfig, ImageLimits, image_pixels
from .preprocess.video import VideoLimits, video_pixels
from .prompt import Conversation, Policy, PromptTokenizer, compose_guard_text, keyword_media
from .prompt.tokenize import Item
from .verdict import ModerationResult, parse

log = logging.getLogger(__name__)
KINDS = ("image", "video", "audio")


@dataclass(frozen=True)
class GuardOptions:
    """Moderation settings; every field has a sane default."""

    policy: Policy = Policy()  # categories shown to the guard
    max_new_tokens: int = 32  # budget for verdict + categories (verdict-first: stops once they are read)
    critique: bool = False  # also generate the critique, up to critique_max_new_tokens
    critique_max_new_tokens: int = 256
    constrain_verdict: bool = False  # first token restricted to `safe`/`unsafe` (always parseable)
    min_new_tokens: int = 0  # EOS masked before this many tokens (benchmarks: fixed answer lengths)
    max_prompt_tokens: int | None = None  # default: the decoder's context minus the token budget
    image_limits: ImageLimits = ImageLimits()
    audio_limits: AudioLimits = AudioLimits()
    video_limits: VideoLimits = VideoLimits()
    session: SessionOptions = SessionOptions()

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.critique_max_new_tokens < 1:
            raise ValueError("GuardOptions.max_new_tokens and critique_max_new_tokens must be >= 1")


@dataclass
class _Prepared:
    items: list = field(default_factory=list)  # (kind, payload) in prompt order
    features: dict = field(default_factory=lambda: {k: [] for k in KINDS})
    grids: dict = field(default_factory=lambda: {"image": [], "video": []})
    video_seconds: list = field(default_factory=list)


def _as_text(name: str, value) -> str | None:
    """str as is, UTF-8 bytes decoded; anything else (or invalid UTF-8) is an InputError."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{name} is not valid UTF-8 ({exc})") from exc
    raise InputError(f"{name} must be str (or UTF-8 bytes), got {type(value).__name__}")


class Guard:
    def __init__(self, bundle: Bundle, options: GuardOptions = GuardOptions()):
        self.bundle, self.options = bundle, options
        m = bundle.manifest
        self.prompt = PromptTokenizer(bundle.tokenizer, bundle.chat_template)
        self.decoder = Decoder(bundle.sessions["decoder"], m.decoder)
        self.image_cfg = ImageConfig.from_preprocess(m.preprocess)
        self.mel_filters = np.load(bundle.file("mel_filters.npy"))
        self.rope = RopeIds(m.special_ids["image"], m.special_ids["video"], m.special_ids["audio"],
                            m.vision["spatial_merge_size"], m.decoder["position_id_per_seconds"])
        gen = json.loads(bundle.file("generation_config.json").read_text()) if "generation_config.json" in m.files else {}
        eos = gen.get("eos_token_id", m.special_ids["im_end"])
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        verdict_ids = [self.prompt.encode_plain(w) for w in ("safe", "unsafe")]
        self.verdict_ids = [v[0] for v in verdict_ids] if all(len(v) == 1 for v in verdict_ids) else None
        self._codes_cache: list[int] | None = None  # category-line tokens, built on first constrained use

    @classmethod
    def from_bundle(cls, path, options: GuardOptions = GuardOptions(), verify: str = "auto") -> Guard:
        return cls(open_bundle(path, options.session, verify=verify), options)

    # -- preprocessing -------------------------------------------------------------------------------
    def _prepare_media(self, media: list[tuple[str, object]], sample_rate: int | None) -> _Prepared:
        prep, opts = _Prepared(), self.options
        for kind, payload in media:
            if kind == "image":
                rows, grid = image_pixels(payload, self.image_cfg, opts.image_limits)
                prep.features["image"].append(rows)
                prep.grids["image"].append(grid)
            elif kind == "video":
                rows, grid, seconds = video_pixels(payload, self.image_cfg, opts.video_limits)
                prep.features["video"].append(rows)
                prep.grids["video"].append(grid)
                prep.video_seconds.append(seconds)
            elif kind == "audio":
                prep.features["audio"].append(audio_features(payload, self.mel_filters, sample_rate, opts.audio_limits))
            else:
                raise InputError(f"unknown media kind {kind!r}: use image, video or audio")
            prep.items.append(kind)
        return prep

    def _encode(self, prep: _Prepared, timings: dict) -> dict[str, list[np.ndarray]]:
        out = {k: [] for k in KINDS}
        m, sessions = self.bundle.manifest, self.bundle.sessions
        visual = [(k, i) for k in ("image", "video") for i in range(len(prep.features[k]))]
        if visual:
            if "vision" not in sessions:
                raise InputError("this Guard was opened without the vision graph (SessionOptions.graphs)")
            t = time.perf_counter()
            feats = encode_vision(sessions["vision"], [prep.features[k][i] for k, i in visual],
                                  [prep.grids[k][i] for k, i in visual], m.vision)
            for (k, _), f in zip(visual, feats):
                out[k].append(f)
            timings["vision"] = time.perf_counter() - t
        if prep.features["audio"]:
            if "audio" not in sessions:
                raise InputError("this Guard was opened without the audio graph (SessionOptions.graphs)")
            t = time.perf_counter()
            out["audio"] = encode_audio(sessions["audio"], prep.features["audio"], m.audio)
            timings["audio"] = time.perf_counter() - t
        return out

    # -- prompt and embeddings -----------------------------------------------------------------------
    def _prompt_ids(self, conversation: Conversation | None, prep: _Prepared, feats: dict) -> list[int]:
        text = compose_guard_text(conversation, prep.items, self.options.policy)  # README "Prompt rules"
        counters = {k: iter(feats[k]) for k in KINDS}
        items = [Item("text", text)] + [Item(k, tokens=len(next(counters[k]))) for k in prep.items]
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
    def _stop_rule(self):
        if self.options.critique:
            return None

        def verdict_read(tokens: list[int]) -> bool:
            lines = self.prompt.decode(tokens).split("\n")
            first = lines[0].strip().lower()
            if first.startswith("- safety assessment"):
                return any(ln.strip().lower().startswith("- assessment") for ln in lines[1:])
            return len(lines) >= (2 if first == "safe" else 3)

        return verdict_read

    def _chooser(self):
        """Constrained verdict decoding: `safe`|`unsafe`, then a line end; after `unsafe`, a categories
        line of S-codes, digits, commas and spaces, then a line end; free text after that."""
        if not (self.options.constrain_verdict and self.verdict_ids):
            return None
        safe, unsafe = self.verdict_ids
        newline = self.prompt.encode_plain("\n")
        line_end = newline + sorted(self.eos_ids) if len(newline) == 1 else sorted(self.eos_ids)
        codes = self._category_tokens()

        def pick(logits: np.ndarray, allowed: list[int]) -> int:
            return allowed[int(np.argmax(logits[allowed]))]

        def choose(tokens: list[int], logits: np.ndarray) -> int:
            if not tokens:
                return pick(logits, [safe, unsafe])
            if len(tokens) == 1:
                return pick(logits, line_end)
            if tokens[0] == unsafe and line_end[0] not in tokens[2:]:
                return pick(logits, codes + line_end if len(tokens) > 2 else codes)
            return int(np.argmax(logits))

        return choose

    def _category_tokens(self) -> list[int]:
        """Ordinary tokens that spell only category-line characters (S, digits, comma, space)."""
        if self._codes_cache is None:
            allowed, tok = set("S0123456789, "), self.bundle.tokenizer
            limit = min(self.bundle.manifest.special_ids.values())
            self._codes_cache = [i for i in range(limit) if (t := tok.decode([i])) and set(t) <= allowed]
        return self._codes_cache

    def _p_unsafe(self, logits: np.ndarray) -> float | None:
        if self.verdict_ids is None:
            return None
        pair = logits[self.verdict_ids].astype(np.float64)
        pair = np.exp(pair - pair.max())
        return float(pair[1] / pair.sum())

    def moderate(self, text: str | None = None, response: str | None = None, *, image=None, audio=None,
                 video=None, media: list[tuple[str, object]] | None = None, conversation: list[str] | None = None,
                 sample_rate: int | None = None) -> ModerationResult:
        """Judge a prompt (and response / conversation) with any media. Never raises for bad input: any
        error gives `verdict="error"` with the reason (fail closed)."""
        timings, start = {}, time.perf_counter()
        try:
            return self._moderate(text, response, image, audio, video, media, conversation, sample_rate, timings, start)
        except OmniGuardError as exc:
            return ModerationResult.failed(exc, timings)
        except Exception as exc:  # the fail-closed boundary: an unexpected failure must not read as "safe"
            log.exception("moderation failed")
            return ModerationResult.failed(exc, timings)

    def _moderate(self, text, response, image, audio, video, media, conversation, sample_rate, timings, start):
        text, response = _as_text("text", text), _as_text("response", response)
        if media is None:
            media = keyword_media(image=image, video=video, audio=audio)
        if conversation is not None:
            conv = Conversation.from_messages(conversation)
        elif text is not None or response is not None:
            conv = Conversation.of(text or "", response)
        else:
            conv = None
        if conv is None and not media:
            raise InputError("nothing to moderate: give text, a response, a conversation or media")
        t = time.perf_counter()
        prep = self._prepare_media(media, sample_rate)
        timings["preprocess"] = time.perf_counter() - t
        feats = self._encode(prep, timings)
        t = time.perf_counter()
        ids = self._prompt_ids(conv, prep, feats)
        timings["prompt"] = time.perf_counter() - t
        t = time.perf_counter()
        budget = self.options.critique_max_new_tokens if self.options.critique else self.options.max_new_tokens
        limit = self.options.max_prompt_tokens or self.bundle.manifest.decoder["max_position_embeddings"] - budget
        if len(ids) > limit:
            raise InputError(f"prompt of {len(ids)} tokens exceeds the limit of {limit}: inputs are refused, "
                             "not truncated (shorten the text or lower media resolution)")
        embeds = self._embed(ids, feats)
        positions, delta = rope_index(np.asarray([ids]), self.rope, image_grid_thw=prep.grids["image"] or None,
                                      video_grid_thw=prep.grids["video"] or None,
                                      video_second_per_grid=prep.video_seconds or None)
        timings["embed"] = time.perf_counter() - t
        emb = self.bundle.embedding
        timings["generate_start"] = time.perf_counter() - start
        gen = self.decoder.generate(embeds, positions, int(delta[0, 0]), lambda tok: np.asarray(emb[tok], np.float32),
                                    budget, self.eos_ids, self._stop_rule(), self._chooser(),
                                    min_new_tokens=self.options.min_new_tokens)
        timings.update(gen.timings)
        raw = self.prompt.decode(gen.tokens)
        parsed = parse(raw, self.options.policy)
        timings["total"] = time.perf_counter() - start
        return ModerationResult(
            verdict=parsed.verdict,
            categories=[{"code": c, "name": self.options.policy.name_of(c)} for c in parsed.categories],
            critique=parsed.critique, raw_text=raw, p_unsafe=self._p_unsafe(gen.first_logits),
            prompt_tokens=len(ids), generated_tokens=len(gen.tokens), stop_reason=gen.stop_reason,
            timings=timings, generated_ids=gen.tokens, token_times=gen.token_times,
        )
