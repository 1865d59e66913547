"""numpy index helpers equal the transformers functions they replace (those comparisons need the export extra;
the rest runs on a runtime-only install)."""

from __future__ import annotations

import numpy as np
import pytest

from omniguard_edge.runtime.positions import RopeIds, audio_index, rope_index
from omniguard_edge.runtime.positions.vision import frame_seqlens, rot_pos_ids, vision_index, window_index


@pytest.fixture(scope="module")
def torch(export_extra):
    import torch

    return torch


@pytest.fixture(scope="module")
def omni(export_extra):
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni

    return modeling_qwen2_5_omni


GRIDS = {
    "8x10": [(1, 8, 10)], "20x36": [(1, 20, 36)], "16x16": [(1, 16, 16)],
    "two_images": [(1, 8, 10), (1, 16, 16)], "video_t2": [(2, 8, 12)], "video_t3_odd_windows": [(3, 10, 18)],
}


@pytest.mark.parametrize("name", GRIDS)
def test_vision_indices_match_transformers(name, torch):
    from transformers import vision_utils

    grid = torch.tensor(GRIDS[name])
    ref_pos = vision_utils.get_vision_position_ids(grid, 2)
    ref_win, ref_cu = vision_utils.get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    ref_full = vision_utils.get_vision_cu_seqlens(grid)
    np.testing.assert_array_equal(rot_pos_ids(GRIDS[name], 2), ref_pos.numpy())
    win, cu = window_index(GRIDS[name], 2, 112, 14)
    np.testing.assert_array_equal(win, ref_win.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())
    np.testing.assert_array_equal(frame_seqlens(GRIDS[name]), ref_full.numpy())


def test_vision_index_permutes_consistently():
    idx = vision_index(GRIDS["two_images"])
    np.testing.assert_array_equal(idx.window_index[idx.reverse_index], np.arange(len(idx.window_index)))
    # window segments never span two frames, and full segments are frames: windows nest inside them
    for seg in np.unique(idx.win_seg):
        assert len(np.unique(idx.full_seg[idx.win_seg == seg])) == 1


@pytest.mark.parametrize("name", GRIDS)
def test_padded_batches_hold_each_segment_in_order(name):
    """Row s of a gather lists segment s's patches in order, the rest padding; scatter puts every patch back in
    its own slot, so gathering then scattering is the identity."""
    idx = vision_index(GRIDS[name])
    for seg, gather, lens, scatter in ((idx.win_seg, idx.win_gather, idx.win_lens, idx.win_scatter),
                                       (idx.full_seg, idx.full_gather, idx.full_lens, idx.full_scatter)):
        assert gather.shape == (seg.max() + 1, np.bincount(seg).max()) and lens.tolist() == np.bincount(seg).tolist()
        for s, row in enumerate(gather):
            np.testing.assert_array_equal(row[:lens[s]], np.flatnonzero(seg == s))
            assert not row[lens[s]:].any()
        np.testing.assert_array_equal(gather.reshape(-1)[scatter], np.arange(len(seg)))
    assert idx.win_gather.shape[1] <= 64  # at most 8x8 patches per 112-pixel window


def test_padded_batches_of_720p_are_linear_in_patches():
    """1280x720 (92x52 patches): 84 windows of at most 64 patches, not 4,784 x 4,784."""
    idx = vision_index([(1, 92, 52)])
    assert idx.win_gather.shape == (84, 64) and idx.full_gather.shape == (1, 4784)


def test_padded_segments_refuse_a_gap():
    from omniguard_edge.runtime.positions.vision import padded_segments

    with pytest.raises(ValueError, match="without gaps"):
        padded_segments(np.array([0, 0, 2]))


def test_vision_index_rejects_odd_grid():
    with pytest.raises(ValueError, match="merge size"):
        vision_index([(1, 7, 8)])


@pytest.mark.parametrize("frames", [[5], [301], [1234], [3000], [301, 1234], [200, 400, 7]])
def test_audio_indices_match_transformers(frames, torch, omni):
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((128, n)).astype(np.float32) for n in frames]
    idx = audio_index(clips)
    lens = torch.tensor(frames)
    ref_padded, ref_lengths = omni.chunk_and_pad_features(torch.from_numpy(np.concatenate(clips, 1)), lens, 100)
    np.testing.assert_array_equal(idx.chunk_lengths, ref_lengths.numpy())
    np.testing.assert_array_equal(idx.padded_feature, ref_padded.numpy())
    np.testing.assert_array_equal(idx.pool_index, omni.get_pool_indices(lens).numpy())
    _, out_lens = omni.Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, lens)
    assert list(idx.tokens_per_clip) == out_lens.tolist()


def test_audio_rejects_too_short():
    with pytest.raises(ValueError, match="too short"):
        audio_index([np.zeros((128, 3), np.float32)])


def _prompt(special, rng, pieces):
    """Token ids: random text runs and media placeholders, wrapped in bos/eos as the template does."""
    out = []
    for kind, n in pieces:
        if kind == "text":
            out += rng.integers(0, special["text_vocab"], n).tolist()
        elif kind in ("image", "video"):
            out += [special["vision_bos"]] + [special[kind]] * n + [special["vision_eos"]]
        else:
            out += [special["audio_bos"]] + [special["audio"]] * n + [special["audio_eos"]]
    return out


