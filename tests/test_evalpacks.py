"""Evaluation packs: the benign set is benign, every dropped row is reported, sampling happens before any
medium is generated, and the typographic images look like FigStep's. No timing."""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from omniguard_edge.calibration import evalpacks, media

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data (the seed data) is not here")


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _counts(entry: dict) -> dict:
    """A pack's report without its items hash (tested on its own below)."""
    return {k: v for k, v in entry.items() if k != "items_sha256"}


def _files(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def _ink_bands(path: Path) -> list[tuple[int, int]]:
    """(first, last) rows of each horizontal band holding dark pixels."""
    from PIL import Image

    ink = (np.asarray(Image.open(path).convert("L")) < 128).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ink.astype(int), [0]])))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


@pytest.fixture
def fake_media(monkeypatch):
    """Record what the packs would render or speak, without generating anything."""
    calls = {"typographic": [], "espeak": []}

    def typographic(path, text, steps=3):
        calls["typographic"].append(text)
        return path

    def espeak(path, text):
        calls["espeak"].append(text)
        return path

    monkeypatch.setattr(media, "typographic", typographic)
    monkeypatch.setattr(media, "espeak", espeak)
    return calls


@needs_data
def test_benign_pack_is_xstest_safe_prompts_and_photos_only(fake_media, tmp_path):
    items = evalpacks.benign_images(SHARED, tmp_path)
    xstest = _csv(SHARED / "text" / "xstest_prompts.csv")
    safe = {r["id"]: r["prompt"] for r in xstest if r["label"] == "safe"}
    photos = sorted((SHARED / "image" / "photos").iterdir())
    assert len(safe) == 250 and len(photos) == 13
    expected = {f"benign-xstest-{i}" for i in safe} | {f"benign-photo-{p.stem}" for p in photos}
    assert {it.id for it in items} == expected and len(items) == len(expected)  # ids unique, nothing else
    assert all(it.label == "safe" and it.categories == [] and it.pack == "benign_images" for it in items)
    # exactly the safe prompts were rendered, none of the unsafe ones, none of FigStep's stems
    rendered = fake_media["typographic"]
    assert sorted(rendered) == sorted(safe.values())
    assert not set(rendered) & {r["prompt"] for r in xstest if r["label"] != "safe"}
    stems = [r["sentence"] for r in _csv(SHARED / "image" / "benign_sentences.csv")]
    patterns = [re.compile(re.escape(s).replace(r"\*", ".+"), re.IGNORECASE) for s in stems]
    assert not [t for t in rendered for p in patterns if p.search(t)]
    assert {it.image for it in items if it.id.startswith("benign-photo-")} == {str(p) for p in photos}


@needs_data
def test_video_pack_safe_clips_come_from_the_benign_set(fake_media, tmp_path, monkeypatch):
    monkeypatch.setattr(media, "video", lambda path, *a, **k: path)
    items = evalpacks.video(SHARED, tmp_path)
    benign = {f"video-{it.id}" for it in evalpacks.benign_images(SHARED, tmp_path)}
    figstep = {f"video-{it.id}": it for it in evalpacks.figstep_images(SHARED, tmp_path)}
    assert {it.id for it in items if it.label == "safe"} == benign
    unsafe = {it.id: it for it in items if it.label == "unsafe"}
    assert set(unsafe) == set(figstep) and all(it.categories == figstep[i].categories for i, it in unsafe.items())


def _openai_unknown(path: Path) -> int:
    """Rows with no flag at 1 and a flag key missing, counted straight from the file."""
    n = 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            flags = [r.get(k) for k in evalpacks.OPENAI_TO_S]
            n += 1 not in flags and any(v != 0 for v in flags)
    return n


@needs_data
def test_drop_report_adds_up_and_names_the_known_drops(tmp_path):
    packs = [p for p in evalpacks.PACKS if p != "speech" or shutil.which("espeak-ng")]
    items, report = evalpacks.load_with_report(packs, SHARED, tmp_path, limit=2, seed=0)
    assert list(report) == packs
    for pack, r in report.items():
        assert set(r) == {"source_rows", "kept", "dropped", "sampled", "items_sha256"}
        assert r["source_rows"] == r["kept"] + sum(r["dropped"].values()), pack
        assert r["sampled"] == min(2, r["kept"]) == sum(it.pack == pack for it in items), pack
    # the XSTest response to "plan my enemy's death" has no prompt in xstest_prompts.csv (its text differs)
    prompts = {r["prompt"] for r in _csv(SHARED / "text" / "xstest_prompts.csv")}
    responses = _csv(SHARED / "text" / "xstest_v2_completions_gpt4.csv")
    orphans = [r for r in responses if r["prompt"] not in prompts]
    assert len(orphans) == 1
    assert _counts(report["xstest_responses"]) == {"source_rows": len(responses), "kept": len(responses) - 1,
                                          "dropped": {evalpacks.DROP_PROMPT_UNKNOWN: 1}, "sampled": 2}
    unknown = _openai_unknown(SHARED / "text" / "openai_moderation_samples-1680.jsonl.gz")
    assert unknown > 0 and report["openai_moderation"]["dropped"] == {evalpacks.DROP_OPENAI_UNKNOWN: unknown}
    assert report["ailuminate"]["dropped"] == {} and report["ailuminate"]["kept"] == 1200
    assert report["benign_images"]["source_rows"] == 250 + 13


