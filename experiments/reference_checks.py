"""More healthy-reference ideas for issue 16, judged on stored voxel maps of ``experiments/transfer.py``.

    .venv/bin/python experiments/reference_checks.py --transfer work/experiments/transfer-2711 \
        --a work/experiments/det-a --b work/experiments/det-b --directions 'A->A' 'A->B' --candidates study-centred

Each candidate is searched on validation only with the cross-fitted search (:mod:`ct3dflow.detect.search`, the
space of ``transfer.py``) and tested once, beside the platform's ``anatomy`` reference (``anatomy-mad``):

* ``study-centred`` / ``study-scaled`` — each study's smoothed map minus its own median per depth band (and
  divided by its own robust spread), then the anatomy reference: if a scanner or protocol moved a whole study's
  map, this would take it out;
* ``density`` — no model: the preprocessed CT itself (smoothed) against the anatomy reference, i.e. what a
  density threshold fitted on the site's normals finds;
* ``flow+density`` — a voxel is abnormal where either the flow's map or the density is (the larger ``|z|``);
* ``parenchyma`` / ``flow+parenchyma`` — the same with the parenchyma density of
  :func:`ct3dflow.detect.density_map.parenchyma_density` (``--parenchyma-percentile``) read in the strict lung,
  the second with its own τ (``tau_parenchyma``, searched);
* ``anatomy-density`` — the platform's kind (:mod:`ct3dflow.detect.density_map`) on the stored flow maps and
  the parenchyma density computed here (``--density-margin``), the measurement behind the kind
  (docs/RESULTS.md); variants of its density channel, none of which helped: ``--density-detrend`` (less the
  study's own level, or its level per coronal slab), ``--density-feature spread`` (the local texture instead),
  ``--density-mask permissive`` (read in the permissive mask's core);
* ``anatomy-two-densities`` — that kind with a second channel on the permissive core at its own weight: its
  density (``--outer-feature median``), 10th percentile (``p10``), texture (``spread``) or bright sheets
  (``plate``, :func:`plateness`), against median and MAD or its healthy tail (``--outer-calibration``); none helped.

``--blobs`` scores the platform's bright-blob response too (``ct3dflow.detect.blobs``, the default since
2026-12-07 02:30 UTC; ``--blob-sigmas``, kept per study in ``--feature-cache``) and searches its weight; ``--bite``
adds the lung's bite (``ct3dflow.detect.bite``, the default since 2026-12-07 05:00 UTC) to that channel.

``anatomy-more`` (2026-12-07, 08:00 UTC) is ``anatomy-density`` with more one-sided channels, each against its own
healthy tail per band: ``--bite-closings 30`` (a bite at a wider closing too, in the solid channel, for wide pleural
consolidation) and ``--dark-blobs`` (a dark-ball response on the strict core, for emphysema's small pockets);
``--density-window`` reads the density over a narrower window (any candidate of the kind). None helped
(docs/RESULTS.md).

2026-12-07, 13:30 UTC, none adopted (docs/RESULTS.md): ``--bite-tail-floor`` (the bite's healthy tail at least
that many voxels in every band, :func:`floor_bite_tail`), ``anatomy-more --asymmetry`` (the lungs' left–right
asymmetry in the solid channel, :func:`lung_asymmetry`) and ``anatomy-flow-bands`` (the flow's reference banded by
the local lung fraction too, :class:`FlowBands`). ``--dump DIR`` writes every test study's volume at the chosen
point, to read which abnormal–normal pairs are ordered wrong.

2026-12-07, 15:00 UTC (docs/RESULTS.md): ``anatomy-flow-bands --flow-fraction 1 --flow-ap 3`` (the flow's bands split
from front to back, as the bite's) and ``anatomy-flow-weight`` (the flow's map at a searched weight too,
:class:`FlowWeight`), none adopted; ``--reference-train`` fits every reference on the target family's healthy
training studies too (:func:`with_reference_studies`; their maps from ``transfer.py --score-train``).

``--oracle`` adds the best test AUROC any point of the grid (at v_min 0) reaches: a ceiling of the map, to
tell a weak map from a poor choice on validation; it never chooses anything.

Prints one line per direction and candidate (validation AUROC cross-fitted; test AUROC, specificity, the normal
test studies' median abnormal volume; at the spec-0.9 T specificity / sensitivity; per kind test AUROC).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from transfer import SPACE, summarise  # noqa: E402

from ct3dflow.cache import StudyCache  # noqa: E402
from ct3dflow.detect.anatomy_map import TAIL_Z, AnatomyMap, anatomy_z, fit_anatomy_reference  # noqa: E402
from ct3dflow.detect.bite import BITE_ANTERIOR_POSTERIOR, BITE_OPENING, lung_bite  # noqa: E402
from ct3dflow.detect.blobs import BLOB_SIGMAS, bright_blobness, hessian_response  # noqa: E402
from ct3dflow.detect.density_map import (  # noqa: E402
    DENSITY_CUBE,
    DENSITY_MARGIN,
    AnatomyDensityMap,
    DensityScore,
    below_normalised,
    lung_core,
    parenchyma_density,
    reference_fingerprint,
)
from ct3dflow.detect.evaluate import evaluate  # noqa: E402
from ct3dflow.detect.search import ScoredStudy, grid_search, threshold_rule  # noqa: E402
from ct3dflow.detect.voxel_map import DEFAULT_DEPTH_BINS, VoxelScore, depth_bands, smooth_in_mask  # noqa: E402
from ct3dflow.pipeline import manifest_rows  # noqa: E402


class Maps(VoxelScore):
    """A study's stored flow map with its preprocessed CT (and its parenchyma density) beside it."""

    def __init__(self, flow: VoxelScore, density: np.ndarray, strict: np.ndarray,
                 parenchyma: np.ndarray | None = None):
        super().__init__(flow.voxel_map, flow.stride, flow.part, flow.size, flow.n_windows, flow.phases, flow.merge)
        self.density, self.strict, self.parenchyma = density, strict, parenchyma


