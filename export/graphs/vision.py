"""Vision encoder graph: Qwen2.5-VL ViT with window attention, fed precomputed index tensors.

Inputs (all axes dynamic): pixel_values [patches, C*T*P*P] float32 (rows in merge-block order),
rot_pos [patches, 2] int64, window_index/reverse_index [tokens] int64, and the padded attention batches
(runtime/positions/vision.py): win_gather [windows, window_len], win_lens [windows], win_scatter [patches],
full_gather [frames, frame_len], full_lens [frames], full_scatter [patches], all int64.
Output: features [tokens, text_hidden] float32, in the input's merged-token order.

Each block attends within a batch of segments, `[segments, heads, longest, longest]` scores: the 64-patch windows
for the windowed blocks, each image or video frame for the full-attention ones (there in chunks of heads,
runtime/positions/vision.py FULL_HEAD_CHUNK, so one chunk's scores are live at a time). The work and memory of the
windowed blocks grow linearly with the patches, those of the full blocks with the sum of squared frame sizes.
"""

from __future__ import annotations

import numpy as np

from ...runtime.positions import vision as positions
from ...runtime.positions import vision_index
from .spec import NEG_BIAS, GraphCase, GraphDef, attention, rotate_half

INPUTS = ["pixel_values", "rot_pos", "window_index", "reverse_index", "win_gather", "win_lens", "win_scatter",
          "full_gather", "full_lens", "full_scatter"]


def build(parts):
    import torch
    from torch import nn

    visual = parts.visual
    cfg = visual.config

    class VisionGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = visual
            self.unit = cfg.spatial_merge_size**2
            self.full = set(cfg.fullatt_block_indexes)
            self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.clone(), persistent=False)

        def _attn(self, mod, x, cos, sin, batch, full):
            gather, bias, scatter = batch
            n, heads = x.shape[0], mod.num_heads
            q, k, v = (proj(x).reshape(n, heads, -1) for proj in (mod.q, mod.k, mod.v))
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            # [segments, longest, heads, head_dim] -> [segments, heads, longest, head_dim]
            q, k, v = (t[gather].permute(0, 2, 1, 3) for t in (q, k, v))
            step = positions.head_chunk(heads) if full else heads
            out = torch.cat([attention(q[:, h:h + step], k[:, h:h + step], v[:, h:h + step], bias, mod.scaling)
                             for h in range(0, heads, step)], dim=1) if step < heads else \
                attention(q, k, v, bias, mod.scaling)
            out = out.permute(0, 2, 1, 3).reshape(-1, heads * out.shape[-1])[scatter]
            return mod.proj(out)

        @staticmethod
        def _batch(gather, lens, scatter, dtype):
            """(gather, key bias [segments, 1, 1, longest], scatter): padded keys masked."""
            slots = torch.arange(gather.shape[1], dtype=lens.dtype)
            valid = slots.unsqueeze(0) < lens.unsqueeze(1)
            bias = torch.where(valid, torch.zeros((), dtype=dtype), torch.full((), NEG_BIAS, dtype=dtype))
            return gather, bias[:, None, None, :], scatter

        def forward(self, pixel_values, rot_pos, window_index, reverse_index, win_gather, win_lens, win_scatter,
                    full_gather, full_lens, full_scatter):
            x = self.visual.patch_embed(pixel_values)
            width = x.shape[-1]
            x = x.reshape(-1, self.unit, width)[window_index].reshape(-1, width)
            freqs = rot_pos.unsqueeze(-1).float() * self.inv_freq  # [P, 2, head_dim/4]
            emb = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
            emb = torch.cat([emb, emb], dim=-1)  # [P, head_dim]
            cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)  # [P, 1, head_dim]
            windows = self._batch(win_gather, win_lens, win_scatter, x.dtype)
            frames = self._batch(full_gather, full_lens, full_scatter, x.dtype)
            for i, blk in enumerate(self.visual.blocks):
                full = i in self.full
                x = x + self._attn(blk.attn, blk.norm1(x), cos, sin, frames if full else windows,
                                   full)
                x = x + blk.mlp(blk.norm2(x))
            return self.visual.merger(x)[reverse_index]

    return VisionGraph().eval()


def feeds_for(grids, cfg, rng) -> dict[str, np.ndarray]:
    """Random pixel rows plus the index tensors of `grids` (list of (t, h, w) in patches)."""
    idx = vision_index(grids, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    patches = sum(t * h * w for t, h, w in grids)
    row = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    return {
        "pixel_values": rng.standard_normal((patches, row)).astype(np.float32),
        **idx.feeds(INPUTS),
    }


# Grids that break naive code: unequal windows, several images in one call, a video with t > 1.
CASES = {
    "image_8x10": [(1, 8, 10)],
    "image_20x36": [(1, 20, 36)],
    "image_16x16": [(1, 16, 16)],
    "two_images": [(1, 8, 10), (1, 16, 16)],
    "video_t2": [(2, 8, 12)],
}


def cases(parts, rng):
    import torch

    visual = parts.visual
    out = []
    for name, grids in CASES.items():
        feeds = feeds_for(grids, visual.config, rng)

        def reference(feeds=feeds, grids=grids):
            with torch.no_grad():
                res = visual(torch.from_numpy(feeds["pixel_values"]), grid_thw=torch.tensor(grids))
            return {"features": res.pooler_output.float().numpy()}

        out.append(GraphCase(name, feeds, reference))
    return out


VISION = GraphDef(
    name="vision",
    interface=lambda parts: (INPUTS, ["features"], {
        "pixel_values": {0: "patches"}, "rot_pos": {0: "patches"}, "window_index": {0: "tokens"},
        "reverse_index": {0: "tokens"}, "win_gather": {0: "windows", 1: "window_len"}, "win_lens": {0: "windows"},
        "win_scatter": {0: "patches"}, "full_gather": {0: "frames", 1: "frame_len"}, "full_lens": {0: "frames"},
        "full_scatter": {0: "patches"}, "features": {0: "tokens"},
    }),
    build=build,
    example=lambda parts: feeds_for([(1, 8, 12)], parts.visual.config, np.random.default_rng(1)),
    cases=cases,
)
