"""The patient decision (DESIGN §4.9), the same for every map kind.

A map kind turns a study's scores into an *atypicality map* (low = abnormal, NaN outside the permissive
mask) and a *level*: voxels of the mask with ``map < level`` are abnormal. Then, here and only here:
26-connected components smaller than ``v_min`` are dropped, the remaining volume in cm³ is the patient
score, and the study is abnormal when that volume is **strictly greater** than T.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..metrics import predicted_abnormal

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def voxel_volume_cm3(spacing) -> float:
    """Voxel volume in cm³ from a spacing ``(x, y, z)`` in mm."""
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def abnormal_region(atypicality: np.ndarray, mask, level: float, v_min_cm3: float, spacing):
    """``(volume_cm3, abnormal mask)``: voxels of ``mask`` with ``atypicality < level``, components under
    ``v_min_cm3`` removed. NaN voxels are never abnormal (``NaN < level`` is false)."""
    a = np.asarray(atypicality)
    m = np.asarray(mask) != 0
    if a.shape != m.shape:
        raise ValueError(f"map {a.shape} and mask {m.shape} differ in shape")
    with np.errstate(invalid="ignore"):
        low = m & (a < level)
    vv = voxel_volume_cm3(spacing)
    if not low.any():
        return 0.0, low
    if float(v_min_cm3) <= 0.0:  # every component is kept: no labelling (a third of a search's trials)
        return float(low.sum() * vv), low
    lab, n = ndimage.label(low, structure=STRUCTURE_26)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes * vv >= float(v_min_cm3)
    keep[0] = False
    out = keep[lab]
    return float(out.sum() * vv), out


def is_abnormal(volume_cm3: float, threshold_cm3: float) -> bool:
    """The study's decision: :func:`ct3dflow.metrics.predicted_abnormal` (volume > T), the rule the metrics
    count with."""
    return bool(predicted_abnormal(volume_cm3, threshold_cm3))


__all__ = ["STRUCTURE_26", "abnormal_region", "is_abnormal", "predicted_abnormal", "voxel_volume_cm3"]
