"""Vision-encoder index tensors (Qwen2.5-VL ViT with window attention).

Patch rows arrive in 2x2-merge-block order (as the image processor writes them). The graph permutes
merged tokens into window order, attends within windows (or within whole frames at the full-attention
blocks), merges 2x2 blocks and permutes back. Everything that depends on the grid is computed here.

Attention runs over a padded batch: the windows (or frames) as rows of `[segments, longest]`, each row the
patch indices of one segment (window order) padded at its end, with its length; the graph gathers q, k and v
into that batch, masks the padded keys and scatters the result back (`win_scatter`: each patch's slot in the
flattened batch). So its work and memory grow with patches x longest window, not patches squared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VisionIndex:
    """Graph inputs for one vision call (one or several images, or video clips)."""

    rot_pos: np.ndarray  # [patches, 2] int64: (row, col) of each patch, already in window order
    window_index: np.ndarray  # [tokens] int64: merged-token order used by window attention
    reverse_index: np.ndarray  # [tokens] int64: argsort(window_index), restores the input order
    win_seg: np.ndarray  # [patches] int64: window id of each patch in window order
    full_seg: np.ndarray  # [patches] int64: frame id of each patch in window order
    win_gather: np.ndarray  # [windows, longest window] int64: patch rows of each window, padded with 0
    win_lens: np.ndarray  # [windows] int64: patches in each window
    win_scatter: np.ndarray  # [patches] int64: each patch's slot in the flattened [windows * longest] batch
    full_gather: np.ndarray  # [frames, longest frame] int64: the same per frame (the full-attention blocks)
    full_lens: np.ndarray  # [frames] int64
    full_scatter: np.ndarray  # [patches] int64

    def feeds(self, names) -> dict[str, np.ndarray]:
        """The index inputs among `names` (a graph's input names): bundles exported before the padded batch
        take win_seg/full_seg, newer ones the gather/scatter set."""
        return {n: getattr(self, n) for n in names if n in INDEX_INPUTS}


# heads per chunk of the full-attention blocks' frame batch: one chunk's scores are live at a time. Measured on
# small's encoder (16 heads), 1280x720, 2 threads: chunks of 1 / 2 / 4 / 16 heads 35.5 / 36.3 / 36.3 / 36.8 s, peak
# RSS 4.56 / 5.56 / 5.61 / 6.68 GB (docs/performance.md "Vision attention"). The manifest records it (vision.full_head_chunk).
FULL_HEAD_CHUNK = 1


def head_chunk(heads: int) -> int:
    """Heads per full-attention chunk of an encoder with `heads` heads (all of them when FULL_HEAD_CHUNK is 0)."""
    return min(FULL_HEAD_CHUNK or heads, heads)


INDEX_INPUTS = ("rot_pos", "window_index", "reverse_index", "win_seg", "full_seg", "win_gather", "win_lens",
                "win_scatter", "full_gather", "full_lens", "full_scatter")


def _grid_list(grid_thw) -> list[tuple[int, int, int]]:
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return [(int(t), int(h), int(w)) for t, h, w in grid]


def rot_pos_ids(grid_thw, merge: int) -> np.ndarray:
    """(row, col) per patch in merge-block order; replaces transformers' `get_vision_position_ids`.

    Returns int64 [sum(t*h*w), 2].
    """
    out = []
    for t, h, w in _grid_list(grid_thw):
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64)


def window_side(merge: int, window_size: int, patch_size: int) -> int:
    """Merged tokens per side of one attention window (112 px windows of 14 px patches merged 2x2: 4)."""
    return max(1, window_size // merge // patch_size)


def window_index(grid_thw, merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Window order of merged tokens and patch-level window boundaries.

    Replaces transformers' `get_vision_window_index`. Returns (window_index int64 [tokens],
    cu_window_seqlens int64 [windows + 1], boundaries in patches, empty windows dropped).
    """
    side = window_side(merge, window_size, patch_size)
    unit = merge * merge
    indices, cu, offset = [], [0], 0
    for t, h, w in _grid_list(grid_thw):
        gh, gw = h // merge, w // merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = side - gh % side, side - gw % side
        nh, nw = (gh + pad_h) // side, (gw + pad_w) // side
        padded = np.full((t, gh + pad_h, gw + pad_w), -100, dtype=np.int64)
        padded[:, :gh, :gw] = index
        padded = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, side * side)
        seqlens = (padded != -100).sum(axis=-1).reshape(-1)
        flat = padded.reshape(-1)
        indices.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # torch.unique_consecutive
    return np.concatenate(indices).astype(np.int64), cu_arr[keep]


def frame_seqlens(grid_thw) -> np.ndarray:
    """Cumulative patch counts per frame (full attention segments); replaces `get_vision_cu_seqlens`."""
    lens = [h * w for t, h, w in _grid_list(grid_thw) for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def _segments(cu: np.ndarray) -> np.ndarray:
    """Segment id per position from cumulative boundaries [0, a, b, ...]."""
    return np.repeat(np.arange(len(cu) - 1), np.diff(cu)).astype(np.int64)


def padded_segments(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gather [segments, longest], lens [segments], scatter [positions]) for segment ids `seg` (0..S-1, each id
    used, in any order): row s of gather lists the positions of segment s in order, padded with 0 (a valid row
    whose keys the graph masks); scatter[i] is position i's slot in the flattened gather."""
    seg = np.asarray(seg, dtype=np.int64)
    lens = np.bincount(seg).astype(np.int64)
    if len(seg) == 0 or (lens == 0).any():
        raise ValueError("segment ids must number every segment from 0 without gaps")
    longest = int(lens.max())
    order = np.argsort(seg, kind="stable")  # positions grouped by segment, in order within each
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    slot = np.empty(len(seg), dtype=np.int64)
    slot[order] = np.arange(len(seg)) - np.repeat(starts, lens)
    scatter = seg * longest + slot
    gather = np.zeros(len(lens) * longest, dtype=np.int64)
    gather[scatter] = np.arange(len(seg))
    return gather.reshape(len(lens), longest), lens, scatter


def vision_index(grid_thw, merge: int = 2, window_size: int = 112, patch_size: int = 14) -> VisionIndex:
    """All index inputs of the vision graph for the given grids (t, h, w in patches)."""
    for t, h, w in _grid_list(grid_thw):
        if t < 1 or h % merge or w % merge or h < merge or w < merge:
            raise ValueError(f"grid {(t, h, w)} is not a positive multiple of the merge size {merge}")
    unit = merge * merge
    win_idx, cu_win = window_index(grid_thw, merge, window_size, patch_size)
    patch_order = (win_idx[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    full = _segments(frame_seqlens(grid_thw))[patch_order]
    win = _segments(cu_win)
    win_gather, win_lens, win_scatter = padded_segments(win)
    full_gather, full_lens, full_scatter = padded_segments(full)
    return VisionIndex(
        rot_pos=rot_pos_ids(grid_thw, merge)[patch_order],
        window_index=win_idx,
        reverse_index=np.argsort(win_idx, kind="stable").astype(np.int64),
        win_seg=win,
        full_seg=full,
        win_gather=win_gather, win_lens=win_lens, win_scatter=win_scatter,
        full_gather=full_gather, full_lens=full_lens, full_scatter=full_scatter,
    )
