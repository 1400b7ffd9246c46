"""The lung's bite: solid tissue pressing into the lung from its wall (issue 16; not in the paper).

A consolidation against the chest wall is a half-ball of soft tissue, and honeycombing a subpleural rind of walls
around small cysts; neither is a ball inside the lung, so the bright-blob filter (:mod:`.blobs`) hardly answers,
and a flow trained on other chests gives them too little contrast (docs/img/transfer-misses-blobs-a-to-b.png).
What they do to the lung's *shape* transfers: the aerated lung gives way, and a bite opens in its surface. A healthy
lung's surface follows the ribs and the diaphragm in broad curves; its tight concavities are few (the hilum, where
the vessels enter).

:func:`lung_bite` measures it in three steps:

1. the strict lung (air below −400 HU) is *opened* by ``opening`` voxels, so that the small cysts of honeycombing,
   and any lung thinner than the opening, stop counting as lung;
2. each lung (as thresholded, before the opening) is *closed* with a ball of ``closing_mm`` (16 mm): the tight
   concavities of its surface fill, the broad ones (the diaphragm's dome, the heart's impression) do not;
3. at each voxel of the region (the permissive mask's core) inside the closed lung, the bite is its distance in
   voxels from the opened lung (0 in the opened lung itself); 0 elsewhere in the region, NaN outside it.

``anatomy-density`` measures it, like the bright blobs, per anatomical band against the healthy 99.9th percentile
(the ``"tail"`` calibration of :mod:`.anatomy_map`): the hilum's bite is healthy there, a bite at the lateral
chest wall is not. Its bands are each split in three from front to back (``BITE_ANTERIOR_POSTERIOR``): the hilum
and the paravertebral gutter share the medial bands, and a consolidation against the spine would otherwise be
measured against the hilum's tail.

Measured (docs/RESULTS.md, 2026-12-07): opening 3 voxels and closing 16 mm, chosen on family B's validation
normals and lesions against the permissive mask's own 30 mm closing (with which the healthy tail at the lateral
lung base was 10 voxels, against 4.8 with 16 mm); shared with the bright blobs in one solid-lesion channel. A
second bite at a 30 mm closing, against its own tail, left A→B where it was (test AUROC 0.931 → 0.933, its
consolidation 0.86): the wide pleural consolidation it was for lies mostly outside the permissive mask.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..lungs import bounding_box, closing_ball

BITE_OPENING = 3  # voxels (6 mm on the 2 mm grid): honeycombing's cysts are 3–5.5 mm in radius
BITE_CLOSING_MM = 16.0  # fills a bite of a few cm across; not the dome of the diaphragm
# its reference's bands are split in three from front to back: the hilum's healthy bite (mid-way, medial) is
# large, the paravertebral gutter's (at the back, medial) small, and a consolidation there lies in the same bands
BITE_ANTERIOR_POSTERIOR = 3


def lung_bite(strict: np.ndarray, region: np.ndarray, spacing=(2.0, 2.0, 2.0), opening: int = BITE_OPENING,
              closing_mm: float = BITE_CLOSING_MM) -> np.ndarray:
    """The bite (voxels) at each voxel of ``region``: its distance from the ``strict`` lung (labelled 1 right, 2
    left, or binary) opened by ``opening`` voxels, where it lies inside the closing of its lung of ``strict`` with a
    ball of ``closing_mm``, 0 where it does not; float32, NaN outside ``region``. ``spacing`` is (x, y, z) mm."""
    strict = np.asarray(strict)
    region = np.asarray(region) != 0
    out = np.full(strict.shape, np.nan, np.float32)
    if not region.any():
        return out
    samp = tuple(float(s) for s in spacing)[::-1]
    # everything below on the box of the lung and the region, wide enough for the closing (closing_ball's own
    # margin) and the opening: the same result, on a fraction of the scan
    box = bounding_box((strict != 0) | region, int(np.ceil(closing_mm / min(samp))) + 2 + max(int(opening), 0))
    strict, region, out_box = strict[box], region[box], out[box]
    lung = strict != 0
    if opening > 0:
        lung = ndimage.binary_opening(lung, ndimage.generate_binary_structure(3, 1), iterations=int(opening))
    if not lung.any():  # nothing of the lung is thicker than the opening: no surface to measure a bite from
        out_box[region] = 0.0
        return out
    filled = np.zeros(strict.shape, bool)
    for label in np.unique(strict[strict != 0]):  # each lung on its own, as the permissive mask closes them
        filled |= closing_ball(strict == label, closing_mm, samp)
    distance = ndimage.distance_transform_edt(~lung).astype(np.float32)
    out_box[region] = np.where(filled, distance, 0.0)[region]
    return out
