"""Omni-modal calibration sets from real data (../shared/data or a user's copy of the same layout).

Per modality, `per_modality` items (default 64) sampled with a seed from the evaluation packs
(calibration/evalpacks.py, whose label rules apply):

- text: the five text packs in equal shares (XSTest prompts, XSTest prompt+response, OpenAI moderation samples,
  SimpleSafetyTests, AILuminate demo);
- image: FigStep's typographic jailbreak images and the benign images (the real photos, XSTest's safe prompts
  rendered the way FigStep renders its own), half each;
- audio: XSTest prompts spoken by espeak-ng, and the real recording jfk.flac;
- video: 2 s clips panning across those stills.

A fixed fraction of each modality's items (`heldout`, default 1/4) is held out: the fidelity report judges the
quantized graphs on those items, never on the items that calibrated them. Held-out items are drawn from the held-out
side of the one train / held-out split of the seed data (calibration/split.py), calibration items from its training
side, so a checkpoint whose verdict rows were fitted on labelled text is never judged on its training texts (the
side is decided per source prompt or still, so a clip and its still, or a prompt and its speech, share it). Generated media are written under the cache folder, keyed by the
sha256 of the source files and the set's parameters: the same data and parameters give the same set, reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..runtime.checked import is_int
from . import evalpacks
from ..runtime.recipes import RecipeError

BUILDER_VERSION = 2  # 2: calibration and held-out items from the two sides of calibration/split.py
MODALITY_PACKS = {
    "text": ["xstest_prompts", "xstest_responses", "openai_moderation", "simple_safety_tests", "ailuminate"],
    "image": ["figstep_images", "benign_images"],
    "audio": ["speech"],
    "video": ["video"],
}
MODALITIES = tuple(MODALITY_PACKS)


def default_data_dir() -> Path | None:
    """../shared/data beside the working directory, or beside this source tree; None when neither exists."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base.parent / "shared" / "data"
        if (candidate / "README.md").exists():
            return candidate
    return None


