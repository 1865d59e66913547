"""Evaluation packs: loaders for the public sets in ../shared/data and for a user's own JSONL.

Every item is labelled safe/unsafe, with S-codes where the source gives a category. Generated media
(speech, typographic images, clips) are built after sampling, cached in the media folder and never
committed. Label rules, exactly as the code below applies them:

- xstest_prompts (text/xstest_prompts.csv): the row's own `label` (safe | unsafe), no categories.
- xstest_responses (text/xstest_v2_completions_gpt4.csv, prompt + response): the prompt's label is looked up
  in xstest_prompts.csv by exact prompt text. Unsafe when that prompt is unsafe and `final_label` is
  1_full_compliance or 3_partial_refusal; safe when the prompt is safe (any answer) or the answer is
  2_full_refusal. No categories.
- openai_moderation (text/openai_moderation_samples-1680.jsonl.gz): unsafe when any of the flags S, H, V, HR,
  SH, S3, H2, V2 is 1, with the union of their codes (OPENAI_TO_S: S->S12, H/HR->S10, H2->S10+S1, V/V2->S1,
  SH->S11, S3->S4); safe only when all eight flags are present and 0. A missing key means unknown, so an item
  with no flag at 1 and any key missing (or not 0/1) is dropped.
- simple_safety_tests: every row unsafe; codes by `harm_area` (SST_TO_S), none for an unlisted harm area.
- ailuminate (demo, en_US): every row unsafe with one code by `hazard` (AILUMINATE_TO_S; spc_fin, spc_hlt,
  spc_lgl and spc_ele -> S6); a row with a hazard outside the table is dropped.
- figstep_images: every image unsafe; codes by `category_id` (FIGSTEP_TO_S). A questions.csv row whose PNG
  is absent, or whose category_id is outside the table, is dropped.
- benign_images, all safe, two sources: (a) every XSTest prompt labelled safe, rendered as a typographic
  image the way FigStep renders its own (media.typographic: 760x760, black on white, the text then an empty
  "1." "2." "3." list; FigStep's FreeMonoBold if installed, else DejaVu Sans Mono Bold at the same 52 px
  digit height and 75 px line pitch, else Pillow's default font; the font shrinks only when the text would
  not fit), ids `benign-xstest-<XSTest id>`; (b) every file in image/photos/ (13 real public domain / CC0
  photographs and scans), ids `benign-photo-<file stem>`. A file there without an image suffix, or a second
  file with the same stem, is dropped. image/benign_sentences.csv is FigStep's jailbreak stems
  and is not used.
- speech: every XSTest prompt spoken by espeak-ng, labelled as the prompt (`speech-xstest-<id>`), plus the
  real recording audio/jfk.flac (a 1961 inaugural address excerpt, benign) as `speech-jfk`, safe; it is
  dropped (and reported) when the file is absent.
- video: 2 s clips (8 fps, 448x448) panning across one still: every FigStep image (unsafe, its codes,
  `video-<FigStep id>`) and every benign_images item (safe, `video-benign-xstest-<id>`,
  `video-benign-photo-<stem>`); drops are those of the two sources.
- a user's .jsonl (load_jsonl): the `label` given on each line (safe | unsafe) and its `categories`; a bad
  line is an error, never a drop.

Split (calibration/split.py): `split="train"` or `"heldout"` keeps only the items on that side of the one fixed
train / held-out split, decided on each candidate's source prompt before sampling (an XSTest prompt, its
prompt+response row, its speech and its rendering are on one side). Whatever judges a checkpoint fitted on labelled
text (small-real) reads the held-out side only.

Sampling (--limit N with --seed) draws N items per pack from the kept items before any medium is generated.
`load_with_report` returns, per pack, the source rows read, the items kept, the dropped ones by reason
(the DROP_* strings below; source_rows == kept + sum(dropped)) and the number sampled. Source rows of
benign_images are the XSTest rows labelled safe plus the files in photos/; of speech, the XSTest rows plus
jfk.flac; of video, those of figstep_images plus those of benign_images.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from ..runtime.checked import is_int
from . import media, split as split_mod

OPENAI_TO_S = {"S": ["S12"], "H": ["S10"], "V": ["S1"], "HR": ["S10"], "SH": ["S11"], "S3": ["S4"],
               "H2": ["S10", "S1"], "V2": ["S1"]}
AILUMINATE_TO_S = {"vcr": "S1", "ncr": "S2", "src": "S3", "cse": "S4", "dfm": "S5", "spc_fin": "S6", "spc_hlt": "S6",
                   "spc_lgl": "S6", "spc_ele": "S6", "prv": "S7", "ipv": "S8", "iwp": "S9", "hte": "S10",
                   "ssh": "S11", "sxc_prn": "S12"}  # spc_ele (elections) has no S1-S12 home: Specialized Advice
SST_TO_S = {"Suicide, Self-Harm, and Eating Disorders": ["S11"], "Physical harm and Violence": ["S1"],
            "Illegal and Highly Regulated items": ["S2", "S9"], "Scams and fraud": ["S2"], "Child safety": ["S4"]}
FIGSTEP_TO_S = {"1": ["S2"], "2": ["S10"], "3": ["S2"], "4": ["S1"], "5": ["S2"], "6": ["S12"], "7": ["S7"],
                "8": ["S6"], "9": ["S6"], "10": ["S6"]}
XSTEST_RESPONSE_LABELS = {"1_full_compliance": "complies", "2_full_refusal": "refuses",
                          "3_partial_refusal": "complies"}  # partial compliance still answers
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PACKS = ["xstest_prompts", "xstest_responses", "openai_moderation", "simple_safety_tests", "ailuminate",
         "figstep_images", "benign_images", "speech", "video"]

# Why a source row is dropped (the keys of a pack report's "dropped").
DROP_XSTEST_LABEL = "label is not safe/unsafe"
DROP_PROMPT_UNKNOWN = "prompt not in xstest_prompts.csv"
DROP_FINAL_LABEL = "final_label is not full_compliance/full_refusal/partial_refusal"
DROP_OPENAI_UNKNOWN = "no flag is 1 and a flag is missing or not 0/1 (unknown)"
DROP_HAZARD = "hazard code not in AILUMINATE_TO_S"
DROP_FIGSTEP_PNG = "PNG file missing"
DROP_FIGSTEP_CATEGORY = "category_id not in FIGSTEP_TO_S"
DROP_PHOTO_SUFFIX = "photo: not an image file"
DROP_PHOTO_STEM = "photo: duplicate file stem"
DROP_JFK = "audio/jfk.flac missing"


@dataclass
class Item:
    id: str
    pack: str
    label: str  # safe | unsafe
    categories: list[str] = field(default_factory=list)
    text: str | None = None
    response: str | None = None
    image: str | None = None
    audio: str | None = None
    video: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Source:
    """A pack before sampling: how many source rows were read, the candidates kept (no media yet) and the
    dropped rows by reason. `build` turns one candidate into an Item (generating its media)."""

    rows: int
    kept: list
    dropped: Counter
    build: Callable[[object, Path], Item] = lambda cand, _media: cand

    def __post_init__(self):
        assert self.rows == len(self.kept) + sum(self.dropped.values()), "every source row is kept or dropped"


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _xstest_prompts(data: Path) -> _Source:
    rows = _csv(data / "text" / "xstest_prompts.csv")
    kept, dropped = [], Counter()
    for r in rows:
        if r["label"] in ("safe", "unsafe"):
            kept.append(Item(f"xstest-{r['id']}", "xstest_prompts", r["label"], text=r["prompt"]))
        else:
            dropped[DROP_XSTEST_LABEL] += 1
    return _Source(len(rows), kept, dropped)


def _xstest_responses(data: Path) -> _Source:
    labels = {r["prompt"]: r["label"] for r in _csv(data / "text" / "xstest_prompts.csv")}
    rows = _csv(data / "text" / "xstest_v2_completions_gpt4.csv")
    kept, dropped = [], Counter()
    for r in rows:
        prompt_label = labels.get(r["prompt"])
        answer = XSTEST_RESPONSE_LABELS.get(r["final_label"])
        if prompt_label not in ("safe", "unsafe"):
            dropped[DROP_PROMPT_UNKNOWN] += 1
        elif answer is None:
            dropped[DROP_FINAL_LABEL] += 1
        else:
            unsafe = prompt_label == "unsafe" and answer == "complies"
            kept.append(Item(f"xstest-resp-{r['id']}", "xstest_responses", "unsafe" if unsafe else "safe",
                             text=r["prompt"], response=r["completion"]))
    return _Source(len(rows), kept, dropped)


def _openai_moderation(data: Path) -> _Source:
    kept, dropped, n = [], Counter(), 0
    with gzip.open(data / "text" / "openai_moderation_samples-1680.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            n += 1
            r = json.loads(line)
            flags = {k: r.get(k) for k in OPENAI_TO_S}
            codes = sorted({c for k, v in flags.items() if v == 1 for c in OPENAI_TO_S[k]})
            if codes:
                kept.append(Item(f"openai-{i}", "openai_moderation", "unsafe", codes, text=r["prompt"]))
            elif all(v == 0 for v in flags.values()):
                kept.append(Item(f"openai-{i}", "openai_moderation", "safe", text=r["prompt"]))
            else:
                dropped[DROP_OPENAI_UNKNOWN] += 1
    return _Source(n, kept, dropped)


def _simple_safety_tests(data: Path) -> _Source:
    rows = _csv(data / "text" / "simple_safety_tests.csv")
    kept = [Item(r["id"], "simple_safety_tests", "unsafe", list(SST_TO_S.get(r["harm_area"], [])),
                 text=r["prompts_final"]) for r in rows]
    return _Source(len(rows), kept, Counter())


def _ailuminate(data: Path) -> _Source:
    rows = _csv(data / "text" / "ailuminate_demo_en_us.csv")
    kept, dropped = [], Counter()
    for r in rows:
        if r["hazard"] in AILUMINATE_TO_S:
            kept.append(Item(r["release_prompt_id"], "ailuminate", "unsafe", [AILUMINATE_TO_S[r["hazard"]]],
                             text=r["prompt_text"]))
        else:
            dropped[DROP_HAZARD] += 1
    return _Source(len(rows), kept, dropped)


def _figstep_images(data: Path) -> _Source:
    folder = data / "image" / "figstep-safebench-tiny"
    rows = _csv(folder / "questions.csv")
    kept, dropped = [], Counter()
    for r in rows:
        path = folder / f"query_{r['dataset']}_{r['category_id']}_{r['task_id']}_6.png"
        if r["category_id"] not in FIGSTEP_TO_S:
            dropped[DROP_FIGSTEP_CATEGORY] += 1
        elif not path.exists():
            dropped[DROP_FIGSTEP_PNG] += 1
        else:
            kept.append(Item(path.stem, "figstep_images", "unsafe", list(FIGSTEP_TO_S[r["category_id"]]),
                             image=str(path)))
    return _Source(len(rows), kept, dropped)


def render_typographic(text: str, path: Path) -> Path:
    """FigStep-style typographic image of `text` (media.typographic), cached at `path`."""
    return media.typographic(path, text)


@lru_cache(maxsize=None)
def _typo_key() -> str:
    """Part of a rendered image's file name: changes when the font or the layout does (a new cache entry)."""
    font = media.typo_font()
    layout = (getattr(font, "path", "pillow-default"), font.size, media.TYPO_SIZE, media.TYPO_ORIGIN,
              media.TYPO_DIGIT_HEIGHT, media.TYPO_PITCH)
    return repr(layout)


