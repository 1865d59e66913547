"""Parsing of the guard's answer text in both output styles.

Plain style (the official instruction): first line `safe` or `unsafe`, second line `S1, S9`, critique after.
Labelled style (a published third-party parser): `- Safety Assessment: unsafe`, `- Categories: S1, S9`,
`- Assessment: <critique>`. The verdict comes first in both; anything else is `unknown`, and any error
is `error`: never `safe` (the guard fails closed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..prompt.policy import Policy

_CODE = re.compile(r"\bS(\d{1,2})\b")
_LABEL = re.compile(r"^\s*-?\s*(safety assessment|categories|assessment)\s*:\s*(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Parsed:
    verdict: str  # safe | unsafe | unknown
    categories: tuple[str, ...]  # codes, e.g. ("S1", "S9"), in the order written, deduplicated
    critique: str
    style: str  # plain | labelled | none


def _codes(text: str, policy: Policy) -> tuple[str, ...]:
    seen = []
    for m in _CODE.finditer(text):
        code = f"S{int(m.group(1))}"
        if policy.name_of(code) is not None and code not in seen:
            seen.append(code)
    return tuple(seen)


def _word(text: str) -> str:
    word = text.strip().strip(".:,;!*'\"`").lower()
    return word if word in ("safe", "unsafe") else ""


def parse(text: str, policy: Policy = Policy()) -> Parsed:
    """Read verdict, category codes and critique from the guard's raw text. The verdict is the answer's first
    content line, in either style: a `- Safety Assessment:` line further down (in a critique that quotes or was
    steered by the user's text) never overrides it."""
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n")]
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    labelled = {}
    opening = _LABEL.match(lines[first]) if first is not None else None
    if opening and opening.group(1).lower() == "safety assessment":
        for i, ln in enumerate(lines[first:], start=first):
            m = _LABEL.match(ln)
            if m:
                key = m.group(1).lower()
                value = m.group(2) if key != "assessment" else "\n".join([m.group(2)] + lines[i + 1:])
                labelled.setdefault(key, value)
                if key == "assessment":
                    break  # the critique runs to the end: labels inside it are its text
    if "safety assessment" in labelled and _word(labelled["safety assessment"]):
        verdict = _word(labelled["safety assessment"])
        cats = _codes(labelled.get("categories", ""), policy) if verdict == "unsafe" else ()
        return Parsed(verdict, cats, labelled.get("assessment", "").strip(), "labelled")
    content = [ln for ln in lines if ln.strip()]
    if content and _word(content[0].split()[0] if content[0].split() else ""):
        verdict = _word(content[0].split()[0])
        rest = content[1:]
        cats = _codes(rest[0], policy) if verdict == "unsafe" and rest else ()
        critique_lines = rest[1:] if cats else rest
        return Parsed(verdict, cats, "\n".join(critique_lines).strip(), "plain")
    return Parsed("unknown", (), text.strip(), "none")
