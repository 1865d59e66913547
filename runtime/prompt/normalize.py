"""User content cannot forge the guard prompt's structure (docs/prompt.md "Prompt rules", "User content is data").

The guard prompt is rendered `User: ...\\n\\nAgent: ...` between `<BEGIN CONVERSATION>` and `<END CONVERSATION>`.
Two kinds of structure inside user content (and inside custom policy names and descriptions) are escaped:

- the template's delimiters: BEGIN or END (not inside a word), optional filler words OF / THE, then CONVERSATION
  or UNSAFE CONTENT CATEGORIES; any case, any non-alphanumeric separators (or none) between the words, any
  bracket or none around them (`<END CONVERSATION>`, `[END OF THE CONVERSATION]`, `END.CONVERSATION`...);
- role labels heading a line: `User` or `Agent`, then any non-alphanumeric characters, then `:`, any case, with
  only non-alphanumeric characters before the label on its line (spaces, markdown `**` `-` `>` `#` `_`, blank
  glyphs like U+2800, backslashes...). A line starts at the start of the content and after any line break
  (`\\n`, `\\r`, `\\v`, `\\f`, U+001C-U+001E, U+0085, U+2028, U+2029).

Both are matched on a **normalised view** of the content (`normalized_view`), never on the raw text:
each character is taken in its compatibility decomposition (NFKD, i.e. what NFKC maps it to, before
recomposition), invisible characters are removed (format characters, category Cf: U+200B-U+200F, U+2060-U+2064,
U+FEFF, U+00AD, bidi controls, tag characters...; combining marks, Mn/Me, so accents and variation selectors do
not hide a letter; Hangul fillers; control characters that are not whitespace), and `CONFUSABLES` folds
look-alikes of the letters of the delimiters and labels (Cyrillic, Greek, Armenian, Coptic, Cherokee, Lisu,
Canadian syllabics, small capitals, symbols; the digits 0 and 1 and lowercase l for O and I), and look-alikes
of `<`, `>`, `:` and `\\`, to their ASCII forms (fullwidth and mathematical letters are handled by the NFKC
mapping itself).

**The escape** is inserted into the ORIGINAL text at the matched position (before a delimiter's opening
bracket, or its first word when it has none; before the label's first letter); nothing of the user's text is
deleted or normalised in what the model sees. It is a run of backslashes directly before the match that is odd
in both readings: in the original text (the k ASCII backslashes directly before the position: k + 1 are
inserted, making 2k + 1) and on the normalised view (where look-alikes of `\\` count and invisible characters
are skipped: when that run has the other parity, one more backslash goes before the run's first character).
Content can therefore never bring an even run, which would read as escaped backslashes followed by a live label
or delimiter (`\\\\User:` becomes `\\\\\\User:`; `＼User:` becomes `\\＼\\User:`).
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from collections.abc import Sequence
from functools import lru_cache

# Look-alikes of the characters the delimiters and role labels are made of, folded to ASCII. Letters: those of
# BEGIN, END, OF, THE, CONVERSATION, UNSAFE, CONTENT, CATEGORIES, User, Agent (A B C D E F G H I N O R S T U V,
# both cases), from Cyrillic, Greek, Armenian, Coptic, Cherokee, Lisu, Canadian syllabics, small capitals and
# symbols. Digits that stand in for letters (0 for O, 1 for I) and lowercase l for I are folded too: the view
# is only matched, never shown, and none of the structure words holds an L or a digit.
_LETTERS = {
    "A": "\u0391\u0410\u1D00\u13AA\uA4EE\u15C5\u2C80\u0386",  # Greek, Cyrillic, small cap, Cherokee, Lisu, ...
    "a": "\u0430\u03B1\u0251\u0250",
    "B": "\u0392\u0412\u0299\u13F4\uA4D0\u15F7\u2C82",
    "b": "\u042C\u0432\u13CF\u0184",
    "C": "\u03F9\u0421\u1D04\u13DF\uA4DA\u1455\u2CA4\u216D",
    "c": "\u03F2\u0441\u1D04\u217D",
    "D": "\u13A0\u1D05\uA4D3\u15EA\u216E",
    "d": "\u0501\u217E",
    "E": "\u0395\u0415\u1D07\u13AC\uA4F0\u2C88\u0190",
    "e": "\u0435\u04BD\u0259\u025B",
    "F": "\u03DC\uA730\uA4DD\u15B4",
    "G": "\u050C\u0262\u13C0\uA4D6\u13F3",
    "g": "\u0261\u050D\u0581",
    "H": "\u0397\u041D\u029C\u13BB\uA4E7\u2C8E",
    "h": "\u04BB\u0570\u13C2",
    "I": "\u0399\u0406\u04C0\u026A\uA4F2\u2C92\u2160\u01C0\u2D4F\u13C6l1",
    "i": "\u0456\u03B9\u0131\u0269\u13A5\u2170",
    "N": "\u039D\u0274\uA4E0\u144E\u2C9A",
    "n": "\u0578\u057C\u03B7",
    "O": "\u039F\u041E\u0555\u1D0F\uA4F3\u2C9E\u13BE0\u2D54\u25CB\u25EF",
    "o": "\u03BF\u043E\u0585\u03C3\u1D0F\u0D20",
    "R": "\u13A1\u0280\uA4E3\u1587\u01A6",
    "r": "\u0433\u1D26\u027E",
    "S": "\u0405\u054F\uA731\u13DA\uA4E2\u1515\u10BD",
    "s": "\u0455\u01BD",
    "T": "\u03A4\u0422\u1D1B\u13A2\uA4D4\u2CA6\u22A4\u27D9",
    "t": "\u03C4",
    "U": "\u054D\u1D1C\uA4F4\u144C\u222A\u22C3\u01B1\u1200",
    "u": "\u057D\u03C5\u028B\u1D1C",
    "V": "\u0474\u2164\uA4E6\u13D9\u142F\u2D38",
    "v": "\u0475\u03BD\u2174",
    # brackets of the delimiters, the labels' colon, and the escape character itself
    "<": "\u2039\u27E8\u2329\u3008\u276E\u276C\u2770\u1438\u02C2\u00AB\u300A\uFE64\uFF1C\u2264\u227A\u1445",
    ">": "\u203A\u27E9\u232A\u3009\u276F\u276D\u2771\u1433\u02C3\u00BB\u300B\uFE65\uFF1E\u2265\u227B\u1440",
    ":": "\u2236\uA789\u02F8\u05C3\u0589\u1361\u0703\u0704\uFE13\uFE55\uFF1A\u02D0\uA4FD\u1804\u205A\u2982"
         "\u16EC\u205D\u22EE\u0903\u0A83\u1365\uFE30",
    "\\": "\u29F5\u29F9\uFE68\uFF3C\u2216\u27CD\u2572",
}
CONFUSABLES: dict[str, str] = {src: dst for dst, sources in _LETTERS.items() for src in sources}

_HANGUL_FILLERS = "\u115F\u1160\u3164\uFFA0"
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_LB = re.escape(LINE_BREAKS)
_HWS = rf"[^\S{_LB}]"  # horizontal whitespace: whitespace that does not break the line

# On the normalised view. Both patterns start at the structure word; what precedes a match (its bracket, its
# backslash run, the rest of its line) is read by walking back from it, so the scan stays linear in the text
# (a lookbehind-free regex with a lazy prefix is quadratic on long runs of newlines or backslashes).
_SEP = r"[\W_]*+"  # any non-alphanumeric separators (possessive: no backtracking into a run)
_DELIMITER = re.compile(
    rf"(?<![^\W_])(?:BEGIN|END)(?:{_SEP}(?:OF|THE))*{_SEP}"
    rf"(?:UNSAFE{_SEP}CONTENT{_SEP}CATEGORIES|CONVERSATION)", re.IGNORECASE)
_ROLE = re.compile(rf"(?<![^\W_])(?:USER|AGENT)(?:[^\w:{_LB}]|_)*+:", re.IGNORECASE)
_OPENING = "<[({"  # a bracket before a delimiter's first word: the escape goes before it
_BLANK = "\u2800"  # blank glyphs that are not whitespace (skipped between a bracket and the word)
# ASCII characters the view folds (digit/letter swaps); ASCII text is folded by this one-to-one table alone
_ASCII_FOLD = str.maketrans({src: dst for src, dst in CONFUSABLES.items() if src.isascii()})


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
    came from (None when each view character comes from the character at the same offset, as for ASCII text;
    a compact integer array otherwise)."""
    if _plain(text):
        return text.translate(_ASCII_FOLD), None
    out, origin = [], array("q")
    for i, ch in enumerate(text):
        folded = fold_char(ch)
        if len(folded) == 1:
            origin.append(i)
        elif folded:
            origin.extend([i] * len(folded))
        out.append(folded)
    return "".join(out), origin


