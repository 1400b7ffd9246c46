"""Patient-level metrics (DESIGN §4.10): AUROC, F1, accuracy (the paper's Table 1), sensitivity,
specificity, stratified-bootstrap intervals, ROC data and the choice of the threshold T.

A study is predicted abnormal when its score (the abnormal volume in cm³) is **strictly greater** than the
threshold. Label 1 is abnormal.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "bootstrap_ci",
    "choose_threshold",
    "patient_metrics",
    "predicted_abnormal",
    "roc_curve_data",
    "stratified_resample_indices",
    "table1",
    "table1_row",
]

CI_METRICS = ("auroc", "f1", "accuracy", "sensitivity", "specificity")


def _arrays(y_true, scores):
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (abnormal)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def predicted_abnormal(scores, threshold: float) -> np.ndarray:
    """The patient decision's one comparison: abnormal when the score (the abnormal volume) is **strictly
    greater** than T. Every path (decisions, metrics, thresholds) goes through here."""
    return np.asarray(scores, dtype=np.float64) > float(threshold)


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    """The area under the ROC curve as the Mann–Whitney statistic with midranks for tied scores: the value of
    sklearn's ``roc_auc_score`` (the trapezoidal ROC; tests/test_metrics.py compares them), without the input
    checks that cost it ≈ 9 ms a call, which a 1,000-resample bootstrap paid 1,000 times (docs/BENCHMARKS.md)."""
    n_pos = int(np.sum(y == 1))
    n_neg = len(y) - n_pos
    if not (n_pos and n_neg):
        return float("nan")
    from scipy.stats import rankdata  # here: importing scipy.stats costs 1.5 s, and only evaluation needs it

    ranks = rankdata(s)  # 1-based, tied scores share their mean rank
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _confusion_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict:
    pred = predicted_abnormal(s, threshold)
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    tn = int(np.sum(~pred & ~pos))
    n_pos, n_neg = tp + fn, tn + fp
    return {
        "auroc": _auroc(y, s),
        # F1 of the abnormal class; 0 when there is no true and no predicted positive (sklearn's default)
        "f1": _div(2 * tp, 2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0,
        "accuracy": _div(tp + tn, len(y)),
        "sensitivity": _div(tp, n_pos),
        "specificity": _div(tn, n_neg),
        "n": int(len(y)),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def patient_metrics(y_true, scores, threshold: float) -> dict:
    """AUROC (threshold-free), F1, accuracy, sensitivity, specificity and the confusion counts.

    Predicted abnormal = ``score > threshold``. AUROC is NaN when only one class is present;
    sensitivity/specificity are NaN when their class is absent.
    """
    y, s = _arrays(y_true, scores)
    return _confusion_metrics(y, s, float(threshold))


def stratified_resample_indices(y, rng: np.random.Generator) -> np.ndarray:
    """Indices of one stratified bootstrap resample: positives and negatives resampled separately."""
    y = np.asarray(y)
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    parts = []
    if len(pos):
        parts.append(rng.choice(pos, size=len(pos), replace=True))
    if len(neg):
        parts.append(rng.choice(neg, size=len(neg), replace=True))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def bootstrap_ci(y_true, scores, threshold: float, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0):
    """Stratified-bootstrap percentile intervals: ``{metric: (lo, hi)}`` for AUROC, F1, accuracy,
    sensitivity and specificity at the fixed ``threshold``. Each resample keeps the class counts, so each
    has both classes whenever the data does. NaN resamples are ignored (all NaN → ``(nan, nan)``).
    """
    y, s = _arrays(y_true, scores)
    rng = np.random.default_rng(seed)
    vals = {k: np.empty(n_boot) for k in CI_METRICS}
    for b in range(n_boot):
        idx = stratified_resample_indices(y, rng)
        m = _confusion_metrics(y[idx], s[idx], float(threshold))
        for k in CI_METRICS:
            vals[k][b] = m[k]
    out = {}
    for k, v in vals.items():
        v = v[np.isfinite(v)]
        if v.size == 0:
            out[k] = (float("nan"), float("nan"))
        else:
            out[k] = (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2)))
    return out


def roc_curve_data(y, s) -> dict:
    """``{"fpr", "tpr", "thresholds"}`` lists (sklearn's ``roc_curve``; its rule is ``score ≥ t``)."""
    y, s = _arrays(y, s)
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, s)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


def _candidate_thresholds(s: np.ndarray) -> np.ndarray:
    """Thresholds between observed scores: below the minimum, the midpoints, and the maximum."""
    u = np.unique(s)
    gap = float(np.min(np.diff(u))) if len(u) > 1 else 1.0
    mids = (u[:-1] + u[1:]) / 2.0
    return np.concatenate([[u[0] - max(gap, 1e-9) / 2.0], mids, [u[-1]]])


def choose_threshold(y_val, s_val, criterion: str = "youden", target: float | None = None) -> float:
    """The threshold T (rule ``score > T``) chosen on the validation set only.

    ``"youden"``: maximises Youden's J; ``"f1"``: maximises F1, ties broken towards the **highest**
    threshold (fewer positive calls, higher specificity); ``"specificity"``: the **lowest** threshold whose
    validation specificity is at least ``target`` (the most sensitive one a hospital's specificity target
    allows). Candidates lie *between* observed scores (midpoints of consecutive distinct scores, plus one
    below the minimum and the maximum itself), so T never equals a score.
    """
    y, s = _arrays(y_val, s_val)
    if not (np.any(y == 1) and np.any(y == 0)):
        raise ValueError("choose_threshold needs both normal and abnormal validation studies")
    if criterion not in ("youden", "f1", "specificity"):
        raise ValueError(f"unknown criterion {criterion!r}: use 'youden', 'f1' or 'specificity'")
    cands = _candidate_thresholds(s)
    if criterion == "specificity":
        if target is None or not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"a specificity target in [0, 1] is needed, got {target!r}")
        for t in cands:  # ascending: the first that reaches the target is the most sensitive one
            if _confusion_metrics(y, s, float(t))["specificity"] >= float(target) - 1e-12:
                return float(t)
        return float(cands[-1])  # the maximum: nothing is called abnormal, specificity 1
    best_t, best_v = None, -math.inf
    for t in cands:  # ascending, so ">=" keeps the highest of tied thresholds
        m = _confusion_metrics(y, s, float(t))
        v = m["sensitivity"] + m["specificity"] - 1.0 if criterion == "youden" else m["f1"]
        if v >= best_v - 1e-12:
            best_t, best_v = float(t), max(v, best_v)
    return best_t


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table1_row(name: str, metrics: dict, ci: dict | None = None) -> str:
    """A markdown row ``| name | AUROC | F1 | Accuracy |``.

    With ``ci`` each cell reads ``0.912 (0.850–0.960)``."""
    cells = []
    for k in ("auroc", "f1", "accuracy"):
        c = _fmt(metrics.get(k))
        if ci and k in ci:
            lo, hi = ci[k]
            c += f" ({_fmt(lo)}–{_fmt(hi)})"
        cells.append(c)
    return f"| {name} | " + " | ".join(cells) + " |"


def table1(rows) -> str:
    """The paper's Table 1 in markdown. ``rows``: ``(name, metrics)`` or ``(name, metrics, ci)`` tuples,
    or already-rendered row strings."""
    lines = ["| Method | AUROC | F1 | Accuracy |", "|---|---|---|---|"]
    for r in rows:
        lines.append(r if isinstance(r, str) else table1_row(*r))
    return "\n".join(lines) + "\n"
