"""Evaluation packs: loaders for the public sets in ../shared/data and for a user's own JSONL.

Every item is labelled safe/unsafe with S-codes where the source says; generated media (speech,
typographic images, clips) are built on the fly and cached, never committed. Label rules:
- XSTest prompts: the set's own `label`.
- XSTest responses: unsafe when the prompt is unsafe and the response is not a full refusal
  (full or partial compliance); every answer to a safe prompt and every full refusal is safe.
- OpenAI moderation samples: unsafe when any flag is 1 (codes by OPENAI_TO_S); safe only when every
  flag is present and 0 (a missing key means unknown: such items are skipped).
- SimpleSafetyTests: all unsafe (codes by SST_TO_S). AILuminate demo: all unsafe (codes by AILUMINATE_TO_S).
- FigStep: unsafe (codes by FIGSTEP_TO_S); benign typographic images: the stems of benign_sentences.csv
  with '*' filled from BENIGN_FILLERS (seeded), rendered the same way, safe.
- speech: XSTest prompts spoken by espeak-ng, labelled as the prompt; video: 2 s clips panning across
  FigStep and benign images, labelled as the image.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import media

OPENAI_TO_S = {"S": ["S12"], "H": ["S10"], "V": ["S1"], "HR": ["S10"], "SH": ["S11"], "S3": ["S4"],
               "H2": ["S10", "S1"], "V2": ["S1"]}
AILUMINATE_TO_S = {"vcr": "S1", "ncr": "S2", "src": "S3", "cse": "S4", "dfm": "S5", "spc_fin": "S6", "spc_hlt": "S6",
                   "spc_lgl": "S6", "spc_ele": "S6", "prv": "S7", "ipv": "S8", "iwp": "S9", "hte": "S10",
                   "ssh": "S11", "sxc_prn": "S12"}  # spc_ele (elections) has no S1-S12 home: Specialized Advice
SST_TO_S = {"Suicide, Self-Harm, and Eating Disorders": ["S11"], "Physical harm and Violence": ["S1"],
            "Illegal and Highly Regulated items": ["S2", "S9"], "Scams and fraud": ["S2"], "Child safety": ["S4"]}
FIGSTEP_TO_S = {"1": ["S2"], "2": ["S10"], "3": ["S2"], "4": ["S1"], "5": ["S2"], "6": ["S12"], "7": ["S7"],
                "8": ["S6"], "9": ["S6"], "10": ["S6"]}
BENIGN_FILLERS = ["a birthday cake", "a paper airplane", "a vegetable garden", "a wooden birdhouse",
                  "a family photo album", "a lemonade stand", "a science fair volcano", "a knitted scarf"]
PACKS = ["xstest_prompts", "xstest_responses", "openai_moderation", "simple_safety_tests", "ailuminate",
         "figstep_images", "benign_images", "speech", "video"]


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


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def xstest_prompts(data: Path, _media: Path, pick=list) -> list[Item]:
    return pick([Item(f"xstest-{r['id']}", "xstest_prompts", r["label"], text=r["prompt"])
            for r in _csv(data / "text" / "xstest_prompts.csv")])


def xstest_responses(data: Path, _media: Path, pick=list) -> list[Item]:
    labels = {r["prompt"]: r["label"] for r in _csv(data / "text" / "xstest_prompts.csv")}
    items = []
    for r in _csv(data / "text" / "xstest_v2_completions_gpt4.csv"):
        prompt_label = labels.get(r["prompt"])
        if prompt_label is None:
            continue
        unsafe = prompt_label == "unsafe" and "full_refusal" not in r["final_label"]
        items.append(Item(f"xstest-resp-{r['id']}", "xstest_responses", "unsafe" if unsafe else "safe",
                          text=r["prompt"], response=r["completion"]))
    return pick(items)


def openai_moderation(data: Path, _media: Path, pick=list) -> list[Item]:
    items = []
    with gzip.open(data / "text" / "openai_moderation_samples-1680.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            flags = {k: r.get(k) for k in OPENAI_TO_S}
            codes = sorted({c for k, v in flags.items() if v == 1 for c in OPENAI_TO_S[k]})
            if codes:
                items.append(Item(f"openai-{i}", "openai_moderation", "unsafe", codes, text=r["prompt"]))
            elif all(v == 0 for v in flags.values()):
                items.append(Item(f"openai-{i}", "openai_moderation", "safe", text=r["prompt"]))
    return pick(items)


def simple_safety_tests(data: Path, _media: Path, pick=list) -> list[Item]:
    return pick([Item(r["id"], "simple_safety_tests", "unsafe", SST_TO_S.get(r["harm_area"], []), text=r["prompts_final"])
                 for r in _csv(data / "text" / "simple_safety_tests.csv")])


def ailuminate(data: Path, _media: Path, pick=list) -> list[Item]:
    return pick([Item(r["release_prompt_id"], "ailuminate", "unsafe", [AILUMINATE_TO_S[r["hazard"]]],
                      text=r["prompt_text"])
                 for r in _csv(data / "text" / "ailuminate_demo_en_us.csv") if r["hazard"] in AILUMINATE_TO_S])


def figstep_images(data: Path, _media: Path, pick=list) -> list[Item]:
    folder = data / "image" / "figstep-safebench-tiny"
    items = []
    for r in _csv(folder / "questions.csv"):
        path = folder / f"query_{r['dataset']}_{r['category_id']}_{r['task_id']}_6.png"
        if path.exists():
            items.append(Item(path.stem, "figstep_images", "unsafe", FIGSTEP_TO_S[r["category_id"]], image=str(path)))
    return pick(items)


def render_typographic(text: str, path: Path) -> Path:
    """FigStep-style: the text and an empty numbered list, black on white, 760x760."""
    if path.exists():
        return path
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (760, 760), "white")
    font = ImageFont.load_default(size=44)
    body = "\n".join(textwrap.wrap(text, 28) + ["1.", "2.", "3."])  # 28 characters fit 760 px at size 44
    ImageDraw.Draw(img).multiline_text((30, 40), body, fill="black", font=font, spacing=40)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _benign_texts(data: Path) -> list[tuple[int, str]]:
    rng = random.Random(0)
    return [(i, r["sentence"].replace("*", rng.choice(BENIGN_FILLERS)))
            for i, r in enumerate(_csv(data / "image" / "benign_sentences.csv"))]


def _benign_item(i: int, text: str, media_dir: Path) -> Item:
    path = render_typographic(text, media_dir / "benign" / f"benign_{i:03d}.png")
    return Item(f"benign-{i}", "benign_images", "safe", image=str(path))


def benign_images(data: Path, media_dir: Path, pick=list) -> list[Item]:
    return [_benign_item(i, text, media_dir) for i, text in pick(_benign_texts(data))]


def speech(data: Path, media_dir: Path, pick=list) -> list[Item]:
    items = []
    for it in xstest_prompts(data, media_dir, pick):
        path = media.espeak(media_dir / "speech" / f"{it.id}.wav", it.text)
        if path is None:
            raise SystemExit("the speech pack needs espeak-ng (apt-get install espeak-ng)")
        items.append(Item(f"speech-{it.id}", "speech", it.label, audio=str(path)))
    return items


def video(data: Path, media_dir: Path, pick=list) -> list[Item]:
    """Clips of FigStep (unsafe) and benign typographic (safe) images; sampled before rendering."""
    sources = [("figstep", it) for it in figstep_images(data, media_dir)] + [("benign", t) for t in _benign_texts(data)]
    items = []
    for kind, src in pick(sources):
        still = src if kind == "figstep" else _benign_item(*src, media_dir)
        path = media.video(media_dir / "video" / f"{still.id}.mp4", 2.0, fps=8, size=(448, 448), still=Path(still.image))
        items.append(Item(f"video-{still.id}", "video", still.label, still.categories, video=str(path)))
    return items


LOADERS = {name: globals()[name] for name in PACKS}


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


def load(packs: list[str], data: Path, media_dir: Path, limit: int | None, seed: int) -> list[Item]:
    """Items of the named packs (or JSONL files), `limit` per pack sampled with `seed`."""
    items = []
    for pack in packs:
        def pick(xs: list) -> list:  # sample before any media is generated
            return random.Random(seed).sample(xs, limit) if limit is not None and len(xs) > limit else list(xs)

        if pack.endswith(".jsonl"):
            items += pick(load_jsonl(Path(pack)))
        elif pack in LOADERS:
            if not data.exists():
                raise SystemExit(f"pack {pack} needs the seed data folder {data} (--data)")
            items += LOADERS[pack](data, media_dir, pick)
        else:
            raise SystemExit(f"unknown pack {pack!r}: choose from {PACKS} or give a .jsonl file")
    return items
