"""One evaluation of an operating point on a split touched once (the paper's Table 1 and more).

Patient-level AUROC, F1, accuracy (Table 1), sensitivity and specificity with stratified-bootstrap 95 %
intervals, the ROC data, and per pathology kind (that kind's abnormal studies against all normals, at the
same T) the AUROC, the sensitivity and the median abnormal volume. The same for every map kind.
"""

from __future__ import annotations

import numpy as np

from ..metrics import bootstrap_ci, patient_metrics, roc_curve_data
from .kind import MapKind
from .operating_point import OperatingPoint


def abnormal_volumes(kind: MapKind, op: OperatingPoint, studies) -> np.ndarray:
    return np.array([kind.decide(s.score, s.permissive, s.spacing, op)[0] for s in studies])


def evaluate_volumes(studies, vols, threshold_cm3: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of abnormal volumes ``vols`` at T for ``studies`` (with ``study_id``, ``label``, ``pathology``)."""
    y = np.array([s.label for s in studies])
    vols = np.asarray(vols, dtype=np.float64)
    if len(set(y.tolist())) < 2:
        raise ValueError("the evaluated split needs labelled normal and abnormal studies that scored ok")
    metrics = patient_metrics(y, vols, threshold_cm3)
    ci = bootstrap_ci(y, vols, threshold_cm3, n_boot=n_boot, seed=seed)
    per_kind = {}
    for kind in sorted({s.pathology for s in studies if s.label == 1 and s.pathology}):
        sel = np.array([s.label == 0 or s.pathology == kind for s in studies])
        km = patient_metrics(y[sel], vols[sel], threshold_cm3)
        per_kind[kind] = {"n": int((y[sel] == 1).sum()), "auroc": km["auroc"], "sensitivity": km["sensitivity"],
                          "median_abnormal_volume_cm3": float(np.median(vols[sel][y[sel] == 1]))}
    normals = vols[y == 0]
    return {"metrics": metrics, "ci": {k: list(v) for k, v in ci.items()}, "roc": roc_curve_data(y, vols),
            "per_kind": per_kind, "threshold_cm3": float(threshold_cm3),
            "normal_volume_cm3": {"median": float(np.median(normals)), "max": float(np.max(normals))},
            "studies": [{"study_id": s.study_id, "label": int(s.label), "pathology": s.pathology,
                         "abnormal_volume_cm3": float(v)} for s, v in zip(studies, vols, strict=True)]}


def evaluate(kind: MapKind, op: OperatingPoint, studies, n_boot: int = 1000, seed: int = 0) -> dict:
    """Evaluate ``op`` on ``studies`` (scored with ``op.scoring``); adds the operating point to the result."""
    if op.map != kind.name:
        raise ValueError(f"a {op.map}-map operating point cannot evaluate {kind.name}-map scores")
    out = evaluate_volumes(studies, abnormal_volumes(kind, op, studies), op.threshold_cm3, n_boot, seed)
    out["operating_point"] = op.to_dict()
    return out
