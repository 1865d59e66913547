"""Fidelity of a quantized bundle against its fp32 source: per graph on held-out inputs, and per request.

- Graphs: each held-out input (captured from the fp32 bundle, calibration/capture.py) runs through the fp32 graph
  and the quantized one; cosine and relative L2 of their outputs (the encoders' features; for the fast decoder the
  logits of its last position, its hidden state times the fp32 output rows). The gate reads the worst input.
- Agreement: the same requests through a Guard on each bundle, default options: verdict agreement and |dP(unsafe)|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..export import validate

# the output each graph is judged by
PRIMARY = {"vision": "features", "audio": "features", "decoder_gqa": "hidden", "decoder_gqa_head": "logits",
           "decoder": "logits"}


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(cosine, relative L2 of a against b), as the export's validation computes them; a non-finite value anywhere
    gives cosine -1 and rel_l2 inf (it fails any gate)."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return -1.0, math.inf
    figures = validate.compare(a, b)
    return figures["cosine"], figures["rel_l2"]


def cpu_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def fresh_feeds(feeds: dict) -> dict:
    return {k: np.array(v, copy=True) for k, v in feeds.items()}  # the decoder writes its KV inputs in place


def graph_fidelity(graph: str, fp32_path: Path, quant_path: Path, feeds: list[dict], head_rows=None,
                   threads: int = 0, progress=None) -> dict:
    """Cosine and rel_l2 of the quantized graph's primary output against fp32's over `feeds`: min/mean cosine,
    max/mean rel_l2, n. The fast decoder is judged on its logits: hidden @ head_rows.T (fp32 rows)."""
    output = PRIMARY[graph]
    if not feeds:  # nothing to judge: neither graph is opened (--no-fidelity on a 7B: its fp32 decoder is 28 GB)
        return {"n": 0, "judged_on": _judged_on(graph, head_rows)}
    ref_s, q_s = cpu_session(fp32_path, threads), cpu_session(quant_path, threads)
    cos, rel = [], []
    for f in feeds:
        ref = ref_s.run([output], fresh_feeds(f))[0]
        got = q_s.run([output], fresh_feeds(f))[0]
        if graph == "decoder_gqa" and head_rows is not None:
            rows = np.asarray(head_rows, np.float32)
            ref, got = ref.astype(np.float32) @ rows.T, got.astype(np.float32) @ rows.T
        c, r = compare(got, ref)
        cos.append(c)
        rel.append(r)
        if progress is not None:
            progress.update(1)
    bad = sum(1 for r in rel if not math.isfinite(r))  # non-finite outputs: cosine -1 fails any gate
    return {"n": len(cos), "cosine": min(cos), "cosine_mean": float(np.mean(cos)),
            "rel_l2": max(rel) if not bad else None, "rel_l2_mean": float(np.mean(rel)) if not bad else None,
            "non_finite": bad, "judged_on": _judged_on(graph, head_rows)}


def _judged_on(graph: str, head_rows) -> str:
    if graph == "decoder_gqa" and head_rows is not None:
        return "logits of the last position (its hidden state times the fp32 output rows)"
    return PRIMARY[graph]


@dataclass
class Agreement:
    n: int
    agree: int
    errors: int  # requests where either side gave no verdict (error/unknown): counted as disagreements
    dp_mean: float | None
    dp_max: float | None
    disagreements: list  # [{"request": label, "fp32": v, "quantized": v, "p_fp32": p, "p_quantized": p}]
    p_unsafe: list = field(default_factory=list)  # per request, in order: (fp32's P(unsafe), the recipe's), None kept

    @property
    def dp_p99(self) -> float | None:
        """99th percentile of |dP(unsafe)| over the requests with both (a non-finite one on either side: 1)."""
        from .metrics import abs_diffs

        dps = abs_diffs(self.p_unsafe)
        return float(np.percentile(dps, 99)) if dps else None

    def to_dict(self) -> dict:
        return {"n": self.n, "verdict_agreement": self.agree / self.n if self.n else None, "errors": self.errors,
                "dp_unsafe_mean": self.dp_mean, "dp_unsafe_max": self.dp_max, "dp_unsafe_p99": self.dp_p99,
                "disagreements": self.disagreements[:20]}


def agreement(fp32_guard, quant_guard, requests: list[tuple[str, dict]], progress=None) -> Agreement:
    """Each (label, moderate() kwargs) through both guards. A side that errs or gives no verdict never agrees."""
    agree, errors, dps, bad, pairs = 0, 0, [], [], []
    for label, req in requests:
        a, b = fp32_guard.moderate(**req), quant_guard.moderate(**req)
        pairs.append((a.p_unsafe, b.p_unsafe))
        judged = a.verdict in ("safe", "unsafe") and b.verdict in ("safe", "unsafe")
        if not judged:
            errors += 1
        if judged and a.verdict == b.verdict:
            agree += 1
        else:
            bad.append({"request": label, "fp32": a.verdict, "quantized": b.verdict, "p_fp32": a.p_unsafe,
                        "p_quantized": b.p_unsafe, "error": b.error or a.error})
        if a.p_unsafe is not None and b.p_unsafe is not None:
            dps.append(abs(a.p_unsafe - b.p_unsafe))
        if progress is not None:
            progress.update(1)
    return Agreement(len(requests), agree, errors, float(np.mean(dps)) if dps else None,
                     float(np.max(dps)) if dps else None, bad, pairs)