def study_normalised(smoothed: np.ndarray, mask: np.ndarray, scale: bool) -> np.ndarray:
    """``smoothed`` minus the study's own median per depth band (divided by its own robust spread)."""
    band, out = depth_bands(mask), smoothed.copy()
    fin = np.isfinite(smoothed)
    for b in range(len(DEFAULT_DEPTH_BINS)):
        sel = (band == b) & fin
        if sel.sum() > 50:
            out[sel] = smoothed[sel] - np.median(smoothed[sel])
    if scale:
        v = out[fin & (band >= 0)]
        out = out / max(1.4826 * float(np.median(np.abs(v - np.median(v)))), 1e-6)
    return out


class Candidate(AnatomyMap):
    def __init__(self, name: str):
        super().__init__(lateral=3, vertical=3, calibration="mad")
        self.label = name
        if name == "flow+parenchyma":  # the parenchyma's own τ: its |z| is rescaled so that τ_z reads it
            self.space = {**self.space, "tau_parenchyma": [3.0, 5.0, 8.0, 12.0]}
            self.map_params = ("sigma_vox", "tau_z", "tau_parenchyma")
            self.reference_params = ("sigma_vox",)  # the search refits per σ only; |z| is kept per score

    def _maps(self, score: Maps, mask, params) -> dict:
        sigma = float(params["sigma_vox"])
        out = {}
        if self.label not in ("density", "parenchyma"):
            flow = smooth_in_mask(score.voxel_map, mask, sigma)
            if self.label.startswith("study-"):
                flow = study_normalised(flow, mask, self.label == "study-scaled")
            out["flow"] = flow
        if "density" in self.label:
            out["density"] = smooth_in_mask(score.density, mask, sigma)
        if "parenchyma" in self.label:
            out["parenchyma"] = smooth_in_mask(score.parenchyma, score.strict, sigma)
        return out

    @staticmethod
    def _mask(key: str, score: Maps, mask):
        return score.strict if key == "parenchyma" else mask  # the parenchyma lives in the strict lung

    def fit_reference(self, scores, masks, params) -> dict:
        per = [self._maps(s, m, params) for s, m in zip(scores, masks, strict=True)]
        return {k: fit_anatomy_reference([p[k] for p in per], [self._mask(k, s, m) for s, m in zip(scores, masks)],
                                         self.bins, 3, 3, "mad") for k in per[0]}

    def atypicality(self, score, mask, params, reference) -> np.ndarray:
        key = (float(params["sigma_vox"]), reference_fingerprint(reference))
        memo = score.__dict__.setdefault("_z_memo", {})
        if key not in memo:
            mp = self._maps(score, mask, params)
            memo[key] = {k: np.abs(anatomy_z(reference[k], mp[k], self._mask(k, score, mask))) for k in mp}
        z = dict(memo[key])
        if "tau_parenchyma" in params and "parenchyma" in z:
            z["parenchyma"] = z["parenchyma"] * (float(params["tau_z"]) / float(params["tau_parenchyma"]))
        return np.where(np.asarray(mask) != 0, -np.fmax.reduce(list(z.values())), np.nan)


