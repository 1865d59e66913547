"""TMRoPE position ids for the decoder (three rows: temporal, height, width).

Text and audio tokens advance all three rows together; an image or video block gets grid offsets
(t scaled to 25 ids per second for video, h and w in merged tokens) starting after the preceding text,
and the next text continues after the block's largest id. Replaces transformers' `get_rope_index`
(with `use_audio_in_video=False`, as the OmniGuard code calls it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RopeIds:
    """Special ids and constants the position rule needs, read from the checkpoint config."""

    image_token_id: int
    video_token_id: int
    audio_token_id: int
    spatial_merge_size: int = 2
    position_id_per_seconds: int = 25


def _vision_block(start: int, grid: tuple[int, int, int], merge: int, t_scale: np.ndarray) -> np.ndarray:
    t, h, w = grid
    gh, gw = h // merge, w // merge
    t_ids = np.repeat(t_scale, gh * gw)
    h_ids = np.tile(np.repeat(np.arange(gh), gw), t)
    w_ids = np.tile(np.arange(gw), t * gh)
    return np.stack([t_ids, h_ids, w_ids]).astype(np.int64) + start


def _runs(ids: np.ndarray, vision: tuple[int, int]):
    """(token, start, length) of each maximal run of equal vision placeholder tokens, and of each maximal stretch of
    other tokens between them (token -1): text and audio tokens all take one id per token, so a stretch of them is
    one block (a prompt of 400 text tokens is one block, not 400)."""
    is_vision = np.isin(ids, vision)
    key = np.where(is_vision, ids, -1)
    edges = np.flatnonzero(np.diff(key)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(ids)]])
    return [(int(key[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


def _sequence_positions(ids, cfg: RopeIds, images, videos, video_seconds) -> np.ndarray:
    """[3, len(ids)] positions of one unpadded sequence; consumes grids from the given iterators."""
    merge, blocks, nxt = cfg.spatial_merge_size, [], 0
    for token, _, length in _runs(ids, (cfg.image_token_id, cfg.video_token_id)):
        if token in (cfg.image_token_id, cfg.video_token_id):
            is_video = token == cfg.video_token_id
            grid = next(videos if is_video else images)
            t = grid[0]
            if is_video:  # float32 product then truncation, as the reference computes it
                scale = np.float32(next(video_seconds)) * np.float32(cfg.position_id_per_seconds)
                t_scale = (np.arange(t, dtype=np.float32) * scale).astype(np.int64)
            else:
                t_scale = np.arange(t, dtype=np.int64) * cfg.position_id_per_seconds
            expected = t * grid[1] * grid[2] // (merge * merge)
            if length != expected:
                kind = "video" if is_video else "image"
                raise ValueError(f"{kind} placeholder run of {length} tokens, grid {tuple(grid)} needs {expected}")
            block = _vision_block(nxt, grid, merge, t_scale)
        else:  # text and audio: one id per token on all three axes
            block = np.broadcast_to(np.arange(nxt, nxt + length, dtype=np.int64), (3, length))
        blocks.append(block)
        nxt = int(block.max()) + 1
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((3, 0), np.int64)


def rope_index(
    input_ids: np.ndarray,
    cfg: RopeIds,
    attention_mask: np.ndarray | None = None,
    image_grid_thw=None,
    video_grid_thw=None,
    video_second_per_grid=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Position ids [3, B, S] int64 and rope deltas [B, 1] int64 for a (left-)padded batch.

    Padding positions get 1, as in the reference. The decode step at cache length L uses
    position L + delta on all three rows.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch, seq = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask) == 1
    images = iter([tuple(int(v) for v in g) for g in np.asarray(image_grid_thw).reshape(-1, 3)] if image_grid_thw is not None else [])
    videos = iter([tuple(int(v) for v in g) for g in np.asarray(video_grid_thw).reshape(-1, 3)] if video_grid_thw is not None else [])
    seconds = iter(np.asarray(video_second_per_grid, dtype=np.float32).reshape(-1) if video_second_per_grid is not None else [])
    positions = np.ones((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        ids = input_ids[b][mask[b]]
        pos = _sequence_positions(ids, cfg, images, videos, seconds)
        positions[:, b, mask[b]] = pos
        deltas[b, 0] = (int(pos.max()) + 1 if pos.size else 0) - len(ids)
    return positions, deltas
