"""What a scored study leaves for people: the map as NIfTI on the study's 2 mm grid, and a PNG preview.

Both take the kind's atypicality map (low = abnormal), so the paper's Log P map and the voxel map's −|z|
are written and drawn by the same code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .decision import STRUCTURE_26


def write_map_nifti(study_map, reference, path, fill_value: float | None = None) -> Path:
    """Write the map as float32 NIfTI (``.nii.gz``) with the geometry of ``reference``.

    ``reference`` is a ``SimpleITK.Image`` (e.g. ``PreprocessedStudy.reference_image()``) or a tuple
    ``(spacing, origin, direction)`` in SimpleITK's (x, y, z) convention. NaN voxels (outside the mask)
    are written as NaN by default — nibabel, 3D Slicer and ITK-SNAP read them as NaN, but SimpleITK's NIfTI
    *reader* turns NaN into 0 — or as ``fill_value`` when given.
    """
    import SimpleITK as sitk

    arr = np.array(study_map, dtype=np.float32)
    if fill_value is not None:
        arr[np.isnan(arr)] = np.float32(fill_value)
    img = sitk.GetImageFromArray(arr)
    if isinstance(reference, sitk.Image):
        if tuple(reference.GetSize()) != tuple(reversed(arr.shape)):
            raise ValueError(f"map shape {arr.shape} (z, y, x) does not match reference size "
                             f"{reference.GetSize()} (x, y, z)")
        spacing, origin, direction = reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection()
    else:
        spacing, origin, direction = reference
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path


PREVIEW_SCALE = 3
PREVIEW_GAP = 6
PREVIEW_HEADER = 30


def preview_size(shape) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`write_preview_png` for a volume of ``shape`` (z, y, x)."""
    z, y, x = (int(s) for s in shape)
    return 2 * PREVIEW_SCALE * x + PREVIEW_GAP, PREVIEW_HEADER + PREVIEW_SCALE * max(y, z)


def _grey(v: np.ndarray, level: float = -600.0, width: float = 1500.0) -> np.ndarray:
    hu = (np.asarray(v, dtype=np.float64) + 0.5) * 1220.0 - 1020.0
    g = (hu - (level - width / 2)) / width
    return (np.clip(g, 0, 1) * 255).astype(np.uint8)


def _panel(ct2d, map2d, ab2d, ref: float, scale_val: float):
    from PIL import Image

    g = _grey(ct2d)
    rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float64)
    with np.errstate(invalid="ignore"):
        a = np.clip((ref - map2d) / scale_val, 0.0, 1.0)
    a = np.where(np.isfinite(a), a, 0.0) * 0.7
    red = np.array([255.0, 30.0, 30.0])
    rgb = rgb * (1 - a[..., None]) + red * a[..., None]
    ab = ab2d.astype(bool)
    if ab.any():
        edge = ab & ~ndimage.binary_erosion(ab, border_value=0)
        rgb[edge] = (255, 230, 0)
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    return img.resize((img.width * PREVIEW_SCALE, img.height * PREVIEW_SCALE), Image.NEAREST)


def write_preview_png(
    volume, study_map, abnormal_mask, path, title=None, level: float | None = None
) -> Path:
    """One PNG: an axial and a coronal slice through the worst region, CT in a lung window (grey), the
    map in red (opacity grows with how far the map is below ``level``, or below the median map
    value when τ is not given), the abnormal region outlined in yellow.

    The worst region is the lowest map value inside the largest abnormal component if there is one, else
    the lowest map value overall (NaN ignored). Axial: rows y (anterior at top), columns x (patient right on
    the left); coronal: rows z flipped (superior at top). Pixels are upscaled ×3; size: :func:`preview_size`.
    """
    from PIL import Image, ImageDraw

    vol = np.asarray(volume, dtype=np.float32)
    lpm = np.asarray(study_map, dtype=np.float64)
    ab = np.asarray(abnormal_mask).astype(bool) if abnormal_mask is not None else np.zeros(vol.shape, bool)
    if not (vol.shape == lpm.shape == ab.shape):
        raise ValueError("volume, map and abnormal mask must have the same shape")
    finite = np.isfinite(lpm)
    search = finite.copy()
    if ab.any():
        lab, n = ndimage.label(ab, structure=STRUCTURE_26)
        largest = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
        search = finite & (lab == largest)
    if search.any():
        flat = np.where(search, lpm, np.inf)
        zc, yc, xc = np.unravel_index(int(np.argmin(flat)), vol.shape)
    else:
        zc, yc, xc = (s // 2 for s in vol.shape)
    vals = lpm[finite]
    if vals.size:
        ref = float(level) if level is not None else float(np.median(vals))
        spread = max(ref - float(vals.min()), float(vals.std()), 1e-6)
    else:
        ref, spread = 0.0, 1.0
    axial = _panel(vol[zc], lpm[zc], ab[zc], ref, spread)
    coronal = _panel(vol[::-1, yc, :], lpm[::-1, yc, :], ab[::-1, yc, :], ref, spread)
    w, h = preview_size(vol.shape)
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    canvas.paste(axial, (0, PREVIEW_HEADER))
    canvas.paste(coronal, (axial.width + PREVIEW_GAP, PREVIEW_HEADER))
    d = ImageDraw.Draw(canvas)
    head = title or "CT-3DFlow"
    d.text((4, 2), f"{head}  axial z={zc}  coronal y={yc}", fill=(255, 255, 255))
    tau_txt = f"level={level:.4g}" if level is not None else f"ref=median {ref:.4g}"
    d.text((4, 15), f"red: atypical ({tau_txt})  yellow: abnormal", fill=(255, 200, 200))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def write_json(obj, path) -> Path:
    """``obj`` as indented JSON (NumPy numbers as floats), creating the folder."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float), encoding="utf-8")
    return path