class TwoDensities(AnatomyDensityMap):
    """``anatomy-density`` with a second density, read in the *permissive* mask's core (where subpleural
    consolidation and honeycombing lie, outside the strict mask), against its own anatomy reference and with its
    own searched weight: ``−max(|z_flow|, density_weight·|z_density|, outer_weight·|z_outer|)``."""

    name = "anatomy-two-densities"
    outer_calibration = "mad"  # "tail": in units of its healthy 99.9th percentile per band, as the blobs are
    space = {**AnatomyDensityMap.space, "outer_weight": [0.0, 0.5, 1.0]}
    map_params = (*AnatomyDensityMap.map_params, "outer_weight")
    tie_break = (*AnatomyDensityMap.tie_break, ("outer_weight", "asc"))

    def fit_reference(self, scores, masks, params) -> dict:
        from ct3dflow.detect.density_map import core_bins

        ref = super().fit_reference(scores, masks, params)
        sigma = float(params["sigma_vox"])
        outer = [np.isfinite(s.outer) for s in scores]
        ref["outer"] = fit_anatomy_reference([smooth_in_mask(s.outer, m, sigma) for s, m in zip(scores, outer)], outer,
                                             core_bins(self.bins, int(scores[0].density_margin)), 3, 3,
                                             self.outer_calibration)
        return ref

    def atypicality(self, score, mask, params, reference) -> np.ndarray:
        a = super().atypicality(score, mask, params, reference)
        w = float(params["outer_weight"])
        if w == 0:
            return a
        key = (float(params["sigma_vox"]), reference_fingerprint({"outer": reference["outer"]}))
        memo = score.__dict__.get("_outer_memo")
        if memo is None or memo[0] != key:
            core = np.isfinite(score.outer)
            memo = (key, np.abs(anatomy_z(reference["outer"], smooth_in_mask(score.outer, core,
                                                                              float(params["sigma_vox"])), core)))
            score._outer_memo = memo
        with np.errstate(invalid="ignore"):
            return np.where(np.asarray(mask) != 0, -np.fmax(-a, w * memo[1]), np.nan)


class MoreChannels(AnatomyDensityMap):
    """``anatomy-density`` with more one-sided channels (``score.extra``: name → (array, channel, front-to-back
    parts)), each against its own healthy tail per band and folded into a channel of the kind: ``"solid"`` (with the
    blobs and the bite, at blob_weight) or ``"density"`` (with |z_density|, at density_weight). A prototype for
    ``--bite-closings`` and ``--dark-blobs``."""

    def fit_reference(self, scores, masks, params) -> dict:
        from ct3dflow.detect.density_map import core_bins

        ref = super().fit_reference(scores, masks, params)
        sigma, bins = float(params["sigma_vox"]), core_bins(self.bins, int(scores[0].density_margin))
        for name, (_, _, ap) in scores[0].extra.items():
            arrs = [s.extra[name][0] for s in scores]
            regions = [np.isfinite(a) for a in arrs]
            ref["x-" + name] = fit_anatomy_reference([smooth_in_mask(a, r, sigma) for a, r in zip(arrs, regions)],
                                                     regions, bins, self.lateral, self.vertical, "tail", 1, ap)
        return ref

    def _z_inside(self, score, mask, sigma, reference) -> tuple:
        inside, z_flow, z_density, z_blob, z_bite = super()._z_inside(score, mask, sigma, reference)
        key = (float(sigma), reference_fingerprint(reference))
        memo = getattr(score, "_x_memo", None)
        if memo is None or memo[0] != key:
            z_density, z_blob = z_density.copy(), z_blob.copy()
            for name, (arr, channel, _) in score.extra.items():
                region = np.isfinite(arr)
                z = anatomy_z(reference["x-" + name], smooth_in_mask(arr, region, sigma), region)[inside]
                if channel == "density":
                    z_density = np.fmax(z_density, z)
                else:
                    z_blob = np.fmax(z_blob, z)
            memo = (key, inside, z_flow, z_density, z_blob, z_bite)
            score._x_memo = memo
        return memo[1:]


