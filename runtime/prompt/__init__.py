"""The guard prompt: OmniGuard's templates and policy, conversation rendering, and tokenization that
keeps user content as data (docs/prompt.md "Prompt rules")."""

from .normalize import CONFUSABLES, escape_structure, normalized_view  # noqa: F401
from .policy import DEFAULT_CATEGORIES, Category, Policy  # noqa: F401
from .render import (  # noqa: F401
    MEDIA_KINDS, Conversation, Turn, compose_guard_text, escape_content, keyword_media, render_guard_text,
    template_kind,
)
from .tokenize import PromptTokenizer  # noqa: F401