@needs_data
def test_drop_report_counts_missing_files(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SHARED / "text", data / "text")
    fig = data / "image" / "figstep-safebench-tiny"
    fig.mkdir(parents=True)
    shutil.copy(SHARED / "image" / "figstep-safebench-tiny" / "questions.csv", fig)
    pngs = sorted((SHARED / "image" / "figstep-safebench-tiny").glob("*.png"))
    for png in pngs[:3]:
        shutil.copy(png, fig)
    (data / "image" / "photos").mkdir()
    shutil.copy(SHARED / "image" / "photos" / "coins.png", data / "image" / "photos")
    (data / "image" / "photos" / "notes.txt").write_text("not an image")
    _, report = evalpacks.load_with_report(["figstep_images", "benign_images"], data, tmp_path / "media", 1, 0)
    rows = len(_csv(fig / "questions.csv"))
    assert _counts(report["figstep_images"]) == {"source_rows": rows, "kept": 3, "sampled": 1,
                                        "dropped": {evalpacks.DROP_FIGSTEP_PNG: rows - 3}}
    assert report["benign_images"]["dropped"] == {evalpacks.DROP_PHOTO_SUFFIX: 1}
    assert report["benign_images"]["kept"] == 250 + 1


@needs_data
def test_speech_pack_holds_the_real_jfk_recording(fake_media, tmp_path):
    items = evalpacks.speech(SHARED, tmp_path)
    jfk = [it for it in items if it.id == "speech-jfk"]
    assert len(jfk) == 1 and jfk[0].label == "safe" and jfk[0].categories == []
    assert jfk[0].audio == str(SHARED / "audio" / "jfk.flac")
    labels = {r["id"]: r["label"] for r in _csv(SHARED / "text" / "xstest_prompts.csv")}
    spoken = {it.id: it.label for it in items if it.id != "speech-jfk"}
    assert spoken == {f"speech-xstest-{i}": label for i, label in labels.items()}
    assert len(fake_media["espeak"]) == len(labels)  # jfk is not synthesised


@needs_data
@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_speech_pack_speaks_only_the_sampled_prompts(tmp_path):
    import soundfile as sf

    items, report = evalpacks.load_with_report(["speech"], SHARED, tmp_path, limit=3, seed=1)
    assert _counts(report["speech"]) == {"source_rows": 451, "kept": 451, "dropped": {}, "sampled": 3}
    made = {it.audio for it in items if it.id != "speech-jfk"}
    assert _files(tmp_path) == made and all(sf.info(p).frames > 0 for p in made)


@needs_data
def test_sampling_is_deterministic_and_generates_only_sampled_media(tmp_path):
    def run(seed, folder):
        items, report = evalpacks.load_with_report(["benign_images", "video"], SHARED, folder, limit=4, seed=seed)
        return items, report, _files(folder)

    a, report, files_a = run(3, tmp_path / "a")
    b, _, files_b = run(3, tmp_path / "b")
    assert [it.to_dict() | {"image": None, "video": None} for it in a] == \
        [it.to_dict() | {"image": None, "video": None} for it in b]
    assert {report[p]["sampled"] for p in report} == {4} and len(a) == 8
    assert {Path(f).name for f in files_a} == {Path(f).name for f in files_b}
    others = [[it.id for it in run(seed, tmp_path / f"s{seed}")[0]] for seed in (4, 5)]
    assert any(ids != [it.id for it in a] for ids in others)
    # media: the sampled typographic stills and clips, nothing else
    stills = {it.image for it in a if it.id.startswith("benign-xstest-")}
    clips = {it.video for it in a if it.pack == "video"}
    assert stills <= files_a and clips <= files_a
    extra = files_a - stills - clips
    clip_stills = [it for it in a if it.id.startswith("video-benign-xstest-")]
    assert len(extra) == len(clip_stills) and all(Path(f).parent.name == "benign" for f in extra)
    assert len(files_a) < 3 * 8
    # a second load of the same sample reuses the cache
    again, _, files_again = run(3, tmp_path / "a")
    assert files_again == files_a and [it.to_dict() for it in again] == [it.to_dict() for it in a]


