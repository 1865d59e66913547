"""The API boundary of `Guard.moderate`: every argument checked before any file is opened or any graph runs, and
the checks on a request's size that need no decoding (the prompt limit, text and media that cannot fit it).
An InputError names the parameter and what it accepts."""

from __future__ import annotations

import os
import re

import numpy as np

from .errors import InputError, describe
from .preprocess.audio import MAX_RATE, MIN_RATE, check_sample_rate
from .preprocess.video import MAX_FPS, check_fps
from .prompt import MEDIA_KINDS, Conversation

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


def type_name(value) -> str:
    return type(value).__name__


def as_text(name: str, value, optional: bool = True) -> str | None:
    """str as is, UTF-8 bytes decoded; anything else (or invalid UTF-8, or lone surrogates) is an InputError."""
    if value is None and optional:
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{name} is not valid UTF-8 ({exc}); {name} must be {_TEXT_FORM}") from exc
    if not isinstance(value, str):
        raise InputError(f"{name} must be {_TEXT_FORM}, got {type_name(value)}")
    value = str.__str__(value)  # a plain str: a subclass's overridden methods are never called
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates (e.g. from a surrogate-escaped argv)
        raise InputError(f"{name} is not valid Unicode: a lone surrogate at index {exc.start}; "
                         f"{name} must be {_TEXT_FORM}") from exc
    return value


def _check_conversation(text, response, conversation) -> Conversation | None:
    text, response = as_text("text", text), as_text("response", response)
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
                         f"got {type_name(conversation)}{hint}")
    conversation = listed("conversation", conversation, f"a list (or tuple) of turns, each {_TEXT_FORM}")
    if not conversation:
        raise InputError(f"conversation must hold at least one turn (a list of {_TEXT_FORM})")
    return Conversation.from_messages([as_text(f"conversation[{i}]", t, optional=False)
                                       for i, t in enumerate(conversation)])


def listed(name: str, value, form: str) -> list:
    """A caller's list or tuple (or subclass) as a plain list; one whose iteration fails is an InputError."""
    try:
        return list(tuple.__iter__(value) if isinstance(value, tuple) else list.__iter__(value))
    except Exception as exc:
        raise InputError(f"{name} must be {form}; reading the {type_name(value)} given failed ({describe(exc)})") \
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
                             f"got {type_name(frames)}")
        return frames, check_fps(fps, f"{label}: fps")
    if hasattr(value, "read") and not isinstance(value, type):
        return value  # a file object: runtime/preprocess checks it is binary, readable and regular
    hint = f" (give several {kind}s as a list)" if isinstance(value, tuple) else ""
    raise InputError(f"{label} must be {FORMS[kind]}; got {type_name(value)}{hint}")


def _keyword_items(kind: str, value) -> list[tuple[str, str, object]]:
    """image=/audio=/video=: one item or a list of items -> (kind, label, item)."""
    if value is None:
        return []
    if not isinstance(value, list):
        return [(kind, kind, value)]
    value = listed(kind, value, f"one item or a list of items, each {FORMS[kind]}")
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
            raise InputError(f"{MEDIA_FORM}; got {type_name(media)}")
        media = listed("media", media, "a list of (kind, item) pairs")
        items = []
        for i, pair in enumerate(media):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InputError(f"media[{i}] must be a (kind, item) pair; {MEDIA_FORM}")
            kind, value = pair
            if not isinstance(kind, str) or kind not in MEDIA_KINDS:
                raise InputError(f"media[{i}]: unknown media kind {kind!r}: use 'image', 'video' or 'audio'")
            items.append((kind, f"media[{i}] ({kind})", value))
    else:  # images, then videos, then audios (docs/prompt.md "Prompt rules"; MEDIA_KINDS is that order)
        items = [it for kind in MEDIA_KINDS for it in _keyword_items(kind, keywords[kind])]
    checked = []
    for kind, label, value in items:
        try:
            checked.append((kind, label, _check_item(kind, label, value)))
        except InputError:
            raise
        except Exception as exc:  # a caller's object that fails even to be inspected (a raising __getattr__ ...)
            raise InputError(f"{label} must be {FORMS[kind]}; inspecting the {type_name(value)} given failed "
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


REQUEST_ARGUMENTS = ("text", "response", "image", "audio", "video", "media", "conversation", "sample_rate")


def batch_list(requests) -> list:
    """`moderate_batch`'s argument: a list (or tuple) of requests, else an InputError for the whole call."""
    if not isinstance(requests, (list, tuple)):
        raise InputError(f"requests must be a list of requests (each a str or a dict of moderate's keyword "
                         f"arguments), got {type_name(requests)}")
    return listed("requests", requests, "a list of requests")


def batch_request(i: int, item) -> dict:
    """One request of `moderate_batch`: a str (the prompt) or a dict of `moderate`'s keyword arguments -> those
    arguments; anything else, or an unknown argument, is an InputError naming requests[i]."""
    if isinstance(item, (str, bytes, bytearray)):
        return {"text": item}
    if isinstance(item, dict):
        unknown = sorted(str(k) for k in item if k not in REQUEST_ARGUMENTS)
        if unknown:
            raise InputError(f"requests[{i}]: unknown argument(s) {unknown}; a request dict takes "
                             f"{', '.join(sorted(REQUEST_ARGUMENTS))}")
        return dict(item)
    raise InputError(f"requests[{i}] must be a str (the prompt) or a dict of moderate's keyword arguments, got "
                     f"{type_name(item)}")


def prompt_limit(options, manifest) -> tuple[int, int]:
    """(token budget of the answer, the most prompt tokens allowed) for GuardOptions `options`."""
    budget = options.answer_budget
    context = manifest.decoder.max_position_embeddings
    # max_prompt_tokens may lower the limit, never raise it past the context: positions beyond it are
    # outside what the decoder was trained on, so a prompt there is refused, not judged
    limit = min(options.max_prompt_tokens or context, context - budget)
    if limit < 1:
        raise InputError(f"GuardOptions: a token budget of {budget} leaves no room for a prompt in the "
                         f"decoder's context of {context} tokens (lower max_new_tokens / critique_max_new_tokens)")
    return budget, limit


class SizeCheck:
    """Refuses requests that cannot fit the prompt limit before any work (a 1 GB string must not be tokenized,
    nor 10,000 images decoded, to learn that): every media item takes at least 3 prompt tokens (its start, one
    placeholder, its end), every turn at least one (its role label), and text no fewer tokens than its UTF-8
    bytes / (_SHRINK x the longest token)."""

    def __init__(self, tokenizer, prompt):
        self.tokenizer, self.prompt = tokenizer, prompt  # the bundle's tokenizer, its PromptTokenizer
        self._token_bytes: int | None = None  # UTF-8 bytes of the longest vocabulary entry, built on first use

    def max_text_bytes(self, limit: int) -> int:
        """The most UTF-8 bytes of text that `limit` prompt tokens could hold (_SHRINK x the longest token each)."""
        if self._token_bytes is None:
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            self._token_bytes = max(len(k.encode("utf-8")) for k in vocab)
        return _SHRINK * self._token_bytes * limit

    def __call__(self, conv: Conversation | None, media: list, limit: int) -> None:
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
        most = self.max_text_bytes(limit)
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
