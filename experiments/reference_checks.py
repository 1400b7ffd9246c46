"""Two more healthy-reference ideas for issue 16, judged on stored voxel maps of ``experiments/transfer.py``.

    .venv/bin/python experiments/reference_checks.py --transfer work/experiments/transfer-2711 \
        --a work/experiments/det-a --b work/experiments/det-b --directions 'A->A' 'A->B' --candidates study-centred

Each candidate is searched on validation only with the cross-fitted search (:mod:`ct3dflow.detect.search`, the
space of ``transfer.py``) and tested once, beside the platform's ``anatomy`` reference (``anatomy-mad``):

* ``study-centred`` / ``study-scaled`` — each study's smoothed map minus its own median per depth band (and
  divided by its own robust spread), then the anatomy reference: if a scanner or protocol moved a whole study's
  map, this would take it out;
* ``density`` — no model: the preprocessed CT itself (smoothed) against the anatomy reference, i.e. what a
  density threshold fitted on the site's normals finds;
* ``flow+density`` — a voxel is abnormal where either the flow's map or the density is (the larger ``|z|``).

Prints one line per direction and candidate (validation AUROC cross-fitted; test AUROC, specificity, the normal
test studies' median abnormal volume; at the spec-0.9 T specificity / sensitivity; per kind test AUROC).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from transfer import SPACE, summarise  # noqa: E402

from ct3dflow.cache import StudyCache  # noqa: E402
from ct3dflow.detect.anatomy_map import AnatomyMap, anatomy_z, fit_anatomy_reference  # noqa: E402
from ct3dflow.detect.evaluate import evaluate  # noqa: E402
from ct3dflow.detect.search import ScoredStudy, grid_search, threshold_rule  # noqa: E402
from ct3dflow.detect.voxel_map import DEFAULT_DEPTH_BINS, VoxelScore, depth_bands, smooth_in_mask  # noqa: E402
from ct3dflow.pipeline import manifest_rows  # noqa: E402


class Maps(VoxelScore):
    """A study's stored flow map with its preprocessed CT beside it."""

    def __init__(self, flow: VoxelScore, density: np.ndarray):
        super().__init__(flow.voxel_map, flow.stride, flow.part, flow.size, flow.n_windows, flow.phases, flow.merge)
        self.density = density


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

    def _maps(self, score: Maps, mask, params) -> dict:
        sigma = float(params["sigma_vox"])
        out = {}
        if self.label != "density":
            flow = smooth_in_mask(score.voxel_map, mask, sigma)
            if self.label.startswith("study-"):
                flow = study_normalised(flow, mask, self.label == "study-scaled")
            out["flow"] = flow
        if "density" in self.label:
            out["density"] = smooth_in_mask(score.density, mask, sigma)
        return out

    def fit_reference(self, scores, masks, params) -> dict:
        per = [self._maps(s, m, params) for s, m in zip(scores, masks, strict=True)]
        return {k: fit_anatomy_reference([p[k] for p in per], masks, self.bins, 3, 3, "mad") for k in per[0]}

    def atypicality(self, score, mask, params, reference) -> np.ndarray:
        mp = self._maps(score, mask, params)
        return -np.fmax.reduce([np.abs(anatomy_z(reference[k], mp[k], mask)) for k in mp])


CANDIDATES = ("anatomy-mad", "study-centred", "study-scaled", "density", "flow+density")


def studies_of(transfer: Path, direction: str, data_run: Path, split: str) -> list[ScoredStudy]:
    res = pd.read_parquet(transfer / direction / split / "results.parquet").set_index("study_id")
    cache = StudyCache(data_run / "cache")
    out = []
    for r in manifest_rows(data_run / "archive" / "manifest.parquet"):
        if r["split"] != split or r["study_id"] not in res.index:
            continue
        st = cache.load(r["study_id"], mmap=True)
        maps = Maps(VoxelScore.load(res.loc[r["study_id"], "score_path"]), np.asarray(st.volume, np.float32))
        out.append(ScoredStudy(r["study_id"], int(r["label"]), r["pathology"] if isinstance(r["pathology"], str)
                               else None, np.asarray(st.permissive), tuple(st.spacing), maps))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transfer", required=True, help="an experiments/transfer.py output folder (its stored maps)")
    p.add_argument("--a", default=str(ROOT / "work" / "experiments" / "det-a"))
    p.add_argument("--b", default=str(ROOT / "work" / "experiments" / "det-b"))
    p.add_argument("--directions", nargs="+", default=["A->A", "A->B", "B->A", "B->B"])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    p.add_argument("--reference-folds", type=int, default=4)
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    runs = {"A": Path(a.a), "B": Path(a.b)}
    for d in a.directions:
        data_run = runs[d.split("->")[1]]
        val, test = (studies_of(Path(a.transfer), d, data_run, s) for s in ("val", "test"))
        for name in a.candidates:
            kind, t = Candidate(name), time.time()
            op, _ = grid_search(kind, val, SPACE, folds=a.reference_folds)
            op90, _ = grid_search(kind, val, {k: [op.params[k]] for k in SPACE}, threshold_rule("specificity", 0.9),
                                  folds=a.reference_folds)
            te, t9 = summarise(evaluate(kind, op, test, n_boot=1000)), summarise(evaluate(kind, op90, test, n_boot=200))
            per_kind = ", ".join(f"{k} {v:.2f}" for k, v in te["per_kind_auroc"].items())
            lo, hi = te["auroc_ci"]
            print(f"| {d} | {name} | {op.validation['auroc']:.3f} | {te['auroc']:.3f} ({lo:.2f}–{hi:.2f}) | "
                  f"{te['specificity']:.3f} | {te['normal_volume_median_cm3']:.1f} cm³ | {t9['specificity']:.3f} / "
                  f"{t9['sensitivity']:.3f} | {per_kind} |  <!-- {op.params}, {time.time() - t:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