class FlowBands(AnatomyDensityMap):
    """``anatomy-density`` with the flow's reference banded further (``anatomy-flow-bands``): by the share of lung
    in the window-sized box around each voxel (``--flow-fraction``, :func:`lung_fraction`) and from front to back
    (``--flow-ap``). Family B's normal test studies carry the flow's false volume at the lung's thin tips beside
    the spine and behind the sternum, where a window holds little lung (A→B, docs/RESULTS.md 2026-12-07 13:30)."""

    flow_fraction, flow_ap = 3, 1

    def fit_reference(self, scores, masks, params) -> dict:
        ref = super().fit_reference(scores, masks, params)
        sigma = float(params["sigma_vox"])
        flow = [smooth_in_mask(s.voxel_map, m, sigma) for s, m in zip(scores, masks, strict=True)]
        ref["flow"] = fit_anatomy_reference(flow, masks, self.bins, self.lateral, self.vertical, self.calibration,
                                            self.flow_fraction, self.flow_ap)
        return ref


class FlowWeight(AnatomyDensityMap):
    """``anatomy-density`` with the flow's map at a searched weight too (``anatomy-flow-weight``, ``flow_weight``):
    ``−max(flow_weight·|z_flow|, density_weight·|z_density|, blob_weight·max(z_blob, z_bite))``. τ's grid ends at 6,
    and family B's normal phantom-b-7-0048 carries |z_flow| up to 9.7 at the lung's thin tips (A→B,
    docs/RESULTS.md 2026-12-07 13:30): a lower flow weight lets validation say how far the flow's tails are to be
    trusted on another family."""

    name = "anatomy-flow-weight"
    space = {**AnatomyDensityMap.space, "flow_weight": [0.5, 0.75, 1.0]}
    map_params = (*AnatomyDensityMap.map_params, "flow_weight")
    tie_break = (*AnatomyDensityMap.tie_break, ("flow_weight", "asc"))

    def atypicality(self, score, mask, params, reference) -> np.ndarray:
        inside, z_flow, z_density, z_blob, z_bite = self._z_inside(score, mask, float(params["sigma_vox"]),
                                                                   reference)
        wf, w, wb = (float(params[k]) for k in ("flow_weight", "density_weight", "blob_weight"))
        out = np.full(inside.shape, np.nan, np.float32)
        with np.errstate(invalid="ignore"):
            a = np.fmax(wf * z_flow, w * z_density) if w > 0 else wf * z_flow
            out[inside] = -(np.fmax(a, wb * np.fmax(z_blob, z_bite)) if wb > 0 else a)
        return out


def with_reference_studies(kind, healthy: list[ScoredStudy]):
    """``kind`` (in place) with every reference it fits fitted on ``healthy`` too (``--reference-train``): a site's
    other healthy studies, never tested, beside the validation normals of the cross-fitting fold. The search still
    chooses on validation only; the extra studies only widen what the reference knows of healthy lungs (16
    validation normals give each band's 99.9th percentile from 12 studies per fold)."""
    fit = kind.fit_reference

    def fit_with(scores, masks, params):
        return fit([*scores, *(s.score for s in healthy)], [*masks, *(s.permissive for s in healthy)], params)

    kind.fit_reference = fit_with
    return kind


def floor_bite_tail(kind, floor: float):
    """``kind`` (in place) with its bite reference's healthy 99.9th percentile at least ``floor`` voxels in every
    band. Where healthy lungs (almost) never bite, a band's tail is 0 or nearly, and the trace of a bite that
    smoothing spreads there (0.001–0.1 voxel) reads as z of 37 to 422,337: 1.1–2.7 cm³ of three of family B's normal
    test studies, A→B. Floored at 1 or 0.25 voxel, though, both directions' validation fell or held, and real
    lesions' bites there went with the traces (docs/RESULTS.md, 2026-12-07 13:20): not adopted."""
    fit = kind.fit_reference

    def fit_floored(scores, masks, params):
        ref = fit(scores, masks, params)
        if "bite" in ref:
            for band in (*ref["bite"]["bands"], *ref["bite"]["depth_bands"]):
                band["scale"] = max(band["scale"], floor / TAIL_Z)
        return ref

    kind.fit_reference = fit_floored
    return kind


def cached_feature(path: Path | None, compute) -> np.ndarray:
    """``compute()``, kept in ``path`` when given (a feature of the study alone: not of the model or direction)."""
    if path is not None and path.exists():
        return np.load(path)
    out = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out)
    return out


def dark_blobness(volume: np.ndarray, region: np.ndarray, sigmas) -> np.ndarray:
    """σ²·λ1 where all eigenvalues of the Hessian at scale σ are positive (a dark ball: an emphysema pocket, a cyst),
    the largest over ``sigmas``; NaN off ``region``."""
    return hessian_response(volume, region, sigmas, lambda lam: np.where(lam[:, 0] > 0, lam[:, 0], 0.0))


