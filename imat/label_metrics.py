"""Multi-label F1 from per-class counts: one definition for training's validation and `imat eval`.

``f1_macro`` averages per-class F1 over the classes *with support* (TP + FN > 0): a category
absent from the evaluated set has no defined F1 and would otherwise pull the mean towards 0.
``f1_macro_all`` averages over all classes with F1 := 0 where undefined (sklearn's
``average="macro", zero_division=0``), for comparison. ``f1_micro`` pools the counts.
"""

from __future__ import annotations

import numpy as np


def f1_from_counts(tp, fp, fn) -> dict[str, float]:
    """Micro/macro F1, precision and recall from per-class count vectors (see module doc)."""
    tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    support = (tp + fn) > 0
    micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "f1_micro": float(2 * tp.sum() / micro_denom) if micro_denom > 0 else 0.0,
        "f1_macro": float(per_class[support].mean()) if support.any() else 0.0,
        "f1_macro_all": float(per_class.mean()),
        "precision_micro": float(tp.sum() / (tp.sum() + fp.sum())) if (tp.sum() + fp.sum()) > 0 else 0.0,
        "recall_micro": float(tp.sum() / (tp.sum() + fn.sum())) if (tp.sum() + fn.sum()) > 0 else 0.0,
        "categories_scored": int(support.sum()),
    }


def f1_scores(true, pred) -> dict[str, float]:
    """The same metrics from multi-label truth and predictions (bool / 0-1 [N, C])."""
    t = np.asarray(true) > 0
    p = np.asarray(pred) > 0
    return f1_from_counts((t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0))
