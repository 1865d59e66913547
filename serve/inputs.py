"""Requests of the service as the Guard's requests, and its results as OpenAI-shaped ones. No web framework here:
plain JSON values in, `InputError` naming the field out, so every rule is testable on its own.

OpenAI's moderation `input`: a string, an array of strings (one result each), or an array of parts (one result):
`{"type": "text", "text": ...}` and `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`.
Our extension, in the shape of OpenAI's chat parts: `{"type": "input_audio", "input_audio": {"data": BASE64,
"format": "wav"}}` and `{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`. Media come as
data only: the service never fetches a URL (an http(s) URL is refused, saying so).
"""

from __future__ import annotations

import base64
import binascii
import re

from ..runtime.errors import InputError
from ..runtime.prompt.policy import DEFAULT_CATEGORIES

MAX_INPUTS = 32  # strings in one `input` array
MAX_PARTS = 16  # parts in one multimodal `input`
MAX_TURNS = 64  # turns in one /v1/guard conversation

# S-codes (the default policy: Llama Guard 3's S1-S12) -> OpenAI's moderation categories. A category is flagged
# when any of its codes is among the result's violated categories; its score is the largest of their scores.
# S6 Specialized Advice, S7 Privacy and S8 Intellectual Property have no OpenAI category: they flag the result and
# appear in `omniguard.categories`, not in `categories`.
OPENAI_CATEGORIES = {
    "harassment": ("S5",), "harassment/threatening": (), "hate": ("S10",), "hate/threatening": (),
    "illicit": ("S2",), "illicit/violent": ("S1", "S9"), "self-harm": ("S11",), "self-harm/intent": (),
    "self-harm/instructions": (), "sexual": ("S3", "S12"), "sexual/minors": ("S4",), "violence": ("S1",),
    "violence/graphic": (),
}
CODES = tuple(c.code for c in DEFAULT_CATEGORIES)
MODES = ("verdict", "categories", "full")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)",
                       re.DOTALL)


def decode_data_url(url, field: str, kind: str) -> bytes:
    """The bytes of a base64 data URL; InputError naming `field` for anything else (a fetchable URL included)."""
    if not isinstance(url, str):
        raise InputError(f"{field} must be a string (a data URL), got {type(url).__name__}")
    if re.match(r"(?i)https?://", url):
        raise InputError(f"{field}: the service never fetches URLs; send the {kind} itself as a data URL "
                         f"(data:{'image/png' if kind == 'image' else 'video/mp4'};base64,...)")
    m = _DATA_URL.fullmatch(url)
    if m is None or not m.group("b64"):
        raise InputError(f"{field} must be a base64 data URL (data:<type>;base64,<data>), got {url[:40]!r}")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith(f"{kind}/"):
        raise InputError(f"{field}: a data URL of type {mime} where a {kind} is expected")
    return decode_base64(m.group("data"), field)


def decode_base64(data, field: str) -> bytes:
    if not isinstance(data, str):
        raise InputError(f"{field} must be a base64 string, got {type(data).__name__}")
    try:
        out = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{field}: not valid base64 ({exc})") from None
    if not out:
        raise InputError(f"{field}: empty")
    return out