CASES = {
    "text": dict(pieces=[("text", 17)]),
    "image": dict(pieces=[("text", 9), ("image", 20), ("text", 5)], images=[(1, 8, 10)]),
    "two_images": dict(pieces=[("text", 4), ("image", 20), ("image", 64), ("text", 3)], images=[(1, 8, 10), (1, 16, 16)]),
    "video": dict(pieces=[("text", 6), ("video", 48), ("text", 4)], videos=[(2, 8, 12)], seconds=[1.0]),
    "video_fractional_seconds": dict(pieces=[("text", 6), ("video", 72), ("text", 2)], videos=[(3, 8, 12)], seconds=[0.7]),
    "audio": dict(pieces=[("text", 6), ("audio", 75), ("text", 4)], audio=[301]),
    "image_audio": dict(pieces=[("text", 6), ("image", 20), ("audio", 75), ("text", 4)], images=[(1, 8, 10)], audio=[301]),
}


@pytest.mark.parametrize("name", CASES)
def test_rope_index_matches_get_rope_index(name, torch, tiny_thinker_model, tiny_parts):
    case, special = CASES[name], tiny_parts.special
    ids = torch.tensor([_prompt(special, np.random.default_rng(1), case["pieces"])])
    mask = torch.ones_like(ids)
    kw = dict(image_grid_thw=torch.tensor(case["images"]) if "images" in case else None,
              video_grid_thw=torch.tensor(case["videos"]) if "videos" in case else None,
              audio_seqlens=torch.tensor(case["audio"]) if "audio" in case else None,
              second_per_grids=torch.tensor(case["seconds"]) if "seconds" in case else None)
    ref_pos, ref_delta = tiny_thinker_model.model.get_rope_index(ids, attention_mask=mask, **kw)
    cfg = RopeIds(special["image"], special["video"], special["audio"])
    pos, delta = rope_index(ids.numpy(), cfg, mask.numpy(), image_grid_thw=case.get("images"),
                            video_grid_thw=case.get("videos"), video_second_per_grid=case.get("seconds"))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())


def test_rope_index_left_padded_batch(torch, tiny_thinker_model, tiny_parts):
    special, rng = tiny_parts.special, np.random.default_rng(2)
    long = _prompt(special, rng, [("text", 5), ("image", 20), ("text", 6)])
    short = _prompt(special, rng, [("text", 3), ("image", 20), ("text", 2)])
    pad = len(long) - len(short)
    ids = torch.tensor([long, [special["pad"]] * pad + short])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    grids = [(1, 8, 10), (1, 8, 10)]
    ref_pos, ref_delta = tiny_thinker_model.model.get_rope_index(ids, torch.tensor(grids), None, mask)
    pos, delta = rope_index(ids.numpy(), RopeIds(special["image"], special["video"], special["audio"]),
                            mask.numpy(), image_grid_thw=grids)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())


# placeholder ids of a made-up vocabulary: rope_index reads only the ids it is given
SYNTHETIC = {"text_vocab": 90, "image": 93, "video": 94, "audio": 95, "vision_bos": 96, "vision_eos": 97,
             "audio_bos": 98, "audio_eos": 99}


def test_rope_index_rejects_wrong_placeholder_count():
    special = SYNTHETIC
    ids = np.array([_prompt(special, np.random.default_rng(3), [("text", 3), ("image", 19)])])
    with pytest.raises(ValueError, match="needs 20"):
        rope_index(ids, RopeIds(special["image"], special["video"], special["audio"]), image_grid_thw=[(1, 8, 10)])


def test_rope_index_known_answers():
    """Worked by hand (TMRoPE): text counts up on all three rows; a 1x4x6 image (2x3 merged tokens) sits at one
    time step with its row/column indices; text after the image resumes at the largest position plus one."""
    s = SYNTHETIC
    cfg = RopeIds(s["image"], s["video"], s["audio"])
    ids = [1, 2, 3, s["vision_bos"]] + [s["image"]] * 6 + [s["vision_eos"], 4, 5]
    pos, delta = rope_index(np.array([ids]), cfg, image_grid_thw=[(1, 4, 6)])
    assert pos[:, 0].tolist() == [[0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9],
                                  [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9],
                                  [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9]]
    assert delta.tolist() == [[10 - len(ids)]]
    text = np.array([[7, 8, 9, 10, 11]])
    pos, delta = rope_index(text, cfg)
    assert pos.tolist() == [[list(range(5))]] * 3 and delta.tolist() == [[0]]


@pytest.mark.parametrize("names", [
    ("pixel_values", "rot_pos", "window_index", "reverse_index", "win_seg", "full_seg"),  # exported before
    ("pixel_values", "rot_pos", "window_index", "reverse_index", "win_gather", "win_lens", "win_scatter",
     "full_gather", "full_lens", "full_scatter"),
])
def test_encode_vision_feeds_what_the_graph_declares(names):
    """A bundle exported before the padded batches takes the segment ids; a newer one the gather/scatter set: the
    runtime feeds each exactly its own inputs, so old bundles keep working."""
    from omniguard_edge.runtime.encoders import encode_vision

    grids = [(1, 8, 10), (2, 8, 12)]
    fed = {}

    class Session:
        input_names = names

        def run(self, feeds, outputs, run_options=None):
            fed.update(feeds)
            return {"features": np.zeros((sum(t * h * w for t, h, w in grids) // 4, 3), np.float32)}

    rows = [np.zeros((t * h * w, 1176), np.float32) for t, h, w in grids]
    out = encode_vision(Session(), rows, grids, {"spatial_merge_size": 2, "window_size": 112, "patch_size": 14})
    assert set(fed) == set(names) and [len(f) for f in out] == [20, 48]