@needs_data
def test_rendered_typographic_image_is_figstep_sized_and_not_blank(tmp_path):
    from PIL import Image

    prompt = next(r["prompt"] for r in _csv(SHARED / "text" / "xstest_prompts.csv") if r["label"] == "safe")
    path = evalpacks.render_typographic(prompt, tmp_path / "t.png")
    img = Image.open(path)
    assert img.size == (760, 760) and img.mode == "RGB"
    dark = (np.asarray(img.convert("L")) < 128).mean()
    assert 0.01 < dark < 0.3
    font, pitch, lines = media.typographic_layout(prompt)
    assert lines[-3:] == ["1.", "2.", "3."] and len(_ink_bands(path)) == len(lines)


@needs_data
def test_typographic_layout_matches_a_real_figstep_image(tmp_path):
    font = media.typo_font()
    if not str(getattr(font, "path", "")).endswith(media.TYPO_FONTS):
        pytest.skip("no monospaced bold font (FreeMonoBold or DejaVu Sans Mono Bold) installed")
    fig = SHARED / "image" / "figstep-safebench-tiny"
    row = next(r for r in _csv(fig / "questions.csv") if (r["category_id"], r["task_id"]) == ("1", "1"))
    mine = _ink_bands(media.typographic(tmp_path / "mine.png", row["instruction"]))
    theirs = _ink_bands(fig / "query_ForbidQI_1_1_6.png")
    assert len(mine) == len(theirs) == 6  # three text lines, then 1. 2. 3.
    assert all(abs(m[0] - t[0]) <= 8 and abs(m[1] - t[1]) <= 8 for m, t in zip(mine, theirs))


def test_long_text_shrinks_to_fit_and_bad_text_is_refused(tmp_path):
    long = "a fairly long benign sentence about gardening and baking " * 4
    font, pitch, lines = media.typographic_layout(long)
    assert pitch < media.TYPO_PITCH and media.TYPO_ORIGIN[1] + len(lines) * pitch <= media.TYPO_SIZE
    assert all(font.getlength(line) <= media.TYPO_SIZE - 2 * media.TYPO_ORIGIN[0] for line in lines)
    with pytest.raises(ValueError, match="text"):
        media.typographic_layout("   ")
    with pytest.raises(ValueError, match="steps"):
        media.typographic_layout("hello", steps=-1)


def test_load_with_report_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="limit"):
        evalpacks.load_with_report(["xstest_prompts"], tmp_path, tmp_path, 0, 0)
    with pytest.raises(TypeError, match="packs"):
        evalpacks.load_with_report("xstest_prompts", tmp_path, tmp_path, None, 0)
    with pytest.raises(TypeError, match="seed"):
        evalpacks.load_with_report(["xstest_prompts"], tmp_path, tmp_path, None, "0")
    with pytest.raises(SystemExit, match="unknown pack"):
        evalpacks.load_with_report(["nope"], tmp_path, tmp_path, None, 0)


def test_jsonl_pack_reports_every_line(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"label": "safe", "text": "hi"}\n\n{"label": "unsafe", "text": "x", "categories": ["S1"]}\n')
    items, report = evalpacks.load_with_report([f], tmp_path / "none", tmp_path, 1, 0)
    assert {k: _counts(v) for k, v in report.items()} == {"mine": {"source_rows": 2, "kept": 2, "dropped": {},
                                                                   "sampled": 1}} and len(items) == 1
    with pytest.raises(SystemExit, match="twice"):
        evalpacks.load_with_report([f, str(f)], tmp_path, tmp_path, None, 0)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not here")
def test_items_hash_tells_item_sets_apart(tmp_path):
    """The accuracy gate refuses a baseline whose pack of the same name held other items: the hash must
    change with the items and stay put for the same ones."""
    def digest(seed):
        _, report = evalpacks.load_with_report(["xstest_prompts"], SHARED, tmp_path, 5, seed)
        return report["xstest_prompts"]["items_sha256"]

    assert digest(0) == digest(0) != digest(1)
    items = evalpacks.load(["xstest_prompts"], SHARED, tmp_path, 2, 0)
    before = evalpacks.items_digest(items)
    items[0].text += " "
    assert evalpacks.items_digest(items) != before
