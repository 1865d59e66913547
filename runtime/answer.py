"""The answer grammar's old module name (`omniguard_edge.runtime.answer`), kept for code that imports it from here:
the grammar lives in runtime/verdict/grammar.py, the category scores in runtime/verdict/scores.py."""

from .verdict.grammar import (CATEGORIES_LEAD, LABELLED, LABELLED_LEAD, LINE_CHARS, MODES, PLAIN,  # noqa: F401
                              Answer, AnswerTokens, CodeLine)
from .verdict.scores import first_code_probabilities  # noqa: F401
