"""The one train / held-out split of the labelled seed data (calibration/split.py), carried through the packs."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniguard_edge.calibration import evalpacks, split

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED / "text").is_dir(), reason=f"seed data {SHARED} is absent")
TEXT_PACKS = ["xstest_prompts", "xstest_responses", "openai_moderation", "simple_safety_tests", "ailuminate"]


def test_the_side_is_a_function_of_the_normalised_prompt():
    a = evalpacks.Item("x1", "p", "safe", text="How do I kill a Python process?")
    b = evalpacks.Item("x2", "q", "unsafe", text="  how do I KILL a python   process?\n", response="sure")
    assert evalpacks.side(a) == evalpacks.side(b)
    sides = {split.side_of_group(f"prompt {i}") for i in range(200)}
    assert sides == {"train", "heldout"}
    held = sum(split.side_of_group(f"prompt {i}") == "heldout" for i in range(4000)) / 4000
    assert abs(held - split.HELDOUT) < 0.03
    groups = [f"prompt {i}" for i in range(100)]
    assert [split.side_of_group(g, seed=1) for g in groups] != [split.side_of_group(g) for g in groups]


def test_media_candidates_take_their_source_prompts_side():
    prompt = "How can I build a birdhouse?"
    item = evalpacks.Item("xstest-7", "xstest_prompts", "safe", text=prompt)
    rendering = ("xstest", "7", prompt)
    assert evalpacks.source_group(rendering) == evalpacks.source_group(item)
    assert evalpacks.source_group(("benign", rendering)) == evalpacks.source_group(item)
    assert evalpacks.source_group(("photo", "coffee", "/x/coffee.png")) == "id:benign-photo-coffee"
    fig = evalpacks.Item("query_x_1_2_6", "figstep_images", "unsafe", image="/x.png")
    assert evalpacks.source_group(("figstep", fig)) == "id:query_x_1_2_6"


@needs_data
def test_text_packs_split_into_disjoint_sides_with_enough_held_out(tmp_path):
    train = evalpacks.load(TEXT_PACKS, SHARED, tmp_path, None, 0, split="train")
    held, report = evalpacks.load_with_report(TEXT_PACKS, SHARED, tmp_path, None, 0, split="heldout")
    everything = evalpacks.load(TEXT_PACKS, SHARED, tmp_path, None, 0)
    assert len(train) + len(held) == len(everything)
    assert {split.group_key(i.text) for i in train}.isdisjoint({split.group_key(i.text) for i in held})
    assert len(held) >= 1000
    for name, r in report.items():
        assert r["source_rows"] == r["kept"] + sum(r["dropped"].values())
        assert any("training side" in why for why in r["dropped"])
    # an XSTest prompt and its prompt+response row are on one side
    prompts = {i.text: evalpacks.side(i) for i in everything if i.pack == "xstest_prompts"}
    responses = [i for i in everything if i.pack == "xstest_responses"]
    assert responses and all(evalpacks.side(i) == prompts[i.text] for i in responses if i.text in prompts)


@needs_data
def test_a_split_is_refused_unless_it_names_a_side(tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        evalpacks.load(["xstest_prompts"], SHARED, tmp_path, None, 0, split="test")
