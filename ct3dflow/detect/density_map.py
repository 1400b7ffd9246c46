"""The anatomy voxel map plus the lung's own density (issue 16; not in the paper). ``scoring.map: anatomy-density``.

Why: ground glass, a haze that raises the lung from about −850 to −700…−400 HU, lies within 1.3 healthy MADs of
the healthy median of the coarse-latent map under every model we trained (docs/RESULTS.md): the map keeps a
128-channel latent as its energy, and a shift in a few channels drowns in the χ² spread of the rest. The same
lesions lie 5–12 healthy MADs out in the lung's density. A density reference on the whole permissive mask is no
detector (it holds the hilar vessels and the mediastinal edge: 190–240 cm³ "abnormal" per normal study), so the
density is read where it means lung:

* **Parenchyma density** (:func:`parenchyma_density`): the median of the CT over the *strict* lung mask around
  each strict-lung voxel, over 7 voxels (14 mm) along each axis in turn (a separable 7³ median). Thin vessels
  and airways are a minority of such a window and do not move it; ground glass, consolidation and emphysema
  fill it. The strict mask keeps ground glass (it is below its −400 HU threshold) and enclosed dense lesions
  (holes are filled); what it misses at the pleura the flow's map still sees.
* **Score**: the voxel map (:class:`DensityScore`, a :class:`VoxelScore`) with the parenchyma density beside
  it, NaN outside the strict mask.
* **Reference**: two anatomy references (:func:`fit_anatomy_reference`, median and MAD per band of depth,
  medial–lateral and cranio-caudal position): the flow's map on the permissive mask, as ``anatomy`` does, and
  the density on the strict mask. Both from healthy validation studies only: a density reference means
  something only on the scanner and protocol it was fitted on, so it is always the site's own.
* **Atypicality**: ``−max(|z_flow|, density_weight·|z_density|)``: a voxel is abnormal where the flow's map
  is more than τ from healthy, or the density more than τ/density_weight. The weight is searched on validation
  like σ and τ: the density's healthy tails (vessels where the strict mask meets the hilum, the dependent lung)
  are heavier than the flow's, and at weight 0 this kind is ``anatomy`` exactly, so a site whose validation
  studies gain nothing from the density gets the flow's map alone.

Everything else (σ-smoothing inside each mask, components ≥ v_min, T) is the voxel map's, and so is the
predictor: this kind costs one separable median filter per study beyond ``anatomy`` (bench/density.py).

Measured (docs/RESULTS.md, 2026-12-06 late night): on every stored crosswise and site-adapted map of issue 16 (10
model-and-direction runs, 36 validation studies each) the cross-fitted search took the density in 8 and left it
out in 2; the test AUROC was never below ``anatomy``'s and rose by 0.01–0.15 where the density was taken (mean
0.707 → 0.780). On the demo's 22 validation studies and its two-minute model, though, the search took the
density and the test AUROC fell from 0.808 to 0.579. So it is opt-in (``scoring.map: anatomy-density``), not
the default: a site chooses it on its own validation studies, as it chooses site adaptation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .anatomy_map import AnatomyMap, anatomy_z, fit_anatomy_reference
from .voxel_map import VoxelScore, smooth_in_mask

DENSITY_CUBE = 7  # voxels (14 mm on the 2 mm grid): wider than the lung's vessels outside the hilum
DENSITY_PERCENTILE = 50.0


def parenchyma_density(volume: np.ndarray, strict: np.ndarray, size: int = DENSITY_CUBE,
                       percentile: float = DENSITY_PERCENTILE) -> np.ndarray:
    """The ``percentile`` of ``volume`` over the lung around each voxel of ``strict`` (float32, NaN outside it),
    taken along z, then y, then x over ``size`` voxels each: a separable stand-in for the ``size³`` cube's, about
    10–30× faster on a chest (bench/density.py), and as blind to a thin vessel, which fills at most the pass along
    it. Before each pass every voxel outside the mask takes the value of its nearest lung voxel, so the chest
    wall and the mediastinum never enter a window at the lung's edge."""
    m = np.asarray(strict) != 0
    out = np.full(np.shape(volume), np.nan, np.float32)
    if not m.any():
        return out
    h = int(size) // 2
    box = ndimage.find_objects(m.astype(np.int8))[0]
    sl = tuple(slice(max(s.start - h, 0), s.stop + h) for s in box)
    v, mm = np.array(volume[sl], np.float32), m[sl]
    nearest = tuple(ndimage.distance_transform_edt(~mm, return_distances=False, return_indices=True))
    for axis in range(3):
        v = v[nearest]  # lung voxels are their own nearest
        footprint = [1, 1, 1]
        footprint[axis] = int(size)
        v = (ndimage.median_filter(v, size=footprint) if percentile == 50.0
             else ndimage.percentile_filter(v, float(percentile), size=footprint))
    out[sl] = np.where(mm, v, np.nan)
    return out