CANDIDATES = ("anatomy-mad", "study-centred", "study-scaled", "density", "flow+density", "parenchyma",
              "flow+parenchyma", "anatomy-density", "anatomy-two-densities", "anatomy-more", "anatomy-flow-bands",
              "anatomy-flow-weight")


def lung_asymmetry(strict: np.ndarray, region: np.ndarray) -> np.ndarray:
    """How much further from the aerated lung a voxel lies than its mirror image across the body's mid-sagittal
    plane (voxels, ≥ 0; NaN outside ``region``; 0 where the mirror falls outside the volume). The plane is half-way
    between the lungs' outer edges (the x axis runs from one side to the other). A consolidation filling one
    lung's paravertebral corner, where the healthy gutter's own bite is as deep as the lesion's (docs/RESULTS.md),
    lies where the other lung is aerated; the heart's side is asymmetric in every healthy chest, and the bands'
    own healthy tails take that in."""
    lung = np.asarray(strict) != 0
    out = np.full(lung.shape, np.nan, np.float32)
    region = np.asarray(region) != 0
    xs = np.nonzero(lung.any(axis=(0, 1)))[0]
    if not region.any() or len(xs) == 0:
        return out
    n = lung.shape[2]
    mirror_x = int(xs[0] + xs[-1]) - np.arange(n)
    inside = (mirror_x >= 0) & (mirror_x < n)
    distance = ndimage.distance_transform_edt(~lung).astype(np.float32)
    mirrored = np.where(inside, distance[:, :, np.clip(mirror_x, 0, n - 1)], distance)
    out[region] = np.maximum(distance - mirrored, 0.0)[region]
    return out


def detrended(dens: np.ndarray, how: str, slab: int = 4) -> np.ndarray:
    """The parenchyma density less the study's own level: ``centre`` its median, ``ap`` its median per coronal
    slab of ``slab`` voxels (the gravity gradient and the level), smoothed along y."""
    if how == "none":
        return dens
    fin = np.isfinite(dens)
    if how == "centre":
        return dens - np.float32(np.median(dens[fin]))
    ys = np.nonzero(fin)[1]
    prof = np.full(dens.shape[1], np.nan)
    for y0 in range(ys.min(), ys.max() + 1, slab):
        v = dens[:, y0:y0 + slab][fin[:, y0:y0 + slab]]
        if v.size:
            prof[y0:y0 + slab] = np.median(v)
    idx = np.arange(dens.shape[1])
    ok = np.isfinite(prof)
    prof = np.interp(idx, idx[ok], prof[ok])
    prof = ndimage.gaussian_filter1d(prof, slab, mode="nearest")
    return dens - prof[None, :, None].astype(np.float32)


def local_spread(volume: np.ndarray, strict: np.ndarray, margin: int) -> np.ndarray:
    """The separable median of |CT − its separable median| over the lung's core: the lung's local texture (cysts
    and walls raise it, a thin vessel does not)."""
    med = parenchyma_density(volume, strict, margin=margin)
    dev = np.where(np.isfinite(med), np.abs(volume - np.nan_to_num(med)), 0.0).astype(np.float32)
    core = np.isfinite(med)
    return parenchyma_density(dev, core, margin=0)


def plateness(volume: np.ndarray, region: np.ndarray, sigmas=(1.0, 1.5)) -> np.ndarray:
    """A bright-sheet response on ``region`` (NaN elsewhere), the largest over ``sigmas`` (voxels): σ²·(|λ1| − |λ2|)
    where λ1 < 0 is the Hessian's most negative eigenvalue and λ2 the middle one (0 for blobs and tubes, whose two
    largest are alike; |λ1| for a thin bright wall). Honeycombing is a network of such walls around dark cysts."""
    return hessian_response(volume, region, sigmas,
                            lambda lam: np.where(lam[:, 0] < 0, np.abs(lam[:, 0]) - np.abs(lam[:, 1]), 0.0))


def blob_of(vol: np.ndarray, hull: np.ndarray, margin: int, cached: Path | None, sigmas=BLOB_SIGMAS) -> np.ndarray:
    """The platform's bright-blob response on the permissive core (what ``anatomy-density`` scores), kept in
    ``cached`` when given: it depends on the study alone, not on the model or the direction."""
    return cached_feature(cached, partial(bright_blobness, vol, lung_core(hull, margin), sigmas))