def _part(part, field: str, texts: list, media: list) -> None:
    if not isinstance(part, dict):
        raise InputError(f"{field} must be an object with a type, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(f"{field}.text must be a string")
        texts.append(text)
    elif kind == "image_url":
        inner = part.get("image_url")
        url = inner.get("url") if isinstance(inner, dict) else inner
        media.append(("image", decode_data_url(url, f"{field}.image_url.url", "image")))
    elif kind == "video_url":
        inner = part.get("video_url")
        url = inner.get("url") if isinstance(inner, dict) else inner
        media.append(("video", decode_data_url(url, f"{field}.video_url.url", "video")))
    elif kind == "input_audio":
        inner = part.get("input_audio")
        if not isinstance(inner, dict):
            raise InputError(f"{field}.input_audio must be an object with data (base64) and format")
        media.append(("audio", decode_base64(inner.get("data"), f"{field}.input_audio.data")))
    else:
        raise InputError(f"{field}.type must be text, image_url, input_audio or video_url, not {kind!r}")


def moderation_requests(body) -> list[dict]:
    """The Guard requests (moderate's keyword arguments) of an OpenAI moderation body."""
    if not isinstance(body, dict):
        raise InputError(f"the body must be a JSON object with `input`, got {type(body).__name__}")
    value = body.get("input")
    if isinstance(value, str):
        return [{"text": value}]
    if not isinstance(value, list) or not value:
        raise InputError("input must be a string, a non-empty array of strings, or a non-empty array of parts")
    if all(isinstance(v, str) for v in value):
        if len(value) > MAX_INPUTS:
            raise InputError(f"input: {len(value)} strings, more than the {MAX_INPUTS} one request may hold")
        return [{"text": v} for v in value]
    if len(value) > MAX_PARTS:
        raise InputError(f"input: {len(value)} parts, more than the {MAX_PARTS} one request may hold")
    texts: list[str] = []
    media: list = []
    for i, part in enumerate(value):
        _part(part, f"input[{i}]", texts, media)
    request = {"text": "\n".join(texts)} if texts else {}
    if media:
        request["media"] = media
    if not request:
        raise InputError("input: no text and no media")
    return [request]


def guard_request(body) -> tuple[dict, str, tuple[str, ...] | None]:
    """(the Guard request, mode, policy codes or None) of a native /v1/guard body:
    {"prompt"?, "response"?, "conversation"?: [str], "media"?: [{"kind": image|audio|video, "data": BASE64}],
     "categories"?: ["S1", ...], "mode"?: verdict|categories|full}."""
    if not isinstance(body, dict):
        raise InputError(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"prompt", "response", "conversation", "media", "categories", "mode"})
    if unknown:
        raise InputError(f"unknown field(s) {unknown}: prompt, response, conversation, media, categories, mode")
    request: dict = {}
    for name, key in (("prompt", "text"), ("response", "response")):
        if body.get(name) is not None:
            if not isinstance(body[name], str):
                raise InputError(f"{name} must be a string")
            request[key] = body[name]
    if body.get("conversation") is not None:
        conv = body["conversation"]
        if not isinstance(conv, list) or len(conv) > MAX_TURNS or not all(isinstance(t, str) for t in conv):
            raise InputError(f"conversation must be an array of at most {MAX_TURNS} strings (user, agent, user, ...)")
        request["conversation"] = conv
    media = body.get("media") or []
    if not isinstance(media, list) or len(media) > MAX_PARTS:
        raise InputError(f"media must be an array of at most {MAX_PARTS} objects {{kind, data}}")
    items = []
    for i, item in enumerate(media):
        if not isinstance(item, dict) or item.get("kind") not in ("image", "audio", "video"):
            raise InputError(f"media[{i}] must be an object with kind (image, audio or video) and data (base64)")
        items.append((item["kind"], decode_base64(item.get("data"), f"media[{i}].data")))
    if items:
        request["media"] = items
    mode = body.get("mode", "categories")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    codes = body.get("categories")
    if codes is not None:
        if not isinstance(codes, list) or not codes or not all(isinstance(c, str) and c in CODES for c in codes) \
                or len(set(codes)) != len(codes):
            raise InputError(f"categories must be a non-empty array of distinct codes among {', '.join(CODES)}")
        codes = tuple(codes)
    if not request:
        raise InputError("nothing to judge: give prompt, response, conversation or media")
    return request, mode, codes


def openai_result(result, timings: bool = True) -> dict:
    """One `results[]` entry: flagged, categories, category_scores (OPENAI_CATEGORIES), and ours under `omniguard`.
    Fail closed: a result that is not `safe` is flagged, an error or an unparsed answer with an `error` saying why.
    `timings`: the Guard's stage timings under `omniguard` (the service leaves them out unless configured)."""
    violated = {c["code"] for c in result.categories}
    scores = result.category_scores or {}
    flagged = result.verdict != "safe"
    out = {"flagged": flagged,
           "categories": {name: any(c in violated for c in codes) for name, codes in OPENAI_CATEGORIES.items()},
           "category_scores": {name: max((float(scores.get(c, 0.0)) for c in codes), default=0.0)
                               for name, codes in OPENAI_CATEGORIES.items()},
           "omniguard": {"verdict": result.verdict, "categories": sorted(violated, key=lambda c: int(c[1:])),
                         "p_unsafe": result.p_unsafe, "category_scores": scores, "mode": result.mode,
                         **({"timings": result.timings} if timings else {})}}
    if result.verdict in ("error", "unknown"):
        out["error"] = result.error or "the guard's answer could not be parsed: treated as unsafe"
    return out