@dataclass
class DensityScore(VoxelScore):
    """The voxel map of one study and its parenchyma density (NaN outside the strict lung mask)."""

    parenchyma: np.ndarray | None = None
    density_percentile: float = DENSITY_PERCENTILE

    def arrays(self) -> dict:
        return {**super().arrays(), "parenchyma": self.parenchyma,
                "density_percentile": np.float64(self.density_percentile)}

    @classmethod
    def load(cls, path) -> DensityScore:
        with np.load(Path(path), allow_pickle=False) as f:
            if "parenchyma" not in f.files:
                raise ValueError(f"{path} holds a voxel map without the parenchyma density: score the studies "
                                 "again with scoring.map: anatomy-density")
            return cls(**cls.fields_of(f), parenchyma=f["parenchyma"],
                       density_percentile=float(f["density_percentile"]))

    @property
    def strict(self) -> np.ndarray:
        """The strict lung mask the density was read in."""
        return np.isfinite(self.parenchyma)


def reference_fingerprint(reference: dict) -> tuple:
    """The content of a reference made of anatomy references (``{part: fit_anatomy_reference(...)}``): what a
    memo of z maps may be keyed by (two fits on the same normals give the same fingerprint)."""
    return tuple((part, b["median"], b["scale"]) for part, ref in sorted(reference.items()) if isinstance(ref, dict)
                 for b in ref["bands"])


class AnatomyDensityMap(AnatomyMap):
    """The anatomy voxel map, and the parenchyma density against its own anatomy reference (module docstring)."""

    name = "anatomy-density"
    title = ("coarse-latent voxel map and parenchyma density, each against a healthy median and MAD per anatomical "
             "band; |z_flow| > τ or density_weight·|z_density| > τ (not in the paper)")
    score_file = "voxel_density_map.npz"
    space = {**AnatomyMap.space, "density_weight": [0.0, 0.33, 0.5, 0.67, 1.0]}
    map_params = ("sigma_vox", "density_weight")
    reference_params = ("sigma_vox",)  # the search refits the references per σ, not per weight
    tie_break = (*AnatomyMap.tie_break, ("density_weight", "asc"))  # a lower weight flags less

    def settings(self, scoring: dict, patch_size: int) -> dict:
        pct = float(scoring.get("density_percentile") or DENSITY_PERCENTILE)
        if not 0.0 < pct < 100.0:
            raise ValueError(f"scoring.density_percentile must lie between 0 and 100, got {pct}")
        return {**super().settings(scoring, patch_size), "density_percentile": pct}

    def score(self, predictor, study, settings: dict, device="cpu") -> DensityScore:
        flow = super().score(predictor, study, settings, device)
        pct = float(settings.get("density_percentile", DENSITY_PERCENTILE))
        return DensityScore(**vars(flow), parenchyma=parenchyma_density(study.volume, study.strict, percentile=pct),
                            density_percentile=pct)

    def load_score(self, path) -> DensityScore:
        return DensityScore.load(path)

    def score_settings(self, score: DensityScore) -> dict:
        return {**super().score_settings(score), "density_percentile": float(score.density_percentile)}

    def _smoothed(self, score: DensityScore, mask, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        return (smooth_in_mask(score.voxel_map, mask, sigma),
                smooth_in_mask(score.parenchyma, score.strict, sigma))

    def fit_reference(self, scores, masks, params) -> dict:
        sigma = float(params["sigma_vox"])
        flow, density = zip(*(self._smoothed(s, m, sigma) for s, m in zip(scores, masks, strict=True)), strict=True)

        def fit(maps, ms):
            return fit_anatomy_reference(maps, ms, self.bins, self.lateral, self.vertical, self.calibration,
                                         self.fraction)

        return {"type": "anatomy-density", "flow": fit(flow, masks),
                "density": fit(density, [s.strict for s in scores])}

    def _z_inside(self, score: DensityScore, mask, sigma: float, reference: dict) -> tuple:
        """``(inside, |z_flow|, |z_density|)`` at the voxels of ``mask`` (``|z_density|`` NaN off the strict lung).
        The last triple is kept on the score, because the search rebuilds the map for every density_weight at one
        σ and one reference; only the mask's voxels, so the memo is a fraction of the map the search holds."""
        key = (float(sigma), reference_fingerprint(reference))
        memo = getattr(score, "_z_memo", None)
        if memo is None or memo[0] != key:
            inside = np.asarray(mask) != 0
            flow, density = self._smoothed(score, mask, sigma)
            memo = (key, inside, np.abs(anatomy_z(reference["flow"], flow, mask))[inside],
                    np.abs(anatomy_z(reference["density"], density, score.strict))[inside])
            score._z_memo = memo
        return memo[1:]

    def z_maps(self, score: DensityScore, mask, sigma: float, reference: dict) -> tuple[np.ndarray, np.ndarray]:
        """``(|z_flow|, |z_density|)`` on the study's grid (NaN outside ``mask``; the density's also off the
        strict lung)."""
        inside, z_flow, z_density = self._z_inside(score, mask, sigma, reference)
        out = np.full((2, *inside.shape), np.nan, np.float32)
        out[0][inside], out[1][inside] = z_flow, z_density
        return out[0], out[1]

    def atypicality(self, score: DensityScore, mask, params, reference) -> np.ndarray:
        inside, z_flow, z_density = self._z_inside(score, mask, float(params["sigma_vox"]), reference)
        w = float(params["density_weight"])
        out = np.full(inside.shape, np.nan, np.float32)
        with np.errstate(invalid="ignore"):
            out[inside] = -np.fmax(z_flow, w * z_density) if w > 0 else -z_flow
        return out

    def __repr__(self) -> str:
        return f"<map kind {self.name!r}: the anatomy map and the parenchyma density>"
