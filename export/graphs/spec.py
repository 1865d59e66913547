"""The shape every graph definition has (after optimum's per-graph configs, without their size)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# Additive attention bias for masked positions. Not -inf: a fully masked row would give NaN (docs/design.md "The graphs").
NEG_BIAS = -1e9


@dataclass(frozen=True)
class GraphCase:
    """One named validation case: ONNX feeds and a function computing the PyTorch reference outputs."""

    name: str
    feeds: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]]  # callable: built when needed
    reference: Callable[[], dict[str, np.ndarray]]  # runs the original transformers module
    # Output name -> boolean mask of the elements that carry meaning (KV rows of left padding do not).
    meaningful: Callable[[str], np.ndarray | None] = lambda output: None


@dataclass(frozen=True)
class GraphDef:
    """How to build, export and validate one graph."""

    name: str
    interface: Callable  # (parts) -> (input names, output names, dynamic axes per name)
    build: Callable  # (parts) -> torch.nn.Module wrapper taking the inputs in order
    example: Callable  # (parts) -> feeds used for tracing
    cases: Callable  # (parts, rng) -> list[GraphCase]


def case_feeds(case: GraphCase) -> dict[str, np.ndarray]:
    return case.feeds() if callable(case.feeds) else case.feeds


def attention(q, k, v, bias, scale: float):
    """softmax(q k^T * scale + bias) v with plain ops (exports to MatMul/Softmax on any opset)."""
    import torch

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
