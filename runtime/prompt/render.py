"""Fill the OmniGuard templates (the guard's user text) from a conversation, with our rules where the
official code is silent (README "Prompt rules")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError
from .policy import AGENT_TYPE, IMAGE_TEMPLATE, TEXT_TEMPLATE, Policy

# The template's own delimiters. Inside user content each gets a backslash before its "<", so user text
# can never open or close a block (our one escaping rule; tested in tests/test_prompt.py).
_DELIMITER = re.compile(r"<(?=\s*(?:BEGIN|END)\s+(?:UNSAFE\s+CONTENT\s+CATEGORIES|CONVERSATION)\s*>)", re.IGNORECASE)


def escape_content(text: str) -> str:
    return _DELIMITER.sub(r"\\<", text)


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
    def from_messages(cls, messages: list[str]) -> Conversation:
        """Multi-turn: messages alternate user, agent, user, ..."""
        if not messages:
            raise InputError("a conversation needs at least one message")
        turns = [Turn("user" if i % 2 == 0 else "agent", m) for i, m in enumerate(messages)]
        if len(turns) % 2:
            turns.append(Turn("agent", ""))
        return cls(tuple(turns))

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