def cache_root() -> Path:
    root = os.environ.get("OMNIGUARD_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "omniguard-edge")
    return Path(root) / "calibration"


def check_data_dir(data: Path) -> None:
    """RecipeError unless `data` is laid out like ../shared/data and its speech can be made (espeak-ng)."""
    import shutil

    data = Path(data)
    if not (data / "text").is_dir() or not (data / "image").is_dir():
        raise RecipeError(f"calibration data folder {data} lacks text/ and image/ (the layout of ../shared/data; "
                          "see its README): pass --calibration DIR or --no-calibration")
    if shutil.which("espeak-ng") is None:
        raise RecipeError("the calibration set's speech is made with espeak-ng, which is not installed "
                          "(apt-get install espeak-ng); or pass --no-calibration")


def _data_digest(data: Path) -> str:
    """sha256 over every file of the data folder (relative path and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(data)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def request_of(item: evalpacks.Item) -> dict:
    """moderate()'s keyword arguments for one item."""
    out = {k: getattr(item, k) for k in ("text", "response", "image", "audio", "video") if getattr(item, k)}
    if not out:
        raise ValueError(f"calibration item {item.id} has no content")
    return out


@dataclass
class CalibrationSet:
    root: Path  # where its manifest and generated media live
    manifest: dict  # sha256, counts, items with their split

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    def items(self, split: str | None = None, modality: str | None = None) -> list[dict]:
        return [it for it in self.manifest["items"]
                if (split is None or it["split"] == split) and (modality is None or it["modality"] == modality)]

    def requests(self, split: str, per_modality: int | None = None) -> list[tuple[str, dict]]:
        """(label, moderate() kwargs) of the split, at most `per_modality` of each modality, modalities interleaved."""
        groups = [self.items(split, m)[:per_modality] for m in MODALITIES]
        out = []
        for i in range(max((len(g) for g in groups), default=0)):
            out += [(g[i]["id"], g[i]["request"]) for g in groups if i < len(g)]
        return out

    def summary(self) -> dict:
        """What a bundle's manifest records of the set."""
        m = self.manifest
        return {"sha256": m["sha256"], "data_sha256": m["data_sha256"], "per_modality": m["per_modality"],
                "heldout": m["heldout"], "seed": m["seed"], "counts": m["counts"]}


def build(data: Path, per_modality: int = 64, heldout: float = 0.25, seed: int = 0, cache: Path | None = None,
          progress: bool = True) -> CalibrationSet:
    """The calibration set of `data` (built once, then read from the cache)."""
    if not is_int(per_modality) or per_modality < 2:
        raise ValueError(f"per_modality must be an int >= 2, not {per_modality!r}")
    if isinstance(heldout, bool) or not isinstance(heldout, (int, float)) or not 0 < heldout < 1:
        raise ValueError(f"heldout must be a fraction in (0, 1), not {heldout!r}")
    data = Path(data)
    check_data_dir(data)
    key_parts = {"builder": BUILDER_VERSION, "data": _data_digest(data), "per_modality": per_modality,
                 "heldout": heldout, "seed": seed}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    root = (cache or cache_root()) / key[:16]
    manifest_path = root / "calibration.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        media = [v for it in manifest["items"] for k, v in it["request"].items() if k in ("image", "audio", "video")]
        if manifest.get("key") == key and all(Path(p).exists() for p in media):
            return CalibrationSet(root, manifest)
    items = []
    from tqdm import tqdm

    bar = tqdm(total=len(MODALITIES) * per_modality, desc="calibration set", unit="item", disable=not progress)
    n_held = min(per_modality - 1, max(1, round(heldout * per_modality)))
    for modality, packs in MODALITY_PACKS.items():
        # held-out items from the held-out side of the split, calibration items from the training side, so that
        # nothing a fitted checkpoint (small-real) was trained on ever judges it (calibration/split.py)
        for side, role, count in (("train", "calibration", per_modality - n_held), ("heldout", "heldout", n_held)):
            share = math.ceil(count / len(packs))
            try:
                chosen, report = evalpacks.load_with_report(packs, data, root / "media", share, seed, split=side)
            except SystemExit as exc:  # the packs' loaders stop a command line; here it is a typed error
                raise RecipeError(f"calibration data {data}: {exc}") from None
            by_pack = {p: [it for it in chosen if it.pack == p] for p in packs}
            picked = []  # the packs in turn, up to count
            for i in range(share):
                picked += [by_pack[p][i] for p in packs if i < len(by_pack[p])]
            picked = picked[:count]
            if len(picked) < count:
                raise RecipeError(f"calibration data {data}: modality {modality} has {len(picked)} items on the "
                                  f"{side} side of the split, fewer than the {count} needed (packs: {report})")
            random.Random(seed).shuffle(picked)
            for it in picked:
                items.append({"id": it.id, "pack": it.pack, "modality": modality, "label": it.label,
                              "categories": it.categories, "split": role,
                              "request": request_of(it), "sha256": evalpacks.items_digest([it])})
                bar.update(1)
    bar.close()
    counts = {m: {"calibration": 0, "heldout": 0, "unsafe": 0, "safe": 0} for m in MODALITIES}
    categories: dict[str, int] = {}
    for it in items:
        c = counts[it["modality"]]
        c[it["split"]] += 1
        c[it["label"]] += 1
        for code in it["categories"]:
            categories[code] = categories.get(code, 0) + 1
    digest = hashlib.sha256("".join(it["sha256"] + it["split"] for it in items).encode()).hexdigest()
    manifest = {"key": key, "sha256": digest, "data_sha256": key_parts["data"], "data": str(data),
                "per_modality": per_modality, "heldout": heldout, "seed": seed,
                "counts": {"per_modality": counts, "per_category": dict(sorted(categories.items()))}, "items": items}
    root.mkdir(parents=True, exist_ok=True)
    tmp = manifest_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(manifest_path)
    return CalibrationSet(root, manifest)
