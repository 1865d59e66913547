"""Audio encoder graph: Whisper-style encoder with chunked attention, fed precomputed indices.

Inputs: padded_feature [chunks, mel_bins, frames<=2*n_window] float32, chunk_lengths [chunks] int64,
pool_index [tokens] int64. Output: features [tokens, text_hidden] float32.
Attention runs per chunk on the padded layout with a key-padding bias; the reference packs the valid
frames instead: same math, one batched matmul.
"""

from __future__ import annotations

import numpy as np

from ...runtime.positions import audio_index
from .spec import NEG_BIAS, GraphCase, GraphDef, attention


def build(parts):
    import torch
    from torch import nn

    tower = parts.audio_tower

    class AudioGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = tower

        def _attn(self, mod, x, bias):
            c, n = x.shape[0], x.shape[1]
            q, k, v = (p(x).reshape(c, n, mod.num_heads, -1).transpose(1, 2) for p in (mod.q_proj, mod.k_proj, mod.v_proj))
            out = attention(q, k, v, bias, mod.scaling)
            return mod.out_proj(out.transpose(1, 2).reshape(c, n, -1))

        def forward(self, padded_feature, chunk_lengths, pool_index):
            t = self.tower
            frames = torch.arange(padded_feature.shape[2], dtype=torch.int64)
            mask = (frames.unsqueeze(0) < chunk_lengths.unsqueeze(1)).unsqueeze(1).to(padded_feature.dtype)
            h = nn.functional.gelu(t.conv1(padded_feature)) * mask
            h = nn.functional.gelu(t.conv2(h)).transpose(1, 2)  # [chunks, frames/2, d_model]
            h = h + t.positional_embedding.positional_embedding[: h.shape[1]].unsqueeze(0)
            after = (chunk_lengths - 1) // 2 + 1
            keep = torch.arange(h.shape[1], dtype=torch.int64).unsqueeze(0) < after.unsqueeze(1)
            bias = torch.where(keep, torch.zeros((), dtype=h.dtype), torch.full((), NEG_BIAS, dtype=h.dtype))
            bias = bias[:, None, None, :]
            for layer in t.layers:
                h = h + self._attn(layer.self_attn, layer.self_attn_layer_norm(h), bias)
                h = h + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))
            valid = h.reshape(-1, h.shape[-1])[keep.reshape(-1)]
            pooled = (valid[pool_index] + valid[pool_index + 1]) / 2
            return t.proj(t.ln_post(pooled))

    return AudioGraph().eval()


def feeds_for(frames: list[int], bins: int, n_window: int, rng) -> tuple[dict, list[np.ndarray]]:
    clips = [rng.standard_normal((bins, n)).astype(np.float32) for n in frames]
    idx = audio_index(clips, n_window)
    feeds = {"padded_feature": idx.padded_feature, "chunk_lengths": idx.chunk_lengths, "pool_index": idx.pool_index}
    return feeds, clips


# Very short audio, one chunk and a tail, several chunks, 30 s, and a batch of two clips.
CASES = {"frames_5": [5], "frames_301": [301], "frames_1234": [1234], "frames_3000": [3000], "two_clips": [301, 1234]}


def cases(parts, rng):
    import torch

    tower = parts.audio_tower
    cfg = tower.config
    out = []
    for name, frames in CASES.items():
        feeds, clips = feeds_for(frames, cfg.num_mel_bins, cfg.n_window, rng)

        def reference(clips=clips):
            with torch.no_grad():
                res = tower(torch.from_numpy(np.concatenate(clips, axis=1)),
                            feature_lens=torch.tensor([c.shape[1] for c in clips]))
            return {"features": res.last_hidden_state.float().numpy()}

        out.append(GraphCase(name, feeds, reference))
    return out


AUDIO = GraphDef(
    name="audio",
    interface=lambda parts: (["padded_feature", "chunk_lengths", "pool_index"], ["features"], {
        "padded_feature": {0: "chunks", 2: "frames"}, "chunk_lengths": {0: "chunks"},
        "pool_index": {0: "tokens"}, "features": {0: "tokens"}}),
    build=build,
    example=lambda parts: feeds_for([450], parts.audio_tower.config.num_mel_bins,
                                    parts.audio_tower.config.n_window, np.random.default_rng(1))[0],
    cases=cases,
)
