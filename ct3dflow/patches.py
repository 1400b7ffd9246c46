"""Training-patch sampling and the inference grid (DESIGN §4.5, §4.7).

All arrays are ``(z, y, x)``; corners are the ``(z, y, x)`` index of a cubic window's first voxel, so a
window covers ``volume[z:z+S, y:y+S, x:x+S]``.

Training patches are drawn from the corners whose window has at least ``min_lung_fraction`` of
strict-lung voxels. The lung fraction of *every* possible corner is computed at once from an integral
image of the mask (:func:`valid_patch_corners`); sampling is then a uniform draw among the valid corners.
The valid-corner array depends only on the mask, the patch size, the fraction and the step, so callers
that sample many times from one cached study should compute it once and pass it as ``valid_corners``.
"""

from __future__ import annotations

import numpy as np

from ct3dflow.errors import CTInputError

__all__ = [
    "box_sums",
    "extract_patches",
    "inference_grid",
    "integral_image",
    "pad_to_patch",
    "sample_patch_corners",
    "valid_patch_corners",
    "windows_touching",
]


def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-volume table of ``mask != 0`` with a leading zero plane on each axis.

    ``I[z, y, x]`` is the number of nonzero voxels in ``mask[:z, :y, :x]``; the shape is ``mask.shape + 1``.
    """
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"expected a 3-D (z, y, x) mask, got shape {m.shape}")
    dtype = np.int32 if m.size < 2**31 - 1 else np.int64
    ii = np.zeros(tuple(s + 1 for s in m.shape), dtype=dtype)
    ii[1:, 1:, 1:] = (m != 0).astype(dtype).cumsum(0).cumsum(1).cumsum(2)
    return ii


def box_sums(ii: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
    """Number of nonzero voxels in each ``size``³ window at ``corners`` (m, 3), from an integral image."""
    c = np.asarray(corners, dtype=np.int64).reshape(-1, 3)
    z0, y0, x0 = c[:, 0], c[:, 1], c[:, 2]
    z1, y1, x1 = z0 + size, y0 + size, x0 + size
    s = (
        ii[z1, y1, x1]
        - ii[z0, y1, x1]
        - ii[z1, y0, x1]
        - ii[z1, y1, x0]
        + ii[z0, y0, x1]
        + ii[z0, y1, x0]
        + ii[z1, y0, x0]
        - ii[z0, y0, x0]
    )
    return s.astype(np.int64)


def _all_box_sums(ii: np.ndarray, size: int, step: int = 1) -> np.ndarray:
    """Box sums for every corner ``(i*step, j*step, k*step)`` that keeps the window inside the volume."""
    n = tuple(s - 1 for s in ii.shape)
    lim = tuple(max(0, d - size + 1) for d in n)
    if min(lim) == 0:
        return np.zeros((0, 0, 0), dtype=np.int64)
    a = [slice(0, L, step) for L in lim]  # start index
    b = [slice(size, size + L, step) for L in lim]  # start + size
    ii = ii.astype(np.int64, copy=False)
    s = (
        ii[b[0], b[1], b[2]]
        - ii[a[0], b[1], b[2]]
        - ii[b[0], a[1], b[2]]
        - ii[b[0], b[1], a[2]]
        + ii[a[0], a[1], b[2]]
        + ii[a[0], b[1], a[2]]
        + ii[b[0], a[1], a[2]]
        - ii[a[0], a[1], a[2]]
    )
    return s


def valid_patch_corners(
    strict: np.ndarray, size: int, min_lung_fraction: float, step: int = 1
) -> np.ndarray:
    """All corners (on a ``step`` lattice) whose ``size``³ window has strict-lung fraction ≥ the minimum.

    ``strict`` is the strict lung mask (any nonzero label counts as lung). Returns ``(k, 3)`` int64
    corners ``(z, y, x)``; empty when none qualifies or the volume is smaller than one window.
    """
    if size < 1 or step < 1:
        raise ValueError("size and step must be positive")
    ii = integral_image(strict)
    sums = _all_box_sums(ii, size, step)
    if sums.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    need = float(min_lung_fraction) * size**3
    # a small tolerance so that fraction 0.5 of 48³ (an exact integer count) is accepted
    idx = np.argwhere(sums >= need - 1e-9)
    return (idx * step).astype(np.int64)


def sample_patch_corners(
    strict: np.ndarray,
    size: int,
    n: int,
    min_lung_fraction: float,
    rng: np.random.Generator | int | None = None,
    max_tries: int | None = None,
    valid_corners: np.ndarray | None = None,
) -> np.ndarray:
    """Draw ``n`` corners uniformly (with replacement) among the windows with enough strict lung.

    ``rng`` is a ``numpy.random.Generator`` (or a seed). ``max_tries`` is accepted for compatibility with
    rejection samplers and ignored: the valid corners are enumerated exactly, so sampling never fails
    when one exists. Pass ``valid_corners`` (from :func:`valid_patch_corners`) to skip recomputing them.

    Raises :class:`CTInputError` when no window qualifies.
    """
    del max_tries
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    valid = valid_patch_corners(strict, size, min_lung_fraction) if valid_corners is None else valid_corners
    valid = np.asarray(valid, dtype=np.int64).reshape(-1, 3)
    if len(valid) == 0:
        shape = tuple(np.shape(strict))
        raise CTInputError(
            f"no {size}³ patch with ≥ {100 * min_lung_fraction:g} % lung in a volume of shape {shape} "
            "(z, y, x): lower min_lung_fraction or check the lung mask"
        )
    pick = rng.integers(0, len(valid), size=int(n))
    return valid[pick].copy()


def extract_patches(volume: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
    """Cut ``size``³ windows at ``corners`` (m, 3) out of ``volume``; returns ``(m, S, S, S)`` float32."""
    vol = np.asarray(volume)
    c = np.asarray(corners, dtype=np.int64).reshape(-1, 3)
    out = np.empty((len(c), size, size, size), dtype=np.float32)
    hi = np.array(vol.shape) - size
    if len(c) and (np.any(c < 0) or np.any(c > hi)):
        raise ValueError(f"patch corners outside the volume of shape {vol.shape} for size {size}")
    for i, (z, y, x) in enumerate(c):
        out[i] = vol[z : z + size, y : y + size, x : x + size]
    return out


def _axis_starts(n: int, size: int, stride: int) -> np.ndarray:
    if n < size:
        raise ValueError(f"axis of length {n} is smaller than one window ({size}): pad_to_patch first")
    starts = list(range(0, n - size + 1, stride))
    if starts[-1] != n - size:
        starts.append(n - size)  # last window shifted back to end exactly at the edge
    return np.unique(np.asarray(starts, dtype=np.int64))


def inference_grid(shape, size: int = 48, stride: int = 38) -> np.ndarray:
    """Window corners of the inference grid for a volume of ``shape`` (z, y, x).

    Along each axis the starts are ``0, stride, 2·stride, …`` and, if that does not reach the end, one
    more window shifted back to end exactly at the edge (no duplicates). Every voxel is covered when
    ``stride ≤ size``. Each axis must be at least ``size`` long (use :func:`pad_to_patch` first).
    Returns ``(m, 3)`` int64 corners in C order (z slowest).
    """
    if stride < 1 or size < 1:
        raise ValueError("size and stride must be positive")
    axes = [_axis_starts(int(n), size, stride) for n in shape]
    g = np.meshgrid(*axes, indexing="ij")
    return np.stack([a.ravel() for a in g], axis=1).astype(np.int64)


def pad_to_patch(volume: np.ndarray, size: int, value: float = -0.5):
    """Pad each axis shorter than ``size`` up to ``size``; returns ``(padded, pad_before)``.

    Padding is symmetric (``pad_before = (size - n) // 2``, the rest after), so a short stack stays
    centred in its window. Axes already ``≥ size`` are untouched; ``pad_before`` is a 3-tuple of ints
    (add it to original coordinates to get padded ones). Pad volumes with −0.5 (air after normalisation,
    the default) and masks with ``value=0``.
    """
    vol = np.asarray(volume)
    before, pads = [], []
    for n in vol.shape:
        extra = max(0, size - int(n))
        b = extra // 2
        before.append(b)
        pads.append((b, extra - b))
    if not any(p[0] or p[1] for p in pads):
        return vol, (0, 0, 0)
    return np.pad(vol, pads, mode="constant", constant_values=value), tuple(before)


def windows_touching(mask: np.ndarray, corners: np.ndarray, size: int, ii: np.ndarray | None = None):
    """Boolean ``(m,)``: does the window at each corner contain any nonzero ``mask`` voxel?

    ``ii`` may be a precomputed :func:`integral_image` of ``mask``.
    """
    ii = integral_image(mask) if ii is None else ii
    return box_sums(ii, corners, size) > 0
