"""Compare an exported graph's outputs with the PyTorch original: max abs diff, cosine, relative L2."""

from __future__ import annotations

import numpy as np

from ..runtime.errors import ValidationError
from ..runtime.manifest import Tolerance

# fp32 graphs must match PyTorch this closely on every named case (issue 2's acceptance figures).
FP32_TOLERANCE = Tolerance(max_abs=1e-4, cosine=0.99999, rel_l2=1e-4)


def compare(onnx_out: np.ndarray, torch_out: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Agreement figures; `mask` (broadcastable) limits them to the elements that carry meaning."""
    a = np.asarray(onnx_out, dtype=np.float64)
    b = np.asarray(torch_out, dtype=np.float64)
    if a.shape != b.shape:
        return {"max_abs": float("inf"), "cosine": -1.0, "rel_l2": float("inf")}
    if mask is not None:
        keep = np.broadcast_to(mask, a.shape)
        a, b = a[keep], b[keep]
    a, b = a.ravel(), b.ravel()
    if a.size == 0:
        return {"max_abs": 0.0, "cosine": 1.0, "rel_l2": 0.0, "peak": 0.0}
    diff = a - b
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    cosine = float(a @ b / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else float(norm_a == norm_b)
    return {"max_abs": float(np.abs(diff).max()), "cosine": cosine,
            "rel_l2": float(np.linalg.norm(diff) / max(norm_b, 1e-30)), "peak": float(np.abs(b).max())}


def max_abs_bound(tol: Tolerance, figures: dict) -> float:
    """The max-abs bound for these outputs: scaled by max(1, peak |torch|) when the tolerance says so."""
    scale = max(1.0, figures.get("peak", 0.0)) if tol.max_abs_scaled_by_peak else 1.0
    return tol.max_abs * scale


def check(graph: str, case: str, output: str, figures: dict, tol: Tolerance) -> None:
    """Raise ValidationError when any figure is outside the tolerance (NaN fails too)."""
    bound = max_abs_bound(tol, figures)
    ok = (figures["max_abs"] <= bound and figures["cosine"] >= tol.cosine and figures["rel_l2"] <= tol.rel_l2)
    if not ok:
        raise ValidationError(graph, output, case, figures, {"max_abs": bound, "cosine": tol.cosine, "rel_l2": tol.rel_l2})


def record(graph: str, case: str, outputs: list[str], got: list, ref: dict, tol: Tolerance, report: list,
           meaningful=lambda output: None) -> None:
    """Compare every output of one case, append the figures to `report`, raise on the first miss."""
    for name, arr in zip(outputs, got):
        figures = compare(arr, ref[name], meaningful(name))
        report.append({"case": case, "output": name, **figures})
        check(graph, case, name, figures, tol)
