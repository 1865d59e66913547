"""The guard prompt: OmniGuard's templates and policy, conversation rendering, and tokenization that
keeps user content as data (DESIGN "Our rules")."""

from .policy import DEFAULT_CATEGORIES, Category, Policy  # noqa: F401
from .render import Conversation, Turn, escape_content, render_guard_text  # noqa: F401
from .tokenize import PromptTokenizer  # noqa: F401
