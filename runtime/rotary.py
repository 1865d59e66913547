"""TMRoPE rotary tables in numpy, for the fast decoder graph (its GroupQueryAttention rotates queries and keys
itself, reading cos/sin rows by cache position).

Qwen2.5-Omni's multimodal rotary: each rotary frequency j is driven by one of the three position rows (time,
height, width), chosen by `mrope_section` (sections of consecutive frequencies, cycling t, h, w). For token s:
angle[s, j] = position[axis_of(j), s] * inv_freq[j], computed in float32 as transformers computes it. Text tokens
have the same position on all three rows, so this is plain RoPE for them.
"""

from __future__ import annotations

import numpy as np


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """transformers' default rotary frequencies: 1 / theta^(2i / head_dim), in float32."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def axis_of(sections) -> np.ndarray:
    """For each rotary frequency, the position row (0 t, 1 h, 2 w) that drives it."""
    return np.asarray([i % 3 for i, s in enumerate(sections) for _ in range(s)], np.int64)


def rope_tables(positions: np.ndarray, freqs: np.ndarray, sections) -> tuple[np.ndarray, np.ndarray]:
    """positions [3, S] (one request's TMRoPE position ids) -> cos, sin [S, head_dim / 2] float32."""
    axes = axis_of(sections)
    if axes.size != freqs.size:
        raise ValueError(f"mrope_section {list(sections)} covers {axes.size} frequencies, the head has {freqs.size}")
    picked = positions[axes, :].T.astype(np.float32)  # [S, head_dim / 2]: each frequency's own position row
    angles = picked * freqs[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
