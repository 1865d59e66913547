"""User content cannot forge the guard prompt's structure (README "Prompt rules", "User content is data").

The guard prompt is rendered `User: ...\\n\\nAgent: ...` between `<BEGIN CONVERSATION>` and `<END CONVERSATION>`.
Two kinds of structure inside user content are escaped:

- the template's delimiters: `<`, optional spaces, BEGIN or END, then CONVERSATION or UNSAFE CONTENT CATEGORIES
  (any case; spaces, `_` or `-` or nothing between the words; the closing `>` optional);
- role labels at a line start: `User` or `Agent` then `:`, any case, with spaces or tabs before the label and
  before the colon. A line starts at the start of a turn's content and after any line break (`\\n`, `\\r`, `\\v`,
  `\\f`, U+001C-U+001E, U+0085, U+2028, U+2029).

Both are matched on a **normalised view** of the content (`normalized_view`), never on the raw text:
each character is taken in its compatibility decomposition (NFKD, i.e. what NFKC maps it to, before
recomposition), invisible characters are removed (format characters, category Cf: U+200B-U+200F, U+2060-U+2064,
U+FEFF, U+00AD, bidi controls, tag characters...; combining marks, Mn/Me, so accents and variation selectors do
not hide a letter; Hangul fillers; control characters that are not whitespace), and `CONFUSABLES` folds
Cyrillic, Greek, Armenian and small-capital look-alikes of the letters of the delimiters and labels, and
look-alikes of `<`, `>`, `:` and `\\`, to their ASCII forms (fullwidth and mathematical letters are handled by
the NFKC mapping itself).

**The escape** is inserted into the ORIGINAL text at the matched position (before the delimiter's `<`, before
the label's first letter); nothing of the user's text is deleted or normalised in what the model sees. It is an
odd run of backslashes directly before the match: where the content already holds k backslashes there
(counted on the normalised view), k + 1 more are inserted, so the run becomes 2k + 1. Content can therefore
never bring an even run, which would read as escaped backslashes followed by a live label or delimiter
(`\\\\User:` is not a way to undo the escape: it becomes `\\\\\\User:`), and the original is recoverable
(a run of 2k + 1 before a match stands for k).
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from collections.abc import Sequence
from functools import lru_cache

# Look-alikes of the characters the delimiters and role labels are made of, folded to ASCII. Letters: those of
# BEGIN, END, CONVERSATION, UNSAFE, CONTENT, CATEGORIES, User, Agent (A B C D E F G I N O R S T U V, both cases).
_LETTERS = {
    "A": "\u0391\u0410\u1D00",             # Greek Alpha, Cyrillic A, small capital A
    "a": "\u0430\u03B1\u0251",             # Cyrillic a, Greek alpha, Latin alpha
    "B": "\u0392\u0412\u0299",             # Greek Beta, Cyrillic Ve, small capital B
    "b": "\u042C\u0432\u13CF",             # Cyrillic soft sign, Cyrillic ve, Cherokee
    "C": "\u03F9\u0421\u1D04",             # Greek lunate Sigma, Cyrillic Es, small capital C
    "c": "\u03F2\u0441",                   # Greek lunate sigma, Cyrillic es
    "D": "\u13A0\u1D05",                   # Cherokee A, small capital D
    "d": "\u0501",                         # Cyrillic komi de
    "E": "\u0395\u0415\u1D07",             # Greek Epsilon, Cyrillic Ie, small capital E
    "e": "\u0435\u04BD",                   # Cyrillic ie, Cyrillic abkhasian che
    "F": "\u03DC\uA730",                   # Greek Digamma, small capital F
    "G": "\u050C\u0262",                   # Cyrillic komi sje, small capital G
    "g": "\u0261\u050D",                   # Latin script g, Cyrillic komi sje
    "I": "\u0399\u0406\u04C0\u026A",       # Greek Iota, Cyrillic I (Ukrainian), Cyrillic palochka, small capital I
    "i": "\u0456\u03B9\u0131\u0269",       # Cyrillic i, Greek iota, dotless i, Latin iota
    "N": "\u039D\u0274",                   # Greek Nu, small capital N
    "n": "\u0578\u057C",                   # Armenian vo, Armenian ra
    "O": "\u039F\u041E\u0555\u1D0F",       # Greek Omicron, Cyrillic O, Armenian Oh, small capital O
    "o": "\u03BF\u043E\u0585\u03C3",       # Greek omicron, Cyrillic o, Armenian oh, Greek sigma
    "R": "\u13A1\u0280",                   # Cherokee E, small capital R
    "r": "\u0433\u1D26",                   # Cyrillic ghe, small capital Gamma
    "S": "\u0405\u054F\uA731",             # Cyrillic Dze, Armenian Tiwn, small capital S
    "s": "\u0455",                         # Cyrillic dze
    "T": "\u03A4\u0422\u1D1B",             # Greek Tau, Cyrillic Te, small capital T
    "t": "\u03C4",                         # Greek tau
    "U": "\u054D\u1D1C",                   # Armenian Seh, small capital U
    "u": "\u057D\u03C5\u028B",             # Armenian seh, Greek upsilon, Latin v with hook
    "V": "\u0474\u2164",                   # Cyrillic Izhitsa, Roman numeral five (NFKC gives V too)
    "v": "\u0475\u03BD",                   # Cyrillic izhitsa, Greek nu
    # brackets of the delimiters, the labels' colon, and the escape character itself
    "<": "\u2039\u27E8\u2329\u3008\u276E\u276C\u2770\u1438\u02C2\u00AB\u300A\uFE64\uFF1C\u2264\u227A",
    ">": "\u203A\u27E9\u232A\u3009\u276F\u276D\u2771\u1433\u02C3\u00BB\u300B\uFE65\uFF1E\u2265\u227B",
    ":": "\u2236\uA789\u02F8\u05C3\u0589\u1361\u0703\u0704\uFE13\uFE55\uFF1A\u02D0",
    "\\": "\u29F5\u29F9\uFE68\uFF3C\u2216",
}
CONFUSABLES: dict[str, str] = {src: dst for dst, sources in _LETTERS.items() for src in sources}

_HANGUL_FILLERS = "\u115F\u1160\u3164\uFFA0"
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_LB = re.escape(LINE_BREAKS)
_HWS = rf"[^\S{_LB}]"  # horizontal whitespace: whitespace that does not break the line

# On the normalised view. Both patterns start at the character the escape goes before; what precedes a match
# (its backslash run, the line start) is read by walking back from it, so the scan stays linear in the text
# (a lookbehind-free regex with a lazy prefix is quadratic on long runs of newlines or backslashes).
_DELIMITER = re.compile(r"<\s*(?:BEGIN|END)[\s_-]*(?:UNSAFE[\s_-]*CONTENT[\s_-]*CATEGORIES|CONVERSATION)",
                        re.IGNORECASE)
_ROLE = re.compile(rf"(?:USER|AGENT){_HWS}*:", re.IGNORECASE)


def _invisible(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return (cat in ("Cf", "Mn", "Me") or ch in _HANGUL_FILLERS or (cat == "Cc" and not ch.isspace()))


@lru_cache(maxsize=4096)
def fold_char(ch: str) -> str:
    """What one character contributes to the normalised view ("" for an invisible one)."""
    if ch in CONFUSABLES:
        return CONFUSABLES[ch]
    return "".join(CONFUSABLES.get(c, c) for c in unicodedata.normalize("NFKD", ch) if not _invisible(c))


_ASCII_INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")  # ASCII controls that are not whitespace


def _plain(text: str) -> bool:
    """ASCII with no invisible control character: its normalised view is itself."""
    return text.isascii() and not _ASCII_INVISIBLE.search(text)


def normalized_view(text: str) -> tuple[str, Sequence[int] | None]:
    """The normalised view of `text` and, for each of its characters, the offset in `text` of the character it
    came from (None when the view is `text` itself; a compact integer array otherwise)."""
    if _plain(text):
        return text, None
    out, origin = [], array("q")
    for i, ch in enumerate(text):
        folded = fold_char(ch)
        if len(folded) == 1:
            origin.append(i)
        elif folded:
            origin.extend([i] * len(folded))
        out.append(folded)
    return "".join(out), origin


def _run_before(view: str, at: int) -> int:
    """How many backslashes stand directly before `at`."""
    start = at
    while start and view[start - 1] == "\\":
        start -= 1
    return at - start


def _at_line_start(view: str, at: int) -> bool:
    """Only spaces, tabs and backslashes between `at` and the start of its line (or of the text)."""
    while at and view[at - 1] not in LINE_BREAKS and (view[at - 1] == "\\" or view[at - 1].isspace()):
        at -= 1
    return at == 0 or view[at - 1] in LINE_BREAKS


def structure_matches(view: str) -> list[tuple[int, int]]:
    """(position in the view, backslashes already before it) for every delimiter and line-start role label."""
    found = [m.start() for m in _DELIMITER.finditer(view)]
    found += [m.start() for m in _ROLE.finditer(view) if _at_line_start(view, m.start())]
    return [(at, _run_before(view, at)) for at in sorted(found)]


def escape_structure(text: str) -> str:
    """`text` with every delimiter and line-start role label escaped (module docstring): k + 1 backslashes
    inserted into the original text directly before each match that has k backslashes before it."""
    view, origin = normalized_view(text)
    matches = structure_matches(view)
    if not matches:
        return text
    pieces, last = [], 0
    for at, run in matches:
        pos = at if origin is None else origin[at]
        pieces += [text[last:pos], "\\" * (run + 1)]
        last = pos
    pieces.append(text[last:])
    return "".join(pieces)
