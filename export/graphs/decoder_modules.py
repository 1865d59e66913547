"""The decoder graph's torch pieces. The whole-graph export composes them in one module; the
low-memory export traces each on its own (export/layered.py) and stitches the ONNX graphs."""

from __future__ import annotations

import torch
from torch import nn

from .spec import NEG_BIAS, attention, rotate_half


def mrope_axis_of(sections: list[int]) -> torch.Tensor:
    """For each rotary frequency, which of the 3 position rows (t, h, w) drives it."""
    return torch.tensor([i % 3 for i, s in enumerate(sections) for _ in range(s)], dtype=torch.int64)


class DecoderPrologue(nn.Module):
    """(inputs_embeds, attention_mask, position_ids, past_key_0) -> rope cos, sin [B,1,S,D], bias [B,1,S,T]."""

    def __init__(self, inv_freq: torch.Tensor, sections: list[int]):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.clone().float(), persistent=False)
        self.register_buffer("axis_of", mrope_axis_of(sections), persistent=False)

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_0):
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [3, B, S, head_dim/2]
        sel = self.axis_of.view(1, 1, 1, -1).expand(1, freqs.shape[1], freqs.shape[2], -1)
        freqs = torch.gather(freqs, 0, sel)[0]  # [B, S, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [B, 1, S, head_dim]
        seq, total, past_len = inputs_embeds.shape[1], attention_mask.shape[1], past_key_0.shape[2]
        q_pos = torch.arange(seq, dtype=torch.int64) + past_len
        causal = torch.arange(total, dtype=torch.int64).unsqueeze(0) <= q_pos.unsqueeze(1)  # [S, T]
        allowed = causal.unsqueeze(0).unsqueeze(0) & (attention_mask != 0)[:, None, None, :]
        dtype = inputs_embeds.dtype
        bias = torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), NEG_BIAS, dtype=dtype))
        return emb.cos(), emb.sin(), bias


class DecoderLayer(nn.Module):
    """One transformers Qwen2 decoder layer with an explicit KV cache:
    (hidden, cos, sin, bias, past_key, past_value) -> (hidden, present_key, present_value)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, h, cos, sin, bias, past_k, past_v):
        mod, x = self.layer.self_attn, self.layer.input_layernorm(h)
        b, s = x.shape[0], x.shape[1]
        q = mod.q_proj(x).reshape(b, s, -1, mod.head_dim).transpose(1, 2)
        k = mod.k_proj(x).reshape(b, s, -1, mod.head_dim).transpose(1, 2)
        v = mod.v_proj(x).reshape(b, s, -1, mod.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        groups = mod.num_key_value_groups
        kk = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        vv = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        out = attention(q, kk, vv, bias, mod.scaling)
        h = h + mod.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        h = h + self.layer.mlp(self.layer.post_attention_layernorm(h))
        return h, k, v


class DecoderEpilogue(nn.Module):
    """hidden [B, S, H] -> logits of the last position [B, vocab]."""

    def __init__(self, norm: nn.Module, head: nn.Module):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, h):
        return self.head(self.norm(h[:, -1:, :]))[:, 0, :]


class DecoderGraph(nn.Module):
    """The whole decoder: prologue, every layer, epilogue (inputs and outputs as decoder.interface)."""

    def __init__(self, lm: nn.Module, head: nn.Module):
        super().__init__()
        self.prologue = DecoderPrologue(lm.rotary_emb.inv_freq, lm.config.rope_parameters["mrope_section"])
        self.layers = nn.ModuleList([DecoderLayer(layer) for layer in lm.layers])
        self.epilogue = DecoderEpilogue(lm.norm, head)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cos, sin, bias = self.prologue(inputs_embeds, attention_mask, position_ids, past[0])
        h, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, cos, sin, bias, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.epilogue(h), *presents)
