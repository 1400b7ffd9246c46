"""Write small, real DICOM series (one file per slice) for tests, including deliberately bad ones.

Arrays are ``(z, y, x)`` in HU; spacing is SimpleITK's ``(x, y, z)`` in mm. Stored pixels are
``HU + 1024`` with RescaleIntercept −1024 and RescaleSlope 1, as scanners write them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import generate_uid

from ct3dflow.synthetic.writers import keeps_locale


def _fmt(values: Iterable[float]) -> str:
    return "\\".join(f"{v:.6f}" for v in values)


def write_dicom_slice(
    hu_yx: np.ndarray,
    path: Path | str,
    *,
    position: Sequence[float],
    row_dir: Sequence[float] = (1.0, 0.0, 0.0),
    col_dir: Sequence[float] = (0.0, 1.0, 0.0),
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    slice_thickness: float = 1.0,
    modality: str = "CT",
    series_uid: str,
    study_uid: str,
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    instance: int = 1,
    series_number: int = 1,
) -> None:
    """Write one 2-D slice. ``pixel_spacing`` is ``(x, y)`` mm (SimpleITK order)."""
    # ITK applies the inverse rescale on writing: give it HU, it stores HU + 1024
    hu = np.clip(np.round(np.asarray(hu_yx, dtype=np.float64)), -1024, 31743).astype(np.int16)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing([float(pixel_spacing[0]), float(pixel_spacing[1])])
    tags = {
        "0008|0060": modality,
        "0008|0008": image_type,
        "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "0008|0018": generate_uid(),
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0011": str(series_number),
        "0020|0013": str(instance),
        "0020|0032": _fmt(position),
        "0020|0037": _fmt(list(row_dir) + list(col_dir)),
        "0018|0050": f"{slice_thickness:.4f}",
        "0028|0030": f"{pixel_spacing[1]:.6f}\\{pixel_spacing[0]:.6f}",
        "0028|1052": "-1024",
        "0028|1053": "1",
        "0028|1054": "HU",
        "0010|0010": "Phantom^Test",
        "0010|0020": "PHANTOM-0001",
    }
    for key, value in tags.items():
        img.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    with keeps_locale():
        writer.Execute(img)


def write_dicom_series(
    hu_zyx: np.ndarray,
    folder: Path | str,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    modality: str = "CT",
    series_uid: str | None = None,
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    tilt_deg: float = 0.0,
    skip_slices: Iterable[int] = (),
    study_uid: str | None = None,
    prefix: str = "slice",
    series_number: int = 1,
) -> list[Path]:
    """Write ``hu_zyx`` as an axial DICOM series into ``folder``; return the files written.

    ``tilt_deg`` tilts the slice planes about the x axis (gantry tilt) while the table still moves
    along z, so slice positions no longer lie along the slice normal. ``skip_slices`` leaves out
    those z indices (a series with missing slices). File names are shuffled relative to z order
    (instance numbers are correct) so readers cannot rely on names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    skip = set(int(i) for i in skip_slices)
    t = math.radians(tilt_deg)
    col_dir = (0.0, math.cos(t), math.sin(t))
    nz = hu_zyx.shape[0]
    order = np.random.default_rng(0).permutation(nz)
    written = []
    for k in range(nz):
        if k in skip:
            continue
        pos = (origin[0], origin[1], origin[2] + k * spacing[2])
        path = folder / f"{prefix}{int(order[k]):04d}.dcm"
        write_dicom_slice(
            hu_zyx[k],
            path,
            position=pos,
            col_dir=col_dir,
            pixel_spacing=(spacing[0], spacing[1]),
            slice_thickness=spacing[2],
            modality=modality,
            series_uid=series_uid,
            study_uid=study_uid,
            image_type=image_type,
            instance=k + 1,
            series_number=series_number,
        )
        written.append(path)
    return written


def synthetic_torso(
    shape_zyx: Sequence[int] = (56, 64, 80),
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    *,
    noise_hu: float = 15.0,
    airways: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A simple chest in HU: body (40 HU) in air, two ellipsoid lungs (−850 HU), a spine (500 HU),
    optionally a trachea with two main bronchi (−1000 HU). Returns ``(hu float32, truth uint8)`` with
    truth 1 = right lung (small x, LPS), 2 = left lung. Geometry scales with the field of view.
    """
    nz, ny, nx = (int(v) for v in shape_zyx)
    sx, sy, sz = (float(v) for v in spacing)
    ex, ey, ez = nx * sx, ny * sy, nz * sz
    z = (np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * sz
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    body2d = (x[None, :] / (0.44 * ex)) ** 2 + (y[:, None] / (0.38 * ey)) ** 2 <= 1.0
    hu[:, body2d] = 40.0
    spine2d = (x[None, :] / (0.05 * ex)) ** 2 + ((y[:, None] - 0.26 * ey) / (0.06 * ey)) ** 2 <= 1.0
    hu[:, spine2d] = 500.0
    truth = np.zeros((nz, ny, nx), dtype=np.uint8)
    ax, ay, az = 0.15 * ex, 0.24 * ey, 0.38 * ez
    for label, cx in ((1, -0.2 * ex), (2, 0.2 * ex)):
        inside = ((xx - cx) / ax) ** 2 + (yy / ay) ** 2 + (zz / az) ** 2 <= 1.0
        truth[inside] = label
    hu[truth > 0] = -850.0
    if airways:
        r_t, y_t, z_c = 0.05 * min(ex, ey), -0.08 * ey, 0.05 * ez
        trachea = (xx**2 + (yy - y_t) ** 2 <= r_t**2) & (zz >= z_c)
        hu[trachea] = -1000.0
        for cx in (-0.2 * ex, 0.2 * ex):  # main bronchi: segments from the carina into each lung
            p0 = np.array([0.0, y_t, z_c])
            p1 = np.array([cx * 0.8, 0.0, z_c - 0.1 * ez])
            v = p1 - p0
            t = ((xx - p0[0]) * v[0] + (yy - p0[1]) * v[1] + (zz - p0[2]) * v[2]) / float(v @ v)
            t = np.clip(t, 0.0, 1.0)
            d2 = (xx - p0[0] - t * v[0]) ** 2 + (yy - p0[1] - t * v[1]) ** 2 + (zz - p0[2] - t * v[2]) ** 2
            hu[d2 <= (0.6 * r_t) ** 2] = -1000.0
    if noise_hu > 0:
        hu += np.random.default_rng(seed).normal(0.0, noise_hu, hu.shape).astype(np.float32)
    return hu, truth
