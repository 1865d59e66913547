"""Fill the OmniGuard templates (the guard's user text) from a conversation, with our rules where the
official code is silent (docs/prompt.md "Prompt rules")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError
from .normalize import escape_structure
from .policy import AGENT_TYPE, IMAGE_TEMPLATE, TEXT_TEMPLATE, Policy


def escape_content(text: str) -> str:
    """One turn's content with its structure escaped (our one escaping rule, `normalize.escape_structure`):
    the template's delimiters (any bracket or none, any separators, OF/THE fillers) and role labels with
    nothing alphanumeric before them on their line (the start of the content counts), matched on a
    normalised view (NFKC, invisible characters removed, confusables folded), get a backslash run before
    their bracket / first letter that is odd in the original and on the view, inserted into the original
    text. User text can never open or close a block or start a turn (tests/test_prompt.py,
    tests/test_injection.py)."""
    return escape_structure(text)


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "agent"
    text: str


@dataclass(frozen=True)
class Conversation:
    """Turns alternate User/Agent starting with the user; a prompt-only check has one user turn and
    gets an empty Agent turn, as the official code renders it."""

    turns: tuple[Turn, ...]

    @classmethod
    def of(cls, prompt: str = "", response: str | None = None) -> Conversation:
        turns = [Turn("user", prompt)]
        turns.append(Turn("agent", response if response is not None else ""))
        return cls(tuple(turns))

    @classmethod
    def of_optional(cls, prompt: str | None = None, response: str | None = None) -> Conversation | None:
        """`of(prompt or "", response)`, or None when neither is given (a media-only check)."""
        return None if prompt is None and response is None else cls.of(prompt or "", response)

    @classmethod
    def from_messages(cls, messages: list[str]) -> Conversation:
        """Multi-turn: messages alternate user, agent, user, ..."""
        if not messages:
            raise InputError("a conversation needs at least one message")
        turns = [Turn("user" if i % 2 == 0 else "agent", m) for i, m in enumerate(messages)]
        if len(turns) % 2:
            turns.append(Turn("agent", ""))
        return cls(tuple(turns))

    def has_content(self) -> bool:
        """True when any turn holds a non-whitespace character (whitespace-only text counts as no text)."""
        return any(t.text.strip() for t in self.turns)

    def render(self) -> str:
        """'{Role}: {content}\\n\\n' per message, the whole stripped."""
        out = "".join(f"{'User' if t.role == 'user' else AGENT_TYPE}: {escape_content(t.text)}\n\n" for t in self.turns)
        return out.strip()


def render_guard_text(conversation: Conversation | None, policy: Policy, image_only: bool = False) -> str:
    """The text item of the guard's user turn. `image_only`: the image template (an image with no text)."""
    if image_only:
        return IMAGE_TEMPLATE.format(policies=policy.render())
    if conversation is None:
        raise InputError("a text check needs a conversation")
    return TEXT_TEMPLATE.format(agent_type=AGENT_TYPE, policies=policy.render(), conversation=conversation.render())


MEDIA_KINDS = ("image", "video", "audio")  # also the order of keyword media: images, videos, audios


def compose_guard_text(conversation: Conversation | None, media_kinds: Sequence[str], policy: Policy) -> str:
    """The guard's text item for one request: the one place that picks the template (docs/prompt.md "Prompt rules").

    `conversation`: the text to judge, or None; `media_kinds`: the kinds of the media items that follow the
    text, in prompt order ("image", "video", "audio"); `policy`: the categories shown.

    - Text means at least one non-whitespace character in some turn. Any text selects the text template with
      that conversation (content is never dropped, whatever media come with it).
    - No text (None, empty or whitespace-only turns) and only images: the image template.
    - No text with audio or video among the media: the text template with an empty prompt
      (`Conversation.of("")`), so "", "  " and None give the same prompt.
    - No text and no media: InputError (nothing to moderate).
    """
    if conversation is not None and not isinstance(conversation, Conversation):
        raise InputError(f"conversation must be a Conversation or None, got {type(conversation).__name__}")
    if not isinstance(policy, Policy):
        raise InputError(f"policy must be a Policy, got {type(policy).__name__}")
    if isinstance(media_kinds, str) or not isinstance(media_kinds, Sequence):
        raise InputError(f"media_kinds must be a sequence of kinds such as ['image'], got {media_kinds!r}")
    unknown = [k for k in media_kinds if k not in MEDIA_KINDS]
    if unknown:
        raise InputError(f"media_kinds holds {unknown!r}: each kind is one of {', '.join(MEDIA_KINDS)}")
    if conversation is not None and conversation.has_content():
        return render_guard_text(conversation, policy)
    if not media_kinds and conversation is None:
        raise InputError("nothing to moderate: give text, a response, a conversation or media")
    if template_kind(conversation, media_kinds) == "image":
        return render_guard_text(None, policy, image_only=True)
    return render_guard_text(Conversation.of(""), policy)


def template_kind(conversation: Conversation | None, media_kinds: Sequence[str]) -> str:
    """"image" when the request has no text and only images (the image template), else "text" (the rule of
    `compose_guard_text`; the policy-prefix cache keeps one prefix per kind)."""
    has_text = conversation is not None and conversation.has_content()
    return "image" if media_kinds and not has_text and all(k == "image" for k in media_kinds) else "text"


def _as_list(value) -> list:
    """One item or a list of items (a tuple is one item: a video given as (frames, fps))."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def keyword_media(image=None, video=None, audio=None) -> list[tuple[str, object]]:
    """Media given as keyword arguments (each one item or a list), as (kind, payload) in prompt order:
    images, then videos, then audios."""
    return [("image", x) for x in _as_list(image)] + [("video", x) for x in _as_list(video)] + \
           [("audio", x) for x in _as_list(audio)]
