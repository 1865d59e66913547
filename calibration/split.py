"""The one train / held-out split of the labelled seed data, fixed by a seed and a fraction.

A checkpoint whose verdict rows were fitted on labelled text (the `small-real` reference) must never be judged on the
texts it was fitted on. Every reader of the labelled sets (the fit, the evaluation packs, the calibration set's
held-out items, the fidelity report's agreement requests) asks this module which side an item is on.

The split is by source item, not by row: an item's group is its prompt text, normalised (NFKC, case-folded,
whitespace collapsed), so the XSTest prompt and its prompt+response row, the same prompt spoken (speech pack) or
rendered as an image (benign_images, video), and a prompt repeated inside or across sources always land on the same
side. Media with no prompt (FigStep images, photos, jfk.flac) are grouped by their item id. The side is a pure
function of (seed, group): it does not depend on which packs are loaded, their order, or sampling.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

SEED = 0
HELDOUT = 0.35  # ~1,360 of the ~3,880 labelled texts of ../shared/data
SIDES = ("train", "heldout")


def group_key(text: str) -> str:
    """The normalised prompt text that decides an item's side."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def side_of_group(group: str, seed: int = SEED, heldout: float = HELDOUT) -> str:
    digest = hashlib.sha256(f"omniguard-edge split v1\0{seed}\0{group}".encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout else "train"


def describe(seed: int = SEED, heldout: float = HELDOUT) -> dict:
    """What a checkpoint or report records of the split."""
    return {"scheme": "sha256(seed, normalised prompt text) < heldout", "version": 1, "seed": seed, "heldout": heldout}