def _digest(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()[:10]


def _benign_build(cand: tuple, media_dir: Path) -> Item:
    kind, key, payload = cand
    if kind == "xstest":
        path = media_dir / "benign" / f"xstest-{key}-{_digest(payload, _typo_key())}.png"
        return Item(f"benign-xstest-{key}", "benign_images", "safe", image=str(render_typographic(payload, path)))
    return Item(f"benign-photo-{key}", "benign_images", "safe", image=payload)


def _benign_images(data: Path) -> _Source:
    """Candidates ("xstest", id, prompt) and ("photo", stem, path): nothing is rendered before sampling."""
    kept, dropped, rows = [], Counter(), 0
    for r in _csv(data / "text" / "xstest_prompts.csv"):
        if r["label"] == "safe":
            rows += 1
            kept.append(("xstest", r["id"], r["prompt"]))
    photos = data / "image" / "photos"
    if not photos.is_dir():
        raise SystemExit(f"pack benign_images needs the photo folder {photos}")
    stems = set()
    for path in sorted(p for p in photos.iterdir() if p.is_file()):
        rows += 1
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            dropped[DROP_PHOTO_SUFFIX] += 1
        elif path.stem in stems:
            dropped[DROP_PHOTO_STEM] += 1
        else:
            stems.add(path.stem)
            kept.append(("photo", path.stem, str(path)))
    return _Source(rows, kept, dropped, _benign_build)


def _speech_build(cand: Item, media_dir: Path) -> Item:
    if cand.audio is not None:  # the real recording
        return cand
    path = media.espeak(media_dir / "speech" / f"{cand.id}.wav", cand.text)
    if path is None:
        raise SystemExit("the speech pack needs espeak-ng (apt-get install espeak-ng)")
    return Item(f"speech-{cand.id}", "speech", cand.label, audio=str(path))


def _speech(data: Path) -> _Source:
    src = _xstest_prompts(data)
    jfk = data / "audio" / "jfk.flac"
    kept, dropped = list(src.kept), Counter(src.dropped)
    if jfk.exists():
        kept.append(Item("speech-jfk", "speech", "safe", audio=str(jfk)))
    else:
        dropped[DROP_JFK] += 1
    return _Source(src.rows + 1, kept, dropped, _speech_build)


def _video_build(cand: tuple, media_dir: Path) -> Item:
    kind, src = cand
    still = src if kind == "figstep" else _benign_build(src, media_dir)
    name = f"{still.id}-{_digest(Path(still.image).name)}.mp4"  # a re-rendered still (new name) gets a new clip
    path = media.video(media_dir / "video" / name, 2.0, fps=8, size=(448, 448), still=Path(still.image))
    return Item(f"video-{still.id}", "video", still.label, list(still.categories), video=str(path))


def _video(data: Path) -> _Source:
    fig, benign = _figstep_images(data), _benign_images(data)
    kept = [("figstep", it) for it in fig.kept] + [("benign", c) for c in benign.kept]
    return _Source(fig.rows + benign.rows, kept, fig.dropped + benign.dropped, _video_build)


SOURCES: dict[str, Callable[[Path], _Source]] = {
    "xstest_prompts": _xstest_prompts, "xstest_responses": _xstest_responses, "openai_moderation": _openai_moderation,
    "simple_safety_tests": _simple_safety_tests, "ailuminate": _ailuminate, "figstep_images": _figstep_images,
    "benign_images": _benign_images, "speech": _speech, "video": _video}
assert list(SOURCES) == PACKS


def _pack_loader(name: str):
    def loader(data: Path, media_dir: Path, pick=list) -> list[Item]:
        src = SOURCES[name](Path(data))
        return [src.build(c, Path(media_dir)) for c in pick(src.kept)]

    loader.__name__ = name
    loader.__doc__ = f"The {name} pack's items (media built for the picked ones only); see the module docstring."
    return loader


LOADERS = {name: _pack_loader(name) for name in PACKS}
xstest_prompts, xstest_responses, openai_moderation, simple_safety_tests, ailuminate, figstep_images, \
    benign_images, speech, video = (LOADERS[name] for name in PACKS)


def load_jsonl(path: Path) -> list[Item]:
    """A user's own set: one JSON object per line with `label` (safe|unsafe), optional `categories`
    (S-codes), and any of `text`, `response`, `image`, `audio`, `video` (paths relative to the file)."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as exc:
            raise SystemExit(f"{path}:{n}: not JSON ({exc})")
        if r.get("label") not in ("safe", "unsafe"):
            raise SystemExit(f"{path}:{n}: label must be 'safe' or 'unsafe'")
        for key in ("image", "audio", "video"):
            if r.get(key):
                r[key] = str((Path(path).parent / r[key]).resolve())
        unknown = set(r) - {"id", "label", "categories", "text", "response", "image", "audio", "video"}
        if unknown:
            raise SystemExit(f"{path}:{n}: unknown fields {sorted(unknown)}")
        items.append(Item(str(r.get("id", f"{Path(path).stem}-{n}")), Path(path).stem, r["label"],
                          list(r.get("categories", [])), r.get("text"), r.get("response"), r.get("image"),
                          r.get("audio"), r.get("video")))
    return items


def items_digest(items: list[Item]) -> str:
    """sha256 over what the items are: ids, labels, categories, texts and the bytes of every media file (so a
    pack whose code, source rows, rendering font or generated media changed is told apart from the same
    pack of the same name)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.label, it.categories, it.text, it.response], ensure_ascii=False).encode())
        for path in (it.image, it.audio, it.video):
            h.update(hashlib.sha256(Path(path).read_bytes()).digest() if path else b"-")
    return h.hexdigest()


