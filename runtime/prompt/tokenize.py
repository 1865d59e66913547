"""Token ids for a guard prompt, with user content kept as data.

The chat template is rendered with a sentinel where each text item goes. Special tokens are recognised
only in the template's own markup; user text (the filled guard template) is encoded by the BPE model
directly, so `<|im_end|>` typed by a user stays the eight plain tokens it spells. For text without
special-token strings the ids are exactly those transformers' processor produces (tested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jinja2
import jinja2.sandbox

from ..errors import InputError

MEDIA_PLACEHOLDER = {"image": "<|IMAGE|>", "audio": "<|AUDIO|>", "video": "<|VIDEO|>"}


@dataclass(frozen=True)
class Item:
    """One content item of the guard's user turn: text, or a media item with its token count."""

    kind: str  # text | image | audio | video
    text: str = ""
    tokens: int = 0  # placeholder tokens the encoder output fills (media only)


class PromptTokenizer:
    def __init__(self, tokenizer, chat_template: str):
        """tokenizer: a `tokenizers.Tokenizer` (the bundle's tokenizer.json); chat_template: jinja source."""
        self.tok = tokenizer
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(chat_template)
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        self.special_ids = {s: tokenizer.token_to_id(s) for s in specials}
        alternatives = sorted(specials, key=len, reverse=True) + [r"\x00OG(\d+)\x00"]
        self._split = re.compile("|".join(a if a.startswith("\\x00") else re.escape(a) for a in alternatives))

    def encode_plain(self, text: str) -> list[int]:
        """BPE ids of `text` with no special-token matching (user content is data)."""
        if not text:
            return []
        normalized = self.tok.normalizer.normalize_str(text) if self.tok.normalizer else text
        pieces = self.tok.pre_tokenizer.pre_tokenize_str(normalized) if self.tok.pre_tokenizer else [(normalized, None)]
        return [t.id for piece, _ in pieces for t in self.tok.model.tokenize(piece)]

    def render(self, items: list[Item]) -> str:
        """The chat template applied to one user turn, text items replaced by sentinels."""
        content = []
        for i, item in enumerate(items):
            if item.kind == "text":
                content.append({"type": "text", "text": f"\x00OG{i}\x00"})
            elif item.kind in MEDIA_PLACEHOLDER:
                content.append({"type": item.kind})
            else:
                raise InputError(f"unknown content item kind {item.kind!r}")
        return self.template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)

    def encode(self, items: list[Item]) -> list[int]:
        """Prompt ids: markup specials as special ids, text items plain, media placeholders expanded."""
        rendered = self.render(items)
        ids, pos, media = [], 0, iter([it for it in items if it.kind in MEDIA_PLACEHOLDER])
        expand = {v: k for k, v in MEDIA_PLACEHOLDER.items()}
        for match in self._split.finditer(rendered):
            ids += self.encode_plain(rendered[pos:match.start()])
            pos = match.end()
            if match.group(1) is not None:
                ids += self.encode_plain(items[int(match.group(1))].text)
            elif match.group(0) in expand:
                item = next(media, None)
                if item is None or item.kind != expand[match.group(0)]:
                    raise InputError("the chat template placed media in an order the request does not have")
                ids += [self.special_ids[match.group(0)]] * item.tokens
            else:
                ids.append(self.special_ids[match.group(0)])
        ids += self.encode_plain(rendered[pos:])
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