def studies_of(transfer: Path, direction: str, data_run: Path, split: str,
               parenchyma: float = 0.0, platform_kind: bool = False, detrend: str = "none",
               margin: int = DENSITY_MARGIN, feature: str = "median", where: str = "strict",
               below_hu: float | None = None, outer: str = "median", blobs: bool = False,
               feature_cache: str | None = None, blob_sigmas=BLOB_SIGMAS, bite: int = 0,
               bite_closings=(), dark_sigmas=(), dark_channel: str = "density",
               density_window: int = DENSITY_CUBE, asymmetry: bool = False) -> list[ScoredStudy]:
    res = pd.read_parquet(transfer / direction / split / "results.parquet").set_index("study_id")
    cache = StudyCache(data_run / "cache")
    out = []
    for r in manifest_rows(data_run / "archive" / "manifest.parquet"):
        if r["split"] != split or r["study_id"] not in res.index:
            continue
        st = cache.load(r["study_id"], mmap=True)
        vol = np.asarray(st.volume, np.float32)
        # where the density is read ("both": the strict core's, and the permissive core's as ``outer``)
        strict = np.asarray(st.permissive if where == "permissive" else st.strict) != 0
        # aerated lung only: the hilum's vessels and other soft tissue leave the density (the preprocessing's scale)
        below = None if below_hu is None else below_normalised(below_hu, st.hu_window)
        flow = VoxelScore.load(res.loc[r["study_id"], "score_path"])
        dens = (detrended(parenchyma_density(vol, strict, size=density_window, percentile=parenchyma, margin=margin,
                                             below=below), detrend)
                if parenchyma else None)
        if parenchyma and feature == "spread":
            dens = local_spread(vol, strict, margin)
        hull = np.asarray(st.permissive) != 0
        scales = "" if tuple(blob_sigmas) == BLOB_SIGMAS else "-s" + "-".join(f"{v:g}" for v in blob_sigmas)
        blob = (blob_of(vol, hull, margin, None if feature_cache is None else
                        Path(feature_cache) / f"{data_run.name}-m{margin}{scales}" / f"{r['study_id']}.npy",
                        tuple(blob_sigmas))
                if platform_kind and blobs else None)
        bites = lung_bite(st.strict, lung_core(hull, margin), st.spacing, bite) if platform_kind and bite else None
        maps = (DensityScore(**vars(flow), parenchyma=dens, density_percentile=parenchyma, density_margin=margin,
                             blob=blob, blob_sigmas=tuple(blob_sigmas) if blobs else (), bite=bites,
                             bite_opening=bite if bites is not None else 0)
                if platform_kind
                else Maps(flow, vol, strict, dens))
        if platform_kind:
            fc = None if feature_cache is None else Path(feature_cache) / f"{data_run.name}-m{margin}-more"
            maps.extra = {}
            for mm in bite_closings:
                maps.extra[f"bite{mm:g}"] = (cached_feature(
                    None if fc is None else fc / f"bite{bite}-c{mm:g}" / f"{r['study_id']}.npy",
                    partial(lung_bite, st.strict, lung_core(hull, margin), st.spacing, bite, mm)),
                    "solid", BITE_ANTERIOR_POSTERIOR)
            if asymmetry:
                maps.extra["asym"] = (cached_feature(
                    None if fc is None else fc / "asym" / f"{r['study_id']}.npy",
                    partial(lung_asymmetry, st.strict, lung_core(hull, margin))), "solid", BITE_ANTERIOR_POSTERIOR)
            if dark_sigmas:
                tag = "-".join(f"{v:g}" for v in dark_sigmas)
                maps.extra["dark"] = (cached_feature(
                    None if fc is None else fc / f"dark-{tag}" / f"{r['study_id']}.npy",
                    partial(dark_blobness, vol, lung_core(st.strict, margin), tuple(dark_sigmas))), dark_channel, 1)
        if platform_kind and where == "both":
            maps.outer = (local_spread(vol, hull, margin) if outer == "spread" else
                          plateness(vol, lung_core(hull, margin)) if outer == "plate" else
                          parenchyma_density(vol, hull, percentile=10.0 if outer == "p10" else 50.0, margin=margin))
        out.append(ScoredStudy(r["study_id"], int(r["label"]), r["pathology"] if isinstance(r["pathology"], str)
                               else None, np.asarray(st.permissive), tuple(st.spacing), maps))
    return out


