"""Ranking metrics of P(unsafe) against labels, shared by the verdict fit, the recipes' gate and accuracy.py."""

from __future__ import annotations

import math

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); nan when one class is absent."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def macro_auroc(scores, labels, packs) -> tuple[float, dict]:
    """Mean of the per-pack AUROCs over the packs that hold both labels, and those per-pack values."""
    packs = np.asarray(packs)
    per = {p: auroc(scores[packs == p], labels[packs == p]) for p in sorted(set(packs.tolist()))}
    value = mean_defined(None if math.isnan(v) else v for v in per.values())
    return (float("nan") if value is None else value), per


def mean_defined(values) -> float | None:
    """The mean of the values that are not None (a pack without both labels has no AUROC); None when none is."""
    both = [v for v in values if v is not None]
    return float(np.mean(both)) if both else None


def abs_diffs(pairs) -> list[float]:
    """|a - b| of each (a, b) pair of P(unsafe) where both are given; a non-finite value on either side is the
    largest possible difference (1), not a skipped pair."""
    return [abs(a - b) if math.isfinite(a) and math.isfinite(b) else 1.0
            for a, b in pairs if a is not None and b is not None]


def auroc_drop(p_fp32, p_quant, labels, packs) -> tuple[float | None, float | None, float | None]:
    """(fp32's macro AUROC, the recipe's, fp32's minus the recipe's) over the requests where both sides have a
    P(unsafe) (None where no pack holds both labels). A non-finite P(unsafe) (nan, inf, -inf) is scored 1, as unsafe
    (fail closed), rather than dropped."""
    keep = [i for i, (a, b) in enumerate(zip(p_fp32, p_quant)) if a is not None and b is not None]
    if not keep:
        return None, None, None
    y = np.array([labels[i] == "unsafe" for i in keep])
    pk = np.array([packs[i] for i in keep])
    a, b = (np.array([p[i] for i in keep], np.float64) for p in (p_fp32, p_quant))
    a, b = (np.where(np.isfinite(x), x, 1.0) for x in (a, b))
    ref, got = macro_auroc(a, y, pk)[0], macro_auroc(b, y, pk)[0]
    if math.isnan(ref) or math.isnan(got):
        return None, None, None
    return ref, got, ref - got