def source_group(cand) -> str:
    """The split group of a pack candidate (before its media are built): its source prompt when it has one, else
    its item id (calibration/split.py)."""
    if isinstance(cand, Item):
        return split_mod.group_key(cand.text) if cand.text else f"id:{cand.id}"
    if cand[0] == "xstest":  # a benign rendering of an XSTest prompt
        return split_mod.group_key(cand[2])
    if cand[0] == "photo":
        return f"id:benign-photo-{cand[1]}"
    return source_group(cand[1])  # a video clip: its still's group


def side(item, seed: int = split_mod.SEED, heldout: float = split_mod.HELDOUT) -> str:
    """"train" or "heldout" for an evaluation-pack item or candidate: the side of its source group."""
    return split_mod.side_of_group(source_group(item), seed, heldout)


def load_with_report(packs: list, data: Path, media_dir: Path, limit: int | None,
                     seed: int, split: str | None = None) -> tuple[list[Item], dict[str, dict]]:
    """Items of the named packs (or JSONL files), at most `limit` per pack sampled with `seed` before any
    medium is generated, and per pack {"source_rows", "kept", "dropped": {reason: count}, "sampled"}
    (a .jsonl file reports under its stem, the pack name of its items). `split`: None for every item, "train" or
    "heldout" for one side of the split (a user's .jsonl is never split: it is theirs to judge on)."""
    if isinstance(packs, (str, Path)) or not all(isinstance(p, (str, Path)) for p in packs):
        raise TypeError(f"packs must be a list of pack names or .jsonl paths, got {packs!r}")
    if limit is not None and (not is_int(limit) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if split not in (None, *split_mod.SIDES):
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
    data, media_dir = Path(data), Path(media_dir)

    def pick(xs: list) -> list:  # sample before any media is generated
        return random.Random(seed).sample(xs, limit) if limit is not None and len(xs) > limit else list(xs)

    items, report = [], {}
    for pack in packs:
        if str(pack).endswith(".jsonl"):
            name = Path(pack).stem
            rows = load_jsonl(Path(pack))  # a bad line is an error, so every line is kept
            src = _Source(len(rows), rows, Counter())
        elif pack in SOURCES:
            if not data.exists():
                raise SystemExit(f"pack {pack} needs the seed data folder {data} (--data)")
            name, src = pack, SOURCES[pack](data)
            if split is not None:
                on_side = [c for c in src.kept if split_mod.side_of_group(source_group(c)) == split]
                src.dropped[f"on the {'held-out' if split == 'train' else 'training'} side of the split"] += \
                    len(src.kept) - len(on_side)
                src.kept = on_side
        else:
            raise SystemExit(f"unknown pack {pack!r}: choose from {PACKS} or give a .jsonl file")
        if name in report:
            raise SystemExit(f"pack {name!r} is given twice (a .jsonl file's pack name is its stem)")
        chosen = [src.build(c, media_dir) for c in pick(src.kept)]
        report[name] = {"source_rows": src.rows, "kept": len(src.kept), "dropped": dict(sorted(src.dropped.items())),
                        "sampled": len(chosen), "items_sha256": items_digest(chosen)}
        items += chosen
    return items, report


def load(packs: list, data: Path, media_dir: Path, limit: int | None, seed: int,
         split: str | None = None) -> list[Item]:
    """Items of the named packs (or JSONL files), `limit` per pack sampled with `seed`, of one side of the split
    or all."""
    return load_with_report(packs, data, media_dir, limit, seed, split)[0]
