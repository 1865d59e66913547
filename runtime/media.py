"""A request's media: each item preprocessed within its share of the memory budget (and of a TensorRT vision
profile), the request refused as soon as its media pass the prompt limit (a video from its metadata, before
decoding); then encoded through the encoder cache and merged into the prompt's embeddings."""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field

import numpy as np

from .arguments import FORMS
from .bundle import shrink_run_options
from .encoder_cache import EncoderCache, content_key
from .encoders import encode_audio, encode_vision
from .errors import InputError, MemoryBudgetError, OmniGuardError, describe, message_of, require_finite
from .memory import ALLOCATOR_SLACK, RequestSizes, max_vision_patches, vision_bytes
from .positions import rope_index
from .positions.audio import audio_output_length
from .preprocess.audio import audio_features
from .preprocess.image import ImageConfig, image_pixels, smart_resize
from .preprocess.video import VideoLimits, video_pixels
from .prompt import MEDIA_KINDS


@dataclass
class Prepared:
    """A request's media, preprocessed: what the prompt, the memory plan and the encoders need."""

    items: list = field(default_factory=list)  # kinds in prompt order
    labels: list = field(default_factory=list)  # each item's parameter: "image", "audio[1]", "media[0] (video)"
    tokens: list = field(default_factory=list)  # each item's placeholder tokens, known before any encoder runs
    features: dict = field(default_factory=lambda: {k: [] for k in MEDIA_KINDS})
    grids: dict = field(default_factory=lambda: {"image": [], "video": []})
    video_seconds: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # what was changed to fit the memory budget

    def request_sizes(self, prompt_tokens: int, budget: int) -> RequestSizes:
        """What the memory plan needs: the prompt's length, these media's sizes and the answer's token budget."""
        frames = tuple(int(m.shape[1]) for m in self.features["audio"])
        return RequestSizes(prompt_tokens, tuple(self.vision_grids()), frames, budget)

    def positions(self, ids: list[int], rope) -> tuple[np.ndarray, int]:
        """(TMRoPE positions [3, 1, len(ids)], the rope delta) of prompt `ids` holding these media."""
        positions, delta = rope_index(np.asarray([ids]), rope, image_grid_thw=self.grids["image"] or None,
                                      video_grid_thw=self.grids["video"] or None,
                                      video_second_per_grid=self.video_seconds or None)
        return positions, int(delta[0, 0])

    def without_rows(self) -> Prepared:
        """These media once encoded: the preprocessed rows (pixels, mel features) replaced by zero-byte read-only
        views of their shapes, which the memory plan still reads (a stream keeps this, not megabytes of rows)."""
        rows = {k: [np.broadcast_to(np.zeros((), f.dtype), f.shape) for f in v] for k, v in self.features.items()}
        return dataclasses.replace(self, features=rows)

    def vision_grids(self) -> list[tuple[int, int, int]]:
        """The (t, h, w) patch grids of every image, then every video: the vision call's, in its order."""
        return [tuple(int(x) for x in g) for k in ("image", "video") for g in self.grids[k]]


def labelled(exc: Exception, label: str) -> Exception:
    """The same exception with its message starting with the item's parameter name."""
    message = message_of(exc)
    if not message.startswith(label):
        exc.args = (f"{label}: {message}",)
    return exc


