"""The splitter: which windows of a study are scored (DESIGN §4.7), and their patches in batches.

Like MONAI's sliding-window inference, a study becomes windows (:class:`WindowGrid`), a predictor scores
batches of them (the map kind's model call) and a merger turns the per-window results into a map (the map
kind). A volume smaller than one window along an axis is padded (−0.5, air after normalisation); only
windows that touch the permissive lung mask are scored. Corners here are in the *padded* frame;
``pad_before`` converts them to the study's own voxel coordinates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import CTInputError
from ..patches import extract_patches, inference_grid, integral_image, pad_to_patch, windows_touching


@dataclass
class WindowGrid:
    """The scored windows of one study: the padded volume, the window size and stride, the corners."""

    padded: np.ndarray  # (z, y, x) float32, at least one window per axis
    shape: tuple  # the study's own (unpadded) shape
    pad_before: tuple  # add to study coordinates to get padded ones
    corners: np.ndarray  # (m, 3) int64, padded frame, windows touching the permissive mask
    size: int
    stride: int

    def __len__(self) -> int:
        return int(len(self.corners))

    @property
    def study_corners(self) -> np.ndarray:
        """Corners in the study's own voxel coordinates (negative where the volume was padded)."""
        return self.corners - np.asarray(self.pad_before, dtype=np.int64)

    @property
    def study_centres(self) -> np.ndarray:
        return self.study_corners.astype(np.float64) + (self.size - 1) / 2.0

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(corners, patches (b, 1, S, S, S) float32)`` in grid order."""
        for s in range(0, len(self.corners), int(batch_size)):
            c = self.corners[s : s + int(batch_size)]
            yield c, extract_patches(self.padded, c, self.size)[:, None]

    def crop(self, padded_array: np.ndarray) -> np.ndarray:
        """A padded-frame array cut back to the study's own grid."""
        return padded_array[tuple(slice(b, b + n) for b, n in zip(self.pad_before, self.shape, strict=True))]


def window_grid(volume, permissive, size: int, stride: int, phases: int = 1) -> WindowGrid:
    """The inference windows of a study. Raises :class:`CTInputError` when no window touches the mask.

    ``phases`` > 1 interleaves that many grids of the same stride, the k-th shifted by ``k·stride/phases`` on
    every axis at once: a voxel is covered at as many offsets within a window as a ``stride/phases`` grid
    gives along the diagonal, for ``phases`` times the windows of one grid instead of ``phases³``."""
    vol = np.asarray(volume, dtype=np.float32)
    msk = np.asarray(permissive)
    if vol.shape != msk.shape:
        raise ValueError(f"volume {vol.shape} and permissive mask {msk.shape} differ in shape")
    if int(stride) < 1 or int(size) < 1:
        raise ValueError(f"window size {size} and stride {stride} must be positive")
    vol_p, before = pad_to_patch(vol, size, value=-0.5)
    msk_p, _ = pad_to_patch(msk, size, value=0)
    corners = inference_grid(vol_p.shape, size, stride)
    if phases > 1:
        hi = np.asarray(vol_p.shape) - size
        shifted = [np.minimum(corners + (k * stride) // phases, hi) for k in range(1, int(phases))]
        corners = np.unique(np.concatenate([corners, *shifted]), axis=0)
    corners = corners[windows_touching(msk_p, corners, size, ii=integral_image(msk_p))]
    if len(corners) == 0:
        raise CTInputError(
            "the permissive lung mask is empty, so no inference window touches the lungs: "
            "check the lung segmentation or supply a mask (mask_path)"
        )
    return WindowGrid(vol_p, tuple(vol.shape), tuple(before), corners, int(size), int(stride))