def oracle(kind, val, test, space) -> tuple[float, dict]:
    """The best *test* AUROC over the grid (v_min 0: volumes by counting, each (σ, weight) map built once), with the
    reference fitted on every healthy validation study: how far any choice of these parameters could go on this
    map. A ceiling to read the search against, never a choice."""
    from sklearn.metrics import roc_auc_score

    from ct3dflow.detect.search import MapCache, grid

    cache, y = MapCache(kind, val), np.array([s.label for s in test])
    best = (0.0, {})
    map_space = {k: space[k] for k in kind.map_params}
    for p in grid(map_space):
        p = {**p, "tau_z": 0.0, "v_min_cm3": 0.0}
        ref = cache.full_reference(p)
        maps = [kind.atypicality(s.score, s.permissive, p, ref) for s in test]
        for tau in space["tau_z"]:
            vols = [np.count_nonzero(np.nan_to_num(m, nan=0.0) < -tau) for m in maps]
            best = max(best, (roc_auc_score(y, vols), {**p, "tau_z": tau}), key=lambda b: b[0])
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transfer", required=True, help="an experiments/transfer.py output folder (its stored maps)")
    p.add_argument("--a", default=str(ROOT / "work" / "experiments" / "det-a"))
    p.add_argument("--b", default=str(ROOT / "work" / "experiments" / "det-b"))
    p.add_argument("--directions", nargs="+", default=["A->A", "A->B", "B->A", "B->B"])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    p.add_argument("--reference-folds", type=int, default=4)
    p.add_argument("--parenchyma-percentile", type=float, default=50.0,
                   help="the parenchyma density: this percentile of the strict lung (separable, 7 voxels per axis)")
    p.add_argument("--density-detrend", choices=("none", "centre", "ap"), default="none")
    p.add_argument("--density-feature", choices=("median", "spread"), default="median",
                   help="spread: the density channel is the lung's local texture instead (local_spread)")
    p.add_argument("--density-mask", choices=("strict", "permissive"), default="strict",
                   help="permissive: read the density in the permissive mask's core (where subpleural "
                   "consolidation lies) instead of the strict one's")
    p.add_argument("--density-below", type=float, default=None, metavar="HU",
                   help="read the density only over voxels below this HU (aerated lung; ground glass stays)")
    p.add_argument("--outer-feature", choices=("median", "p10", "spread", "plate"), default="median",
                   help="anatomy-two-densities: the permissive core's channel is its density (median), its low tail "
                   "(p10: the 10th percentile, where honeycombing's cysts are darker than lung) or its local texture "
                   "(spread, local_spread) or its bright sheets (plate, plateness: honeycombing's walls), where "
                   "subpleural honeycombing lies")
    p.add_argument("--outer-calibration", choices=("mad", "tail"), default="mad",
                   help="anatomy-two-densities: its second channel against median and MAD per band, or in units of "
                   "its healthy 99.9th percentile (the blobs' calibration)")
    p.add_argument("--blobs", action="store_true",
                   help="anatomy-density: score the bright-blob response too (ct3dflow.detect.blobs; the platform's "
                   "default since 2026-12-07) and search blob_weight; without it the kind as before that")
    p.add_argument("--blob-sigmas", type=float, nargs="+", default=list(BLOB_SIGMAS),
                   help="--blobs: the filter's scales in voxels (scoring.blobs)")
    p.add_argument("--bite", type=int, nargs="?", const=BITE_OPENING, default=0, metavar="VOXELS",
                   help="with --blobs: score the lung's bite too (ct3dflow.detect.bite; the platform's default since "
                   "2026-12-07 05:00 UTC), with this opening (default %(const)s), in the solid-lesion channel")
    p.add_argument("--bite-closings", type=float, nargs="*", default=[], metavar="MM",
                   help="anatomy-more: a bite at each of these closings too (mm), each against its own tail, in the "
                   "solid channel")
    p.add_argument("--dark-blobs", type=float, nargs="*", default=[], metavar="VOXELS",
                   help="anatomy-more: a dark-blob response at these scales on the strict lung's core (emphysema's "
                   "pockets), against its own tail, in --dark-channel")
    p.add_argument("--dark-channel", choices=("density", "solid"), default="density")
    p.add_argument("--bite-tail-floor", type=float, default=None, metavar="VOXELS",
                   help="the least healthy tail of the bite per band (floor_bite_tail; none by default)")
    p.add_argument("--flow-fraction", type=int, default=3, help="anatomy-flow-bands: lung-fraction bands of the flow")
    p.add_argument("--flow-ap", type=int, default=1, help="anatomy-flow-bands: front-to-back parts of the flow's bands")
    p.add_argument("--dump", default=None, metavar="DIR",
                   help="write each test evaluation (every study's volume at the chosen point) as JSON into DIR")
    p.add_argument("--reference-train", action="store_true",
                   help="fit every reference on the target family's healthy training studies too (their maps from "
                        "transfer.py --score-train): with_reference_studies")
    p.add_argument("--asymmetry", action="store_true",
                   help="anatomy-more: the lung's left-right asymmetry (lung_asymmetry) in the solid channel")
    p.add_argument("--density-window", type=int, default=DENSITY_CUBE,
                   help="the parenchyma density's window in voxels per axis (a separable median)")
    p.add_argument("--feature-cache", default=None, help="a folder to keep the blob responses in (per data run)")
    p.add_argument("--oracle", action="store_true",
                   help="also print the best test AUROC over the grid at v_min 0 (a ceiling, not a choice)")
    p.add_argument("--density-margin", type=int, default=DENSITY_MARGIN,
                   help="read the parenchyma density this many voxels inside the strict lung (0: all of it)")
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    runs = {"A": Path(a.a), "B": Path(a.b)}
    for d in a.directions:
        data_run = runs[d.split("->")[1]]
        if a.reference_train and d.split("->")[0] == d.split("->")[1]:
            p.error(f"--reference-train fits references on the target family's training studies, which {d}'s model "
                    "was trained on: use it crosswise only (A->B, B->A)")
        for name in a.candidates:
            kinds = {"anatomy-density": AnatomyDensityMap, "anatomy-two-densities": TwoDensities,
                     "anatomy-more": MoreChannels, "anatomy-flow-bands": FlowBands,
                     "anatomy-flow-weight": FlowWeight}
            par = a.parenchyma_percentile if ("parenchyma" in name or name in kinds) else 0.0
            where = "both" if name == "anatomy-two-densities" else a.density_mask
            val, test, train = (studies_of(Path(a.transfer), d, data_run, s, par, name in kinds, a.density_detrend,
                                           a.density_margin, a.density_feature, where, a.density_below,
                                           a.outer_feature, a.blobs, a.feature_cache, tuple(a.blob_sigmas), a.bite,
                                           tuple(a.bite_closings), tuple(a.dark_blobs), a.dark_channel,
                                           a.density_window, a.asymmetry)
                                if s != "train" or a.reference_train else []
                                for s in ("val", "test", "train"))
            kind, t = (kinds[name]() if name in kinds else Candidate(name)), time.time()
            kind.outer_calibration = a.outer_calibration
            if isinstance(kind, FlowBands):
                kind.flow_fraction, kind.flow_ap = a.flow_fraction, a.flow_ap
            if a.bite_tail_floor:
                floor_bite_tail(kind, a.bite_tail_floor)
            if a.reference_train:
                with_reference_studies(kind, [s for s in train if s.label == 0])
            # without --blobs the kind has no blob channel: its weight stays 0 instead of tripling the grid
            space = {**SPACE, **({} if a.blobs or name not in kinds else {"blob_weight": [0.0]})}
            op, _ = grid_search(kind, val, space, folds=a.reference_folds)
            op90, _ = grid_search(kind, val, {k: [op.params[k]] for k in kind.space},
                                  threshold_rule("specificity", 0.9), folds=a.reference_folds)
            ev = evaluate(kind, op, test, n_boot=1000)
            te, t9 = summarise(ev), summarise(evaluate(kind, op90, test, n_boot=200))
            if a.dump:  # every test study's volume at the chosen point, to read which pairs are ordered wrong
                Path(a.dump).mkdir(parents=True, exist_ok=True)
                (Path(a.dump) / f"{d.replace('->', '-to-')}-{name}.json").write_text(json.dumps(ev, indent=1,
                                                                                             default=str))
            per_kind = ", ".join(f"{k} {v:.2f}" for k, v in te["per_kind_auroc"].items())
            lo, hi = te["auroc_ci"]
            print(f"| {d} | {name} | {op.validation['auroc']:.3f} | {te['auroc']:.3f} ({lo:.2f}–{hi:.2f}) | "
                  f"{te['specificity']:.3f} | {te['normal_volume_median_cm3']:.1f} cm³ | {t9['specificity']:.3f} / "
                  f"{t9['sensitivity']:.3f} | {per_kind} |  <!-- {op.params}, {time.time() - t:.0f} s -->", flush=True)
            if a.oracle:
                top, at = oracle(kind, val, test, {**kind.space, **space})
                print(f"|   | ceiling over the grid (test, v_min 0) | | {top:.3f} | | | | |  <!-- {at} -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
