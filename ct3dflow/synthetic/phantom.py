"""One synthetic chest CT study: the anatomy of a family, one lesion or none, CT noise.

The anatomy, the pathology and the noise use separate random streams of the seed: ``make_phantom(s)`` and
``make_phantom(s, "nodule")`` share the same anatomy and noise, and differ only where the lesion is.
Conventions (docs/ARCHITECTURE.md): arrays are ``(z, y, x)``; spacing and origin are SimpleITK's
``(x, y, z)`` in mm; LPS orientation with identity direction (``+x`` patient left, ``+y`` posterior,
``+z`` superior), so the patient's right lung (label 1 of ``lung_mask``) lies at small ``x``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from . import family_a, family_b
from .geometry import Grid
from .lesions import PATHOLOGIES, add_lesion

#: named phantom sizes: shape (z, y, x) and spacing (x, y, z) in mm
SIZES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    # tests: 128 x 112 voxels of 1.6 mm (205 x 179 mm), 64 slices of 2.5 mm (160 mm)
    "small": ((64, 112, 128), (1.6, 1.6, 2.5)),
    # demo: an adult-sized field of view (374 x 317 x 280 mm)
    "demo": ((112, 176, 208), (1.8, 1.8, 2.5)),
}
DEFAULT_SHAPE = SIZES["small"][0]
DEFAULT_SPACING = SIZES["small"][1]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
HU_MIN, HU_MAX = -1024, 3071

#: phantom families: name → ``anatomy(rng, rng_tex, grid) -> (hu, lung_mask, info)``; each may also define
#: ``noise(rng_noise, hu, sigma)`` (default: Gaussian-filtered noise, σ 0.6 voxels) and ``NOISE_HU``
FAMILIES: dict[str, object] = {"a": family_a, "b": family_b}


@dataclass
class Phantom:
    """One synthetic chest CT study."""

    hu: np.ndarray  # (z, y, x) int16 HU
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # (x, y, z) mm, LPS
    pathology: str | None
    lesion_mask: np.ndarray  # (z, y, x) bool
    lesion_volume_cm3: float
    lung_mask: np.ndarray  # (z, y, x) uint8: 0 background, 1 right lung, 2 left lung
    seed: int = 0
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    info: dict = field(default_factory=dict)  # lesion centre, side, target volume, anatomy numbers

    @property
    def label(self) -> int:
        return 0 if self.pathology is None else 1

    @property
    def voxel_volume_cm3(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def to_image(self, array: np.ndarray | None = None):
        """A SimpleITK image of ``hu`` (or of ``array``, e.g. a mask) with this phantom's geometry."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.hu if array is None else array)
        img.SetSpacing(tuple(float(s) for s in self.spacing))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(self.direction)
        return img


def resolve_size(size, shape, spacing):
    if size is not None:
        if size not in SIZES:
            raise ValueError(f"unknown phantom size {size!r}; choose one of {sorted(SIZES)} or pass shape=")
        s_shape, s_spacing = SIZES[size]
        shape = shape or s_shape
        spacing = spacing or s_spacing
    shape = tuple(int(n) for n in (shape or DEFAULT_SHAPE))
    spacing = tuple(float(s) for s in (spacing or DEFAULT_SPACING))
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 16 or min(spacing) <= 0:
        raise ValueError(f"phantom shape must be 3 ints >= 16 (z, y, x) and spacing 3 positive mm "
                         f"(x, y, z); got shape={shape}, spacing={spacing}")
    return shape, spacing


def gaussian_ct_noise(rng_noise, hu: np.ndarray, sigma: float, blur_vox: float = 0.6) -> None:
    """Correlated CT noise (white noise blurred by ``blur_vox``) of standard deviation ``sigma``, in place."""
    noise = ndimage.gaussian_filter(rng_noise.standard_normal(hu.shape).astype(np.float32), blur_vox)
    noise *= sigma / (noise.std() + 1e-6)
    hu += noise


def make_phantom(
    seed: int,
    pathology: str | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    size: str | None = None,
    noise_hu: float | None = None,
    family: str = "a",
) -> Phantom:
    """Make one synthetic chest CT phantom.

    seed: anatomy, lesion and noise are functions of it (same seed, same phantom).
    pathology: None (healthy) or one of :data:`PATHOLOGIES`.
    shape: (z, y, x) voxels, default (64, 112, 128); spacing: (x, y, z) mm, default (1.6, 1.6, 2.5).
    size: "small" (the default shape) or "demo" (adult-sized field of view); explicit shape/spacing win.
    noise_hu: CT noise standard deviation; default drawn per seed (family A: 10–20 HU).
    family: the anatomy, one of :data:`FAMILIES`.
    """
    if pathology is not None and pathology not in PATHOLOGIES:
        raise ValueError(f"unknown pathology {pathology!r}; choose one of {PATHOLOGIES} or None")
    if family not in FAMILIES:
        raise ValueError(f"unknown phantom family {family!r}; choose one of {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    shape, spacing = resolve_size(size, shape, spacing)
    seed = int(seed)
    rng = np.random.default_rng([seed, 0] if family == "a" else [seed, 0, ord(family)])  # anatomy
    rng_tex = np.random.default_rng([seed, 1] if family == "a" else [seed, 1, ord(family)])  # texture fields
    rng_noise = np.random.default_rng([seed, 2] if family == "a" else [seed, 2, ord(family)])  # CT noise
    rng_path = np.random.default_rng([seed, 3, PATHOLOGIES.index(pathology) if pathology else 99])

    nz, ny, nx = shape
    sx, sy, sz = spacing
    # x/y centred on the isocentre; the top slice at z = -50 mm - a per-seed table offset
    origin = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, round(-50.0 - (nz - 1) * sz - float(rng.uniform(0, 100)), 2))
    g = Grid(shape, spacing, origin)
    hu, lung_mask, info = fam.anatomy(rng, rng_tex, g)
    lesion_mask = np.zeros(shape, dtype=bool)
    if pathology is not None:
        lesion_mask, linfo = add_lesion(pathology, rng_path, g, hu, lung_mask, spacing)
        info.update(linfo)
    lo, hi = getattr(fam, "NOISE_HU", (10.0, 20.0))
    sigma = float(noise_hu) if noise_hu is not None else float(rng_noise.uniform(lo, hi))
    noise: Callable = getattr(fam, "noise", gaussian_ct_noise)
    noise(rng_noise, hu, sigma)
    info["noise_hu"] = sigma
    hu_i = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    vox_cm3 = sx * sy * sz / 1000.0
    return Phantom(hu=hu_i, spacing=spacing, origin=origin, pathology=pathology, lesion_mask=lesion_mask,
                   lesion_volume_cm3=float(lesion_mask.sum() * vox_cm3), lung_mask=lung_mask, seed=seed, info=info)