def _run_before(text: str, at: int) -> int:
    """How many backslashes stand directly before `at` in `text`."""
    start = at
    while start and text[start - 1] == "\\":
        start -= 1
    return at - start


def _at_line_start(view: str, at: int) -> bool:
    """Only non-alphanumeric characters (spaces, markdown `*` `-` `>` `#` `_`, blank glyphs, backslashes...)
    between `at` and the start of its line (or of the text)."""
    while at and view[at - 1] not in LINE_BREAKS and not view[at - 1].isalnum():
        at -= 1
    return at == 0 or view[at - 1] in LINE_BREAKS


def _delimiter_start(view: str, at: int) -> int:
    """Where a delimiter whose first word is at `at` starts: at its opening bracket when one stands before the
    word (spaces and blank glyphs between them allowed), else at the word."""
    i = at
    while i and (view[i - 1] in _BLANK or (view[i - 1].isspace() and view[i - 1] not in LINE_BREAKS)):
        i -= 1
    return i - 1 if i and view[i - 1] in _OPENING else at


def structure_matches(view: str) -> list[int]:
    """Positions in the view where an escape goes: every delimiter (at its bracket) and every role label whose
    line holds nothing alphanumeric before it."""
    found = {_delimiter_start(view, m.start()) for m in _DELIMITER.finditer(view)}
    found.update(m.start() for m in _ROLE.finditer(view) if _at_line_start(view, m.start()))
    return sorted(found)


def escape_structure(text: str) -> str:
    """`text` with every delimiter and line-start role label escaped (module docstring): backslashes inserted
    into the original text so that the run directly before each match is odd both in the original (ASCII
    backslashes) and in the normalised view (look-alikes of `\\` counted, invisible characters skipped)."""
    view, origin = normalized_view(text)
    matches = structure_matches(view)
    if not matches:
        return text
    inserts: dict[int, int] = {}  # position in the original -> backslashes inserted there
    for at in matches:
        pos = at if origin is None else origin[at]
        ascii_run, view_run = _run_before(text, pos), _run_before(view, at)
        inserts[pos] = inserts.get(pos, 0) + ascii_run + 1
        if (view_run + ascii_run + 1) % 2 == 0:
            # the view's run reaches past the ASCII one (a look-alike or an invisible inside it) with the other
            # parity: one more backslash at the view run's first character makes that reading odd as well
            first = at - view_run if origin is None else origin[at - view_run]
            inserts[first] = inserts.get(first, 0) + 1
    pieces, last = [], 0
    for pos in sorted(inserts):
        pieces += [text[last:pos], "\\" * inserts[pos]]
        last = pos
    pieces.append(text[last:])
    return "".join(pieces)
