"""`Guard`: moderate text, images, video and audio from a bundle, torch-free, failing closed.

A request runs through stage modules: arguments.py (the API boundary and the size checks that need no decoding),
media.py (preprocessing within the memory budget, encoding through the encoder cache, merging into the prompt's
embeddings), the prompt package (the guard prompt's ids), memory.py (the request's plan), prefix.py (the policy
prefix's decoder cache), decode.py (the decoder), and verdict/ (the answer grammar, parsing, category scores and
the result). `Guard` wires them, and is the fail-closed boundary: any error is an `error` result.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from .arguments import SizeCheck, batch_list, batch_request, check_arguments, prompt_limit
from .bundle import Bundle, open_bundle, run_options_for
from .decode import SCORE_MARGIN, Decoder, FastDecoder
from .errors import BundleError, InputError, OmniGuardError
from .media import MediaStage
from .memory import Geometry, plan_request
from .options import GuardOptions
from .positions import RopeIds
from .prefix import PolicyPrefix
from .prompt import MEDIA_KINDS, Conversation, PromptTokenizer, compose_guard_text, template_kind
from .prompt.tokenize import Item
from .request import Request
from .verdict import Answer, AnswerTokens, ModerationResult, parse
from .verdict.scores import category_scores, reported_codes

# Names callers may hold from this module: importable from here before the stages moved out of it.
from .arguments import FORMS, text_slices  # noqa: E402,F401
from .bundle import SessionOptions  # noqa: E402,F401
from .memory import MemoryBudget  # noqa: E402,F401
from .preprocess.audio import AudioLimits  # noqa: E402,F401
from .preprocess.image import ImageLimits  # noqa: E402,F401
from .preprocess.video import VideoLimits  # noqa: E402,F401
from .prompt import Policy  # noqa: E402,F401

log = logging.getLogger(__name__)
KINDS = MEDIA_KINDS  # the old name


class Guard:
    def __init__(self, bundle: Bundle, options: GuardOptions = GuardOptions()):
        self.bundle, self.options = bundle, options
        m = bundle.manifest
        self.prompt = PromptTokenizer(bundle.tokenizer, bundle.chat_template)
        self.decoder = _decoder(bundle, options)
        self.geometry = Geometry.from_manifest(m)
        self.media = MediaStage(bundle, options, self.geometry)
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
        media_ids = {m.special_ids[k] for k in MEDIA_KINDS}
        self.prefixes = PolicyPrefix(self.decoder, self.embed_tokens, media_ids, self._probe_ids)  # docs/time-to-verdict.md "Time to verdict"
        self.size_check = SizeCheck(bundle.tokenizer, self.prompt)

    @classmethod
    def from_bundle(cls, path, options: GuardOptions = GuardOptions(), verify: str = "auto") -> Guard:
        return cls(open_bundle(path, options.session, verify=verify), options)

    @property
    def encoder_cache(self):
        """Features of media already seen, by content hash (GuardOptions.encoder_cache_bytes)."""
        return self.media.cache

    def prompt_ids(self, conversation: Conversation | None = None, kinds=(), tokens=()) -> list[int]:
        """The guard prompt's token ids for `conversation` (or None) and media items of `kinds` taking `tokens`
        placeholders each (docs/prompt.md "Prompt rules")."""
        text = compose_guard_text(conversation, list(kinds), self.options.policy)
        return self.prompt.encode([Item("text", text)] + [Item(k, tokens=n) for k, n in zip(kinds, tokens)])

    def _probe_ids(self, kind: str, text: str) -> list[int]:
        """A probe request of template `kind` for the prefix cache: `text` alone, or one image of one token."""
        return self.prompt_ids(Conversation.of(text)) if kind == "text" else self.prompt_ids(None, ["image"], [1])

    def prompt_limit(self) -> tuple[int, int]:
        """(token budget of the answer, the most prompt tokens allowed)."""
        return prompt_limit(self.options, self.bundle.manifest)

    def plan(self, prep, prompt_tokens: int, budget: int):
        """(the memory plan of a request of `prompt_tokens` with media `prep` and an answer budget, its run options),
        before any graph runs: MemoryBudgetError when it cannot fit."""
        plan = plan_request(self.geometry, prep.request_sizes(prompt_tokens, budget), self.options.memory)
        return plan, run_options_for(plan, self.options.session)

    def answer(self) -> Answer:
        """A new answer state for one request: the grammar, mode and threshold of the options."""
        opts = self.options
        codes = tuple(c.code for c in opts.policy.categories)
        # constrain_verdict without answer tokens was refused in __init__
        return Answer(self.answer_tokens, codes, opts.mode, float(opts.threshold), bool(opts.constrain_verdict),
                      self.prompt.decode)

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
            return _failed(exc, timings)

    def _moderate(self, text, response, image, audio, video, media, conversation, sample_rate, timings, start):
        return self.judge(self._prepare(timings, start, text, response, image, audio, video, media, conversation,
                                        sample_rate))

    def stream(self, text=None, *, conversation=None, image=None, audio=None, video=None, media=None,
               sample_rate=None, every: int | None = 64, sentences: bool = True, hysteresis: int = 1,
               span: int | None = None):
        """A stream that judges a reply while it arrives, after `text` (the prompt) or `conversation`, with any
        media (runtime/stream.py): `feed(chunk)` -> the checks it crossed, `check()`, `close()` -> the final
        result. Check points every `every` reply tokens, at sentence ends and at most `span` characters apart
        (runtime/checkpoints.py); `hysteresis` consecutive unsafe checks stop it. Arguments as `moderate`'s, checked
        now (an InputError, not an error result)."""
        from .stream import GuardStream

        return GuardStream(self, text, conversation, image, audio, video, media, sample_rate, every, sentences,
                           hysteresis, span)

    def judge(self, req: Request) -> ModerationResult:
        """Decode a prepared request (the verdict first, as the options' mode says) and build its result."""
        gen = self.decoder.generate(**req.generate_args(), embed_tokens=self.embed_tokens, eos_ids=self.eos_ids,
                                    min_new_tokens=self.options.min_new_tokens)
        return self._result(req, gen)

    def embed_tokens(self, tokens: list[int]) -> np.ndarray:
        """[n, hidden] token embeddings of `tokens` (the bundle's memory-mapped table)."""
        return np.asarray(self.bundle.embedding[np.asarray(tokens)], np.float32)

    def _prepare(self, timings, start, text=None, response=None, image=None, audio=None, video=None, media=None,
                 conversation=None, sample_rate=None) -> Request:
        """Everything before the decoder: arguments checked, media preprocessed and encoded, prompt ids,
        embeddings, positions, the memory plan and the cached prefix."""
        conv, media, sample_rate = check_arguments(text, response, image, audio, video, media, conversation,
                                                   sample_rate)
        budget, limit = self.prompt_limit()
        self.size_check(conv, media, limit)
        t = time.perf_counter()
        prep = self.media.prepare(media, sample_rate, limit)
        timings["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        ids = self.prompt_ids(conv, prep.items, prep.tokens)
        timings["prompt"] = time.perf_counter() - t
        if len(ids) > limit:
            raise InputError(f"prompt of {len(ids)} tokens exceeds the limit of {limit}: inputs are refused, "
                             "not truncated (shorten the text or lower media resolution)")
        plan, run_options = self.plan(prep, len(ids), budget)
        feats = self.media.encode(prep, timings, run_options)
        t = time.perf_counter()
        embeds = self.media.embed(ids, feats)
        positions, delta = prep.positions(ids, self.rope)
        timings["embed"] = time.perf_counter() - t
        state, reused = None, 0
        if self.options.prefix_cache:
            t = time.perf_counter()
            state, reused = self.prefixes.start(ids, template_kind(conv, prep.items), positions, delta, run_options,
                                                capacity=len(ids) + budget + SCORE_MARGIN)
            timings["prefix"] = time.perf_counter() - t
        timings["generate_start"] = time.perf_counter() - start
        return Request(ids, prep, embeds, positions, delta, budget, plan, run_options, state, reused, self.answer(),
                       timings, start)

    def _result(self, req: Request, gen) -> ModerationResult:
        timings, answer = req.timings, req.answer
        timings.update(gen.timings)
        if "verdict" in gen.timings:
            timings["verdict"] = timings["generate_start"] + gen.timings["verdict"]
        t = time.perf_counter()
        scores = category_scores(answer, gen.verdict_state, self.decoder, self.embed_tokens)
        if scores:
            timings["scores"] = time.perf_counter() - t
        raw = self.prompt.decode(gen.tokens)
        parsed = parse(raw, self.options.policy)
        verdict = answer.verdict if answer.constrain and answer.verdict else parsed.verdict
        codes = reported_codes(answer, parsed.categories, scores, self.options.category_thresholds) \
            if verdict == "unsafe" else []
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
            notes=req.prep.notes, vision_grids=[list(g) for g in req.prep.vision_grids()],
        )

    def moderate_batch(self, requests: list) -> list[ModerationResult]:
        """Judge several requests together; one result per request, in order, each what `moderate` would give
        for it alone (tokens equal; P(unsafe) within float rounding). Each request is a str (the prompt) or a
        dict of `moderate`'s keyword arguments. A request that fails (bad input, a non-finite number) gets its
        own `error` result; the others are judged.

        With the fast decoder graph, each request is prefilled on its own (from the cached prefix) and the decode
        steps of all of them run as one batch, each row at its own length and position; with the standard graph
        the requests run one after another."""
        requests = batch_list(requests)
        results: list[ModerationResult | None] = [None] * len(requests)
        prepared = []
        for i, item in enumerate(requests):
            timings, start = {}, time.perf_counter()
            try:
                kwargs = batch_request(i, item)
                if isinstance(self.decoder, FastDecoder):
                    prepared.append((i, self._prepare(timings, start, **kwargs)))
                else:
                    results[i] = self.moderate(**kwargs)
            except Exception as exc:  # fail closed, per request
                results[i] = _failed(exc, timings)
        try:
            gens = self.decoder.generate_batch([req.generate_args() for _, req in prepared], self.embed_tokens,
                                               self.eos_ids, self.options.min_new_tokens) if prepared else []
        except Exception as exc:  # the batch's decoder failed: every request in it is an error
            gens = [exc] * len(prepared)
        for (i, req), gen in zip(prepared, gens):
            try:
                results[i] = self._result(req, gen) if not isinstance(gen, Exception) else _failed(gen, req.timings)
            except Exception as exc:
                results[i] = _failed(exc, req.timings)
        return results


def _decoder(bundle: Bundle, options: GuardOptions) -> Decoder:
    """The bundle's decoder: the fast graph with its output layer, or the standard graph (its KV cache on the device
    when its session runs there). InputError when TensorRT engines were built for fewer new tokens than the mode's
    answer may take."""
    session = bundle.sessions["decoder"]
    profile = getattr(session, "profile", None)  # TensorRT engines: built for a budget of new tokens
    budget = options.answer_budget
    if profile is not None and budget > profile.limits["new_tokens"]:
        raise InputError(f"mode {options.mode!r} answers in up to {budget} tokens, but the TensorRT engines are "
                         f"for --new-tokens {profile.limits['new_tokens']}: build and open them with "
                         f"--new-tokens {budget}")
    if bundle.decoder_graph == "decoder_gqa":
        return FastDecoder(session, bundle.manifest.decoder, head=lambda: bundle.session("decoder_head"),
                           head_rows=bundle.head_rows)
    resident = options.session.kv_on_device
    resident = getattr(session, "device", "cpu") != "cpu" if resident is None else resident
    return Decoder(session, bundle.manifest.decoder, resident=resident)


def _failed(exc: BaseException, timings: dict) -> ModerationResult:
    """`verdict="error"` for `exc`; an unexpected failure (not an OmniGuardError) is logged with its traceback."""
    if not isinstance(exc, OmniGuardError):
        try:
            log.exception("moderation failed")
        except Exception:  # noqa: S110 (a caller's exception that cannot even be logged is still an error)
            pass
    return ModerationResult.failed(exc, timings)
