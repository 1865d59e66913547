"""The verdict in one room: the answer grammar the decoder is constrained by (`grammar`), the parsing of the answer
text (`parse`), the category scores and the codes a result reports (`scores`), and the result (`result`)."""

from .grammar import (CATEGORIES_LEAD, LABELLED_LEAD, MODES, Answer, AnswerTokens, CodeLine)  # noqa: F401
from .parse import Parsed, parse  # noqa: F401
from .result import VERDICTS, ModerationResult  # noqa: F401
