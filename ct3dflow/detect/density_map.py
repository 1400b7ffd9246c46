"""The anatomy voxel map plus the lung's own density, its bright blobs and its bite (issue 16; not in the paper).
``scoring.map: anatomy-density``, the platform's default since 2026-12-07.

Why: ground glass, a haze that raises the lung from about −850 to −700…−400 HU, lies within 1.3 healthy MADs of
the healthy median of the coarse-latent map under every model we trained (docs/RESULTS.md): the map keeps a
128-channel latent as its energy, and a shift in a few channels drowns in the χ² spread of the rest. The same
lesions lie 5–12 healthy MADs out in the lung's density. A density reference on the whole permissive mask is no
detector (it holds the hilar vessels and the mediastinal edge: 190–240 cm³ "abnormal" per normal study), so the
density is read where it means lung:

* **Parenchyma density** (:func:`parenchyma_density`): the median of the CT over the *strict* lung mask's core
  (``density_margin`` voxels inside its edge, default 2) around each core voxel, over 7 voxels (14 mm) along
  each axis in turn (a separable 7³ median). Thin vessels and airways are a minority of such a window and do
  not move it; ground glass, consolidation and emphysema fill it. The strict mask keeps ground glass (it is
  below its −400 HU threshold) and enclosed dense lesions (holes are filled); the core leaves out the partial
  volume with the pleura and the diaphragm, which read as dense lung; what the density misses at the pleura
  the flow's map still sees. Only the *aerated* lung is read (``density_below_hu``, default −300 HU, and
  ``margin`` voxels from vessels and airway walls as well): the strict mask fills its holes, so the hilum's large
  vessels lie in its core and read as dense as ground glass.
* **Bright blobs** (:func:`.blobs.bright_blobness`, ``scoring.blobs``, default scales 1.5, 2.5 and 3.5 voxels;
  ``"off"`` leaves them out): where the CT holds a solid ball (a nodule, a consolidation's body), read on the
  *permissive* mask's core (``density_margin`` voxels inside it), where subpleural consolidation lies that the
  strict mask leaves out. Tubes and planes, the lung's own solid structures, answer 0. A flow trained on other
  chests gives such lesions too little contrast (docs/img/transfer-misses-a-to-b.png); this reads the CT alone.
* **The lung's bite** (:func:`.bite.lung_bite`, ``scoring.bite``, default opening 3 voxels; ``"off"``): how far
  solid tissue presses into the lung from its wall (a pleural consolidation's half-ball, honeycombing's rind), on
  the same permissive core: its distance from the opened strict lung where a 16 mm closing fills the lung's
  surface. The blob filter does not answer to a half-ball against the chest wall; the lung's shape does.
* **Score**: the voxel map (:class:`DensityScore`, a :class:`VoxelScore`) with the parenchyma density beside
  it, NaN outside the core, and the blob response and the bite, NaN outside their core.
* **Reference**: two anatomy references (:func:`fit_anatomy_reference`, median and MAD per band of depth,
  medial–lateral and cranio-caudal position): the flow's map on the permissive mask, as ``anatomy`` does, and
  the density on the core, with the same depth bands less the margin (:func:`core_bins`). Both from healthy
  validation studies only: a density reference means something only on the scanner and protocol it was fitted
  on, so it is always the site's own. The blob response and the bite have a third and a fourth, with the
  ``"tail"`` calibration: each is 0 in most healthy lung (its MAD is 0), so it is measured in units of its healthy
  99.9th percentile per band (the hilum's healthy bite is large, the lateral wall's small; the bite's bands are
  each split in three from front to back, ``BITE_ANTERIOR_POSTERIOR``, so that the paravertebral gutter, in the
  same medial bands as the hilum, has its own).
* **Atypicality**: ``−max(|z_flow|, density_weight·|z_density|, blob_weight·max(z_blob, z_bite))``: a voxel is
  abnormal where the flow's map is more than τ from healthy, the density more than τ/density_weight, or the blob
  response or the bite more than τ/(3.09·blob_weight) times its healthy 99.9th percentile. The blobs and the bite
  share one weight, the solid-lesion channel's, so the search's grid stays as it was. The weights are searched on
  validation like σ and τ: the density's healthy tails (vessels where the strict mask meets the hilum, the
  dependent lung) are heavier than the flow's, and at weights 0 this kind is ``anatomy`` exactly, so a site whose
  validation studies gain nothing from the density or the solid lesions gets the flow's map alone. Points tuned
  before the blobs existed have no ``blob_weight`` and were scored without them (``point_defaults``): they map as
  they were chosen; points tuned before the bite have no bite part in their reference and map without it.

Everything else (σ-smoothing inside each mask, components ≥ v_min, T) is the voxel map's, and so is the
predictor: this kind costs one separable median filter per study beyond ``anatomy``, and the blob response's 18
Gaussian derivatives and a 3 × 3 eigenvalue problem per voxel of the permissive core (bench/density.py); the
bite is an opening, a closing and a distance transform (0.13 s on a phantom chest).

Measured (docs/RESULTS.md, 2026-12-06): on every stored crosswise and site-adapted map of issue 16 (10
model-and-direction runs, 36 validation studies each) the cross-fitted search took the density in 8 and left it
out in 2; the test AUROC was never below ``anatomy``'s and rose by 0.01–0.15 where the density was taken (mean
0.707 → 0.780). On the demo's 22 validation studies and its two-minute model, though, the search took the
density and the test AUROC fell from 0.808 to 0.579, so it stayed opt-in that night. The margin
(2026-12-06, near midnight) cut the density's healthy tail at the lung's edge (validation normals, voxels beyond
4 healthy MADs: family A 17 → 6.5 cm³ per study, family B 9 → 4; the demo's normals at its chosen point 24 → 4
cm³) and left the study ranking where it was (mean test AUROC over 8 runs 0.777 → 0.772; the best any grid
point reaches 0.816 → 0.809). Reading the aerated lung only (2026-12-07) raised it: mean test AUROC over the same 8
runs 0.772 → 0.815, never lower by more than 0.003, A→A 0.942 and B→A 0.831; ``anatomy`` gives 0.711 there) and
the demo's stored scores (test AUROC 0.812, ``anatomy`` 0.758), so it became the default. The bright blobs
(2026-12-07, 02:30 UTC) raised it again on the same 8 runs: mean test AUROC 0.815 → 0.911, never lower (A→A 0.942
as before, crosswise A→B 0.700 → 0.885 and B→A 0.831 → 0.899; nodules 0.85–1.00 in every run), the normal test
studies at 0.0–0.6 cm³; on the demo's stored scores 0.812 → 0.946. The lung's bite (2026-12-07, 05:00
UTC), in one channel with the blobs, raised it in all 8 runs: mean 0.911 → 0.940 (A→A 0.947, every kind ≥ 0.9;
crosswise A→B 0.909–0.953, B→A 0.944–0.947; honeycombing 0.74–0.86 → 0.91–0.98), the normal test studies at
0.0–1.1 cm³; on the demo's stored scores 0.946 → 0.975. With the bite's bands split from front to back (06:00
UTC) 0.954: crosswise B→A 0.960–0.965, A→B 0.929–0.955, A→A 0.970; family B's consolidation 0.81–0.89.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..lungs import bounding_box
from .anatomy_map import AnatomyMap, anatomy_z, fit_anatomy_reference
from .bite import BITE_ANTERIOR_POSTERIOR, BITE_OPENING, lung_bite
from .blobs import BLOB_SIGMAS, bright_blobness
from .voxel_map import VoxelScore, smooth_in_mask

# voxels (14 mm on the 2 mm grid): wider than the lung's vessels outside the hilum. 5 and 3 read small emphysema
# pockets that 7 smooths away, but lost family A's ground glass in the search (2026-12-07, docs/RESULTS.md)
DENSITY_CUBE = 7
DENSITY_PERCENTILE = 50.0
# voxels: the density is read deeper than this into the strict lung. Its outer shell is partial volume with the
# pleura and the diaphragm: on family A's validation normals it held most of the density's healthy tail (17 cm³
# per study beyond 4 healthy MADs at margin 0, 6.5 cm³ at 2; family B 9 and 4). The flow's map covers the edge.
DENSITY_MARGIN = 2
# HU: with it, the density reads only the aerated lung (below it), itself ``margin`` voxels from vessels and airway
# walls, and a voxel elsewhere in the core takes its nearest such voxel's value. The strict mask fills its holes, so
# the hilum's large vessels lay inside it and read as dense as ground glass (docs/img/transfer-misses-b-to-a.png).
# Ground glass (−700…−400 HU) stays below it. "off": every voxel of the core, as before 2026-12-07.
DENSITY_BELOW_HU = -300.0


def below_normalised(below_hu, hu_window=None) -> float | None:
    """``scoring.density_below_hu`` on the scale of a CT normalised with ``hu_window`` (``(hu_min, hu_max)`` of
    its preprocessing, ``PreprocessedStudy.hu_window``; None: the default window); None for "off"."""
    if below_hu is None or (isinstance(below_hu, float) and np.isnan(below_hu)) or below_hu == "off":
        return None
    from ..preprocess import PreprocessConfig, normalise

    cfg = PreprocessConfig() if hu_window is None else PreprocessConfig(hu_min=float(hu_window[0]),
                                                                         hu_max=float(hu_window[1]))
    return float(normalise(np.float32(below_hu), cfg))


def lung_core(strict: np.ndarray, margin: int = DENSITY_MARGIN) -> np.ndarray:
    """The voxels of ``strict`` more than ``margin`` voxels from its edge (the mask itself at margin 0)."""
    m = np.asarray(strict) != 0
    return ndimage.binary_erosion(m, iterations=int(margin)) if margin > 0 and m.any() else m


def core_bins(bins, margin: int) -> tuple[float, ...]:
    """The depth bands of ``bins`` (voxels from the lung's edge) measured in the core ``margin`` voxels inside it:
    a density band lies as deep in the lung as the flow's band of the same bounds, less the voxels the core
    leaves out (margin 0: ``bins`` unchanged)."""
    return (0.0, *(float(b) - margin for b in bins if float(b) - margin > 0))


def parenchyma_density(volume: np.ndarray, strict: np.ndarray, size: int = DENSITY_CUBE,
                       percentile: float = DENSITY_PERCENTILE, margin: int = DENSITY_MARGIN,
                       below: float | None = None) -> np.ndarray:
    """The ``percentile`` of ``volume`` over the lung around each voxel of the strict lung's core (``margin``
    voxels from its edge; float32, NaN outside it), taken along z, then y, then x over ``size`` voxels each: a
    separable stand-in for the ``size³`` cube's, about 10–30× faster on a chest (bench/density.py), and as blind
    to a thin vessel, which fills at most the pass along it. Before each pass every voxel outside the core takes
    the value of its nearest core voxel, so the chest wall, the mediastinum and the partial volume at the
    lung's edge never enter a window. With ``below`` (on the preprocessed scale, :func:`below_normalised`) only the
    core's voxels below it, ``margin`` voxels from everything above it, are read, and every other voxel takes the
    nearest such voxel's value: the hilum's vessels, which the hole-filled strict mask holds, stay out."""
    m = lung_core(strict, margin)
    out = np.full(np.shape(volume), np.nan, np.float32)
    if not m.any():
        return out
    h = int(size) // 2
    sl = bounding_box(m, h)
    v, mm = np.array(volume[sl], np.float32), m[sl]
    src = mm
    if below is not None:  # read the aerated lung only, ``margin`` voxels from its vessels and airway walls too
        src = lung_core((np.asarray(strict)[sl] != 0) & (v < np.float32(below)), margin)
        src = src if src.any() else mm
    nearest = tuple(ndimage.distance_transform_edt(~src, return_distances=False, return_indices=True))
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
    density_margin: int = DENSITY_MARGIN
    density_below_hu: float = float("nan")  # NaN: "off", every voxel of the core was read
    blob: np.ndarray | None = None  # the bright-blob response on the permissive core (NaN elsewhere); None: "off"
    blob_sigmas: tuple = ()  # its scales in voxels; () with blob None
    bite: np.ndarray | None = None  # the lung's bite on the permissive core (NaN elsewhere); None: "off"
    bite_opening: int = 0  # its opening in voxels; 0 with bite None

    def arrays(self) -> dict:
        out = {**super().arrays(), "parenchyma": self.parenchyma,
               "density_percentile": np.float64(self.density_percentile),
               "density_margin": np.int64(self.density_margin),
               "density_below_hu": np.float64(self.density_below_hu)}
        if self.blob is not None:
            out.update(blob=self.blob, blob_sigmas=np.asarray(self.blob_sigmas, np.float64))
        if self.bite is not None:
            out.update(bite=self.bite, bite_opening=np.int64(self.bite_opening))
        return out

    @classmethod
    def load(cls, path) -> DensityScore:
        with np.load(Path(path), allow_pickle=False) as f:
            if "parenchyma" not in f.files:
                raise ValueError(f"{path} holds a voxel map without the parenchyma density: score the studies "
                                 "again with scoring.map: anatomy-density")
            # files written before the margin was recorded read the whole strict mask
            margin = int(f["density_margin"]) if "density_margin" in f.files else 0
            below = float(f["density_below_hu"]) if "density_below_hu" in f.files else float("nan")
            blob = f["blob"] if "blob" in f.files else None  # files from before 2026-12-07 02:30 UTC have none
            sigmas = tuple(float(v) for v in f["blob_sigmas"]) if blob is not None else ()
            bite = f["bite"] if "bite" in f.files else None  # files from before 2026-12-07 05:00 UTC have none
            return cls(**cls.fields_of(f), parenchyma=f["parenchyma"],
                       density_percentile=float(f["density_percentile"]), density_margin=margin,
                       density_below_hu=below, blob=blob, blob_sigmas=sigmas, bite=bite,
                       bite_opening=int(f["bite_opening"]) if bite is not None else 0)

    @property
    def strict(self) -> np.ndarray:
        """Where the density was read: the strict lung mask's core (:func:`lung_core`)."""
        return np.isfinite(self.parenchyma)

    @property
    def blob_region(self) -> np.ndarray | None:
        """Where the bright-blob response was read: the permissive mask's core (None: it was not)."""
        return None if self.blob is None else np.isfinite(self.blob)

    @property
    def bite_region(self) -> np.ndarray | None:
        """Where the lung's bite was read: the permissive mask's core (None: it was not)."""
        return None if self.bite is None else np.isfinite(self.bite)