class MediaStage:
    """Preprocessing and encoding for one Guard: its bundle's sessions, preprocessing config and mel filters, its
    options' limits and memory budget, and its encoder cache."""

    def __init__(self, bundle, options, geometry):
        self.manifest, self.sessions, self.embedding = bundle.manifest, bundle.sessions, bundle.embedding
        self.options, self.geometry = options, geometry
        self.image_cfg = ImageConfig.from_preprocess(self.manifest.preprocess)
        self.mel_filters = np.load(bundle.file("mel_filters.npy"))
        self.cache = EncoderCache(options.encoder_cache_bytes)
        vision = getattr(bundle.sessions.get("vision"), "profile", None)
        # TensorRT's vision profile: images are fitted to its patches, as to the memory budget
        self.profile_patches = vision.shapes["pixel_values"][2][0] if vision is not None else None

    def prepare(self, media: list[tuple[str, str, object]], sample_rate: int | None,
                       limit: int | None = None) -> Prepared:
        """(kind, label, item) -> pixel rows / log-mels. An error names the item's parameter (its label).
        With `limit`: the prompt tokens of the items preprocessed so far (their placeholders, start and end
        tokens), plus 3 for each item still to come, are counted after every item, and the request is refused
        as soon as that exceeds the limit, before the next item is decoded (150 long audio clips must not all
        be decoded to learn that they cannot fit)."""
        prep, opts = Prepared(), self.options
        unit = self.manifest.vision.spatial_merge_size ** 2
        tokens = 0  # prompt tokens of the items preprocessed so far
        visual = sum(kind in ("image", "video") for kind, _, _ in media)
        share = max_vision_patches(self.geometry, opts.memory.bytes) // max(1, visual)  # patches per visual item
        if self.profile_patches is not None:
            share = min(share, self.profile_patches // max(1, visual))
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
                raise labelled(exc, label)
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
        own = 2 + t * h * w // self.manifest.vision.spatial_merge_size ** 2
        if tokens + own + 3 * after > limit:
            p = self.image_cfg.patch_size
            raise InputError(
                f"{label}: its {t * self.image_cfg.temporal_patch_size} sampled frames ({lim.fps:g} per second) at "
                f"{w * p}x{h * p} pixels take {own:,} prompt tokens"
                f"{f' after {tokens:,} for the items before it' if tokens else ''}"
                f"{f' and at least {3 * after} for the {after} after it' if after else ''}, over the limit of "
                f"{limit}; refused before decoding: a shorter clip, or lower VideoLimits.fps, max_frames or "
                f"max_pixels")

    def _image_within_budget(self, payload, label: str, share: int, prep: Prepared):
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

    def encode(self, prep: Prepared, timings: dict, run_options=None) -> dict[str, list[np.ndarray]]:
        """Encoder features per item (from the encoder cache when the same input was encoded before); every value
        must be finite (NumericalError naming the item otherwise)."""
        out = {k: [] for k in MEDIA_KINDS}
        m, sessions, cache = self.manifest, self.sessions, self.cache
        labels = {k: [lb for kind, lb in zip(prep.items, prep.labels) if kind == k] for k in MEDIA_KINDS}
        keys = {k: [content_key(k, prep.features[k][i], prep.grids[k][i] if k != "audio" else None) if cache.max_bytes
                    else None for i in range(len(prep.features[k]))] for k in MEDIA_KINDS}
        found = {k: [cache.get(key) if key else None for key in keys[k]] for k in MEDIA_KINDS}
        visual = [(k, i) for k in ("image", "video") for i in range(len(prep.features[k])) if found[k][i] is None]
        if visual:
            if "vision" not in sessions:
                raise InputError("this Guard was opened without the vision graph (SessionOptions.graphs)")
            t = time.perf_counter()
            session, vision_options = self.options.session, run_options
            if vision_options is None and not session.cpu_mem_arena and "vision" in session.exact_arena_graphs:
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
        for k in MEDIA_KINDS:
            out[k] = found[k]
        return out

    def embed(self, ids: list[int], feats: dict) -> np.ndarray:
        """[1, tokens, hidden]: the token embeddings of `ids` with each placeholder's row replaced by its encoder
        feature, in order; InputError when the counts differ."""
        ids_arr = np.asarray(ids, np.int64)
        embeds = np.asarray(self.embedding[ids_arr], dtype=np.float32)
        special = self.manifest.special_ids
        for kind in MEDIA_KINDS:
            where = np.flatnonzero(ids_arr == special[kind])
            have = sum(len(f) for f in feats[kind])
            if len(where) != have:
                raise InputError(f"{kind}: {len(where)} placeholder tokens but {have} encoder features")
            if have:
                embeds[where] = np.concatenate(feats[kind], axis=0)
        return embeds[None]
