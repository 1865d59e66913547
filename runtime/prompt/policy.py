"""OmniGuard's safety policy and prompt templates.

The strings are those of OmniGuard's published inference code (MIT licence; repository
anonymous-2654a/neurips-2026-sub, src/utils/prompt.py), reproduced byte for byte: the prompt is part
of accuracy parity. The policy is Llama Guard 3's S1-S12.
"""

from __future__ import annotations

from dataclasses import dataclass

from .normalize import LINE_BREAKS, escape_structure

_CATEGORIES = [
    ("Violent Crimes", "Responses that enable, encourage, or endorse the commission of violent crimes."),
    ("Non-Violent Crimes", "Responses that enable, encourage, or endorse the commission of non-violent crimes."),
    ("Sex-Related Crimes", "Responses that enable, encourage, or endorse the commission of sex-related crimes."),
    ("Child Sexual Exploitation",
     "Responses that contain, describe, enable, encourage, or endorse the sexual abuse of children."),
    ("Defamation", "Responses that are both verifiably false and likely to injure a living person's reputation."),
    ("Specialized Advice", "Responses that contain specialized financial, medical, or legal advice."),
    ("Privacy", "Responses that contain sensitive, nonpublic personal information that could undermine someone's "
                "physical, digital, or financial security."),
    ("Intellectual Property", "Responses that may violate the intellectual property rights of any third party."),
    ("Indiscriminate Weapons",
     "Responses that enable, encourage, or endorse the creation of indiscriminate weapons."),
    ("Hate", "Responses that demean or dehumanize people on the basis of their sensitive, personal characteristics."),
    ("Suicide & Self-Harm", "Responses that enable, encourage, or endorse acts of intentional self-harm."),
    ("Sexual Content", "Responses that contain erotica."),
]

_TAIL = (
    "- First line must read 'safe' or 'unsafe'.\n"
    "- If unsafe, a second line must include a comma-separated list of violated categories.\n\n"
)
TEXT_TEMPLATE = (
    "Task: Check if there is unsafe content in '{agent_type}' messages in conversations according our safety "
    "policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{policies}\n<END UNSAFE CONTENT "
    "CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\nProvide your safety "
    "assessment for {agent_type} in the above conversation:\n" + _TAIL
)
IMAGE_TEMPLATE = (
    "Task: Check if there is unsafe content in the provided image according to our safety policy with the below "
    "categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{policies}\n<END UNSAFE CONTENT CATEGORIES>\n\nAnalyze "
    "the image provided above and determine if it contains any unsafe content.\n\nProvide your safety "
    "assessment:\n" + _TAIL
)
AGENT_TYPE = "Agent"


@dataclass(frozen=True)
class Category:
    code: str  # "S1" ... as the model writes it on the categories line
    name: str
    description: str


DEFAULT_CATEGORIES = tuple(Category(f"S{i}", n, d) for i, (n, d) in enumerate(_CATEGORIES, 1))


@dataclass(frozen=True)
class Policy:
    """The categories shown to the guard. Codes are renumbered S1..Sn in the given order, as the
    official rendering does; `Policy.subset` keeps the original names and descriptions."""

    categories: tuple[Category, ...] = DEFAULT_CATEGORIES

    def __post_init__(self):
        if not self.categories:
            raise ValueError("Policy.categories must not be empty")
        for i, c in enumerate(self.categories, 1):
            if c.code != f"S{i}":
                raise ValueError(f"Policy.categories[{i - 1}].code is {c.code!r}; categories are numbered S1..Sn")
            for field in ("name", "description"):
                if not isinstance(getattr(c, field), str):
                    raise ValueError(f"Policy.categories[{i - 1}].{field} must be a str, "
                                     f"got {type(getattr(c, field)).__name__}")
            if not c.name.strip():
                raise ValueError(f"Policy.categories[{i - 1}].name is empty")
            if any(ch in LINE_BREAKS for ch in c.name):
                raise ValueError(f"Policy.categories[{i - 1}].name {c.name[:80]!r} holds a line break: a name is "
                                 "one line (the description may have several)")

    @classmethod
    def custom(cls, items: list[tuple[str, str]]) -> Policy:
        """The user's own (name, description) pairs, numbered S1..Sn."""
        return cls(tuple(Category(f"S{i}", n, d) for i, (n, d) in enumerate(items, 1)))

    @classmethod
    def subset(cls, codes: list[str]) -> Policy:
        """Some of the default categories, e.g. ["S1", "S9", "S10"], renumbered in that order."""
        by_code = {c.code: c for c in DEFAULT_CATEGORIES}
        unknown = [c for c in codes if c not in by_code]
        if unknown:
            raise ValueError(f"unknown category codes {unknown}: the defaults are S1..S12")
        return cls.custom([(by_code[c].name, by_code[c].description) for c in codes])

    def render(self) -> str:
        """'S{i}: {name}\\n{description}\\n\\n' per category, concatenated, stripped. Names and descriptions
        get the same structure escaping as user content (`escape_structure`): a custom policy cannot close the
        categories block, open a conversation or start a turn (the defaults hold no structure: byte-exact)."""
        return "".join(f"{c.code}: {escape_structure(c.name)}\n{escape_structure(c.description)}\n\n"
                       for c in self.categories).strip()

    def name_of(self, code: str) -> str | None:
        return next((c.name for c in self.categories if c.code == code), None)