def reference_fingerprint(reference: dict) -> tuple:
    """The content of a reference made of anatomy references (``{part: fit_anatomy_reference(...)}``): what a
    memo of z maps may be keyed by (two fits on the same normals give the same fingerprint)."""
    return tuple((part, b["median"], b["scale"]) for part, ref in sorted(reference.items()) if isinstance(ref, dict)
                 for b in ref["bands"])


class AnatomyDensityMap(AnatomyMap):
    """The anatomy voxel map, the parenchyma density, the bright-blob response and the lung's bite, each against its
    own anatomy reference (module docstring)."""

    name = "anatomy-density"
    title = ("coarse-latent voxel map, parenchyma density, bright-blob response and the lung's bite, each against a "
             "healthy reference per anatomical band; |z_flow| > τ, density_weight·|z_density| > τ or "
             "blob_weight·max(z_blob, z_bite) > τ (not in the paper)")
    score_file = "voxel_density_map.npz"
    space = {**AnatomyMap.space, "density_weight": [0.0, 0.33, 0.5, 0.67, 1.0], "blob_weight": [0.0, 0.5, 1.0]}
    map_params = ("sigma_vox", "density_weight", "blob_weight")
    reference_params = ("sigma_vox",)  # the search refits the references per σ, not per weight
    tie_break = (*AnatomyMap.tie_break, ("density_weight", "asc"), ("blob_weight", "asc"))  # a lower weight flags less
    # what points made before these settings existed were scored with
    point_defaults = {**AnatomyMap.point_defaults, "density_margin": 0, "density_below_hu": "off", "blobs": "off",
                      "bite": "off"}

    def settings(self, scoring: dict, patch_size: int) -> dict:
        pct = float(scoring.get("density_percentile") or DENSITY_PERCENTILE)
        if not 0.0 < pct < 100.0:
            raise ValueError(f"scoring.density_percentile must lie between 0 and 100, got {pct}")
        margin = scoring.get("density_margin")
        margin = DENSITY_MARGIN if margin is None else margin
        if isinstance(margin, bool) or not isinstance(margin, int | np.integer) or margin < 0:
            raise ValueError(f"scoring.density_margin must be a whole number of voxels ≥ 0, got {margin!r}")
        below = scoring.get("density_below_hu")
        below = DENSITY_BELOW_HU if below is None else "off" if below is False else below  # YAML reads off as False
        if below != "off" and (isinstance(below, bool) or not isinstance(below, int | float) or not -1000 < below < 0):
            raise ValueError(f"scoring.density_below_hu must be a CT number between −1000 and 0 HU (aerated lung lies "
                             f"below it), or \"off\", got {below!r}")
        return {**super().settings(scoring, patch_size), "density_percentile": pct, "density_margin": int(margin),
                "density_below_hu": below if below == "off" else float(below),
                "blobs": blob_sigmas_setting(scoring.get("blobs")), "bite": bite_setting(scoring.get("bite"))}

    def score(self, predictor, study, settings: dict, device="cpu") -> DensityScore:
        flow = super().score(predictor, study, settings, device)
        pct = float(settings.get("density_percentile", DENSITY_PERCENTILE))
        margin = int(settings.get("density_margin", DENSITY_MARGIN))
        below = settings.get("density_below_hu", DENSITY_BELOW_HU)
        dens = parenchyma_density(study.volume, study.strict, percentile=pct, margin=margin,
                                  below=below_normalised(below, getattr(study, "hu_window", None)))
        sigmas = settings.get("blobs", BLOB_SIGMAS)
        sigmas = () if sigmas == "off" else tuple(float(v) for v in sigmas)
        core = lung_core(study.permissive, margin)
        blob = bright_blobness(study.volume, core, sigmas) if sigmas else None
        opening = settings.get("bite", BITE_OPENING)
        bite = None if opening == "off" else lung_bite(study.strict, core, study.spacing, int(opening))
        return DensityScore(**vars(flow), density_percentile=pct, density_margin=margin, parenchyma=dens,
                            density_below_hu=float("nan") if below == "off" else float(below), blob=blob,
                            blob_sigmas=sigmas, bite=bite, bite_opening=0 if bite is None else int(opening))

    def load_score(self, path) -> DensityScore:
        return DensityScore.load(path)

    def score_settings(self, score: DensityScore) -> dict:
        below = float(score.density_below_hu)
        return {**super().score_settings(score), "density_percentile": float(score.density_percentile),
                "density_margin": int(score.density_margin), "density_below_hu": "off" if np.isnan(below) else below,
                "blobs": "off" if score.blob is None else tuple(float(v) for v in score.blob_sigmas),
                "bite": "off" if score.bite is None else int(score.bite_opening)}

    def _smoothed(self, score: DensityScore, mask, sigma: float) -> tuple:
        """The flow's map, the density, the blob response and the bite (None where not scored), each smoothed in
        its mask."""
        return (smooth_in_mask(score.voxel_map, mask, sigma), smooth_in_mask(score.parenchyma, score.strict, sigma),
                None if score.blob is None else smooth_in_mask(score.blob, score.blob_region, sigma),
                None if score.bite is None else smooth_in_mask(score.bite, score.bite_region, sigma))

    def fit_reference(self, scores, masks, params) -> dict:
        sigma = float(params["sigma_vox"])
        flow, density, blob, bite = zip(*(self._smoothed(s, m, sigma) for s, m in zip(scores, masks, strict=True)),
                                        strict=True)

        margins = {int(s.density_margin) for s in scores}
        if len(margins) != 1:
            raise ValueError(f"the studies' densities were read at different margins {sorted(margins)}: score them "
                             "again with one scoring.density_margin")
        blobs = {s.blob_sigmas for s in scores}
        if len(blobs) != 1:
            raise ValueError(f"the studies' bright-blob responses were read at different scales {sorted(blobs)} (() "
                             "where scoring.blobs was off): score them again with one scoring.blobs")
        openings = {s.bite_opening if s.bite is not None else "off" for s in scores}
        if len(openings) != 1:
            raise ValueError(f"the studies' bites were read with different openings {sorted(map(str, openings))}: "
                             "score them again with one scoring.bite")
        bins = core_bins(self.bins, margins.pop())

        def fit(maps, ms, bins, calibration=self.calibration, anterior_posterior=1):
            return fit_anatomy_reference(maps, ms, bins, self.lateral, self.vertical, calibration, self.fraction,
                                         anterior_posterior)

        ref = {"type": "anatomy-density", "flow": fit(flow, masks, self.bins),
               "density": fit(density, [s.strict for s in scores], bins)}
        if blobs.pop():  # a one-sided channel, 0 in most healthy lung: its healthy 99.9th percentile per band
            ref["blob"] = fit(blob, [s.blob_region for s in scores], bins, "tail")
        if openings.pop() != "off":  # one-sided too, 0 in most healthy lung; the hilum's apart from the spine's
            ref["bite"] = fit(bite, [s.bite_region for s in scores], bins, "tail", BITE_ANTERIOR_POSTERIOR)
        return ref

    def _z_inside(self, score: DensityScore, mask, sigma: float, reference: dict) -> tuple:
        """``(inside, |z_flow|, |z_density|, z_blob, z_bite)`` at the voxels of ``mask`` (``|z_density|`` NaN off
        the strict lung; ``z_blob`` and ``z_bite`` NaN off the permissive core, and everywhere where the reference
        has no such part). The last one is kept on the score, because the search rebuilds the map for every weight
        at one σ and one reference; only the mask's voxels, so the memo is a fraction of the map the search holds."""
        key = (float(sigma), reference_fingerprint(reference))
        memo = getattr(score, "_z_memo", None)
        if memo is None or memo[0] != key:
            for part, arr, what, setting in (("blob", score.blob, "the bright-blob response", "blobs"),
                                             ("bite", score.bite, "the lung's bite", "bite")):
                if part in reference and arr is None:
                    raise ValueError(f"the reference weighs {what} but this study was scored without it "
                                     f"(scoring.{setting}: off, or a score file from before it, 2026-12-07): score "
                                     "it again")
            inside = np.asarray(mask) != 0
            flow, density, blob, bite = self._smoothed(score, mask, sigma)

            def one_sided(part, smoothed, region):
                return (np.full(int(inside.sum()), np.nan, np.float32) if part not in reference else
                        anatomy_z(reference[part], smoothed, region)[inside])

            memo = (key, inside, np.abs(anatomy_z(reference["flow"], flow, mask))[inside],
                    np.abs(anatomy_z(reference["density"], density, score.strict))[inside],
                    one_sided("blob", blob, score.blob_region), one_sided("bite", bite, score.bite_region))
            score._z_memo = memo
        return memo[1:]

    def z_maps(self, score: DensityScore, mask, sigma: float, reference: dict) -> tuple[np.ndarray, ...]:
        """``(|z_flow|, |z_density|, z_blob, z_bite)`` on the study's grid (NaN outside ``mask``; the density's also
        off the strict lung, the blob's and the bite's off the permissive core)."""
        inside, *zs = self._z_inside(score, mask, sigma, reference)
        out = np.full((len(zs), *inside.shape), np.nan, np.float32)
        for o, z in zip(out, zs, strict=True):
            o[inside] = z
        return tuple(out)

    def atypicality(self, score: DensityScore, mask, params, reference) -> np.ndarray:
        inside, z_flow, z_density, z_blob, z_bite = self._z_inside(score, mask, float(params["sigma_vox"]),
                                                                   reference)
        w, wb = float(params["density_weight"]), float(params.get("blob_weight", 0.0))  # points before blobs: 0
        out = np.full(inside.shape, np.nan, np.float32)
        with np.errstate(invalid="ignore"):
            a = np.fmax(z_flow, w * z_density) if w > 0 else z_flow
            # the solid-lesion channel: a ball inside the lung or a bite out of its wall, at one weight
            out[inside] = -(np.fmax(a, wb * np.fmax(z_blob, z_bite)) if wb > 0 else a)
        return out

    def __repr__(self) -> str:
        return (f"<map kind {self.name!r}: the anatomy map, the parenchyma density, the bright-blob response and the "
                "lung's bite>")


def blob_sigmas_setting(value) -> tuple[float, ...] | str:
    """``scoring.blobs``: the bright-blob response's scales in voxels (unset: BLOB_SIGMAS), or ``"off"``."""
    if value is None:
        return tuple(float(v) for v in BLOB_SIGMAS)
    if value is False or value == "off":  # YAML reads off as False
        return "off"
    ok = isinstance(value, list | tuple) and value and all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 8 for v in value)
    if not ok:
        raise ValueError(f"scoring.blobs must be a list of scales in voxels (each above 0 and at most 8, e.g. "
                         f"{list(BLOB_SIGMAS)}), or \"off\", got {value!r}")
    return tuple(float(v) for v in value)


def bite_setting(value) -> int | str:
    """``scoring.bite``: the lung's bite's opening in voxels (unset: BITE_OPENING), or ``"off"``."""
    if value is None:
        return BITE_OPENING
    if value is False or value == "off":  # YAML reads off as False
        return "off"
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 1 <= value <= 8:
        raise ValueError(f"scoring.bite must be the opening of the lung before its bite is measured, a whole number "
                         f"of voxels from 1 to 8 (e.g. {BITE_OPENING}), or \"off\", got {value!r}")
    return int(value)
