"""Issue 16: the flow's and the density's abnormal volumes judged apart, fused per study, on stored maps.

``anatomy-density`` flags a voxel where ``max(|z_flow|, density_weight·|z_density|) > τ`` and sums one volume
against one T, so the density's small healthy volume (a few cm³ per normal study) lifts the T that the flow's
small lesions must pass, and the search leaves the density out even where it sees ground glass 7–14 healthy
MADs out (docs/img/transfer-misses-b-to-a.png). Here each map keeps its own threshold and volume, and a study's
score is ``max(V_flow(τ), V_density(τ_density) / ratio)``: at ``ratio`` r the density needs r times the flow's
volume to count as much (``ratio`` inf: the flow alone). σ, τ, τ_density and the ratio are chosen on validation
by cross-fitted AUROC (the references of each study's fold, as the platform's search fits them), at v_min 0;
the choice is tested once with the references fitted on every validation normal:

    .venv/bin/python experiments/study_fusion.py --transfer work/experiments/transfer-2711 --directions 'A->B' 'B->A'

Prints per direction the fused choice and the flow alone under the same search, with their test AUROC.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
from reference_checks import studies_of  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from transfer import summarise  # noqa: E402

from ct3dflow.detect.density_map import AnatomyDensityMap  # noqa: E402
from ct3dflow.detect.evaluate import evaluate_volumes  # noqa: E402
from ct3dflow.detect.search import MapCache  # noqa: E402

SIGMAS, TAUS = (1.0, 2.0), (2.0, 3.0, 4.0, 5.0, 6.0)
TAUS_DENSITY, RATIOS = (4.0, 6.0, 8.0, 12.0, 16.0), (1.0, 2.0, 5.0, 10.0, np.inf)


def volumes(kind, studies, sigma: float, refs) -> tuple[np.ndarray, np.ndarray]:
    """``(V_flow[study, τ], V_density[study, τ_density])`` in voxels, each study against its own reference."""
    vf, vd = np.zeros((len(studies), len(TAUS))), np.zeros((len(studies), len(TAUS_DENSITY)))
    for i, (s, ref) in enumerate(zip(studies, refs, strict=True)):
        zf, zd, *_ = (np.nan_to_num(z, nan=0.0) for z in kind.z_maps(s.score, s.permissive, sigma, ref))
        vf[i] = [np.count_nonzero(zf > t) for t in TAUS]
        vd[i] = [np.count_nonzero(zd > t) for t in TAUS_DENSITY]
    return vf, vd


def fused(vf, vd, ratio: float) -> np.ndarray:
    return vf if np.isinf(ratio) else np.maximum(vf, vd / ratio)


def choose(y, by_sigma: dict, ratios) -> tuple[float, tuple]:
    """The best validation AUROC and its (σ, τ, τ_density, ratio); ties go to the flow alone, then higher τs."""
    trials = []
    for sigma, (vf, vd) in by_sigma.items():
        for (j, t), (k, td), r in itertools.product(enumerate(TAUS), enumerate(TAUS_DENSITY), ratios):
            if np.isinf(r) and k > 0:
                continue  # the density's threshold means nothing without it
            auc = roc_auc_score(y, fused(vf[:, j], vd[:, k], r))
            trials.append(((auc, np.isinf(r), t, td), (sigma, j, k, r)))
    key, choice = max(trials, key=lambda trial: trial[0])  # the first of equal keys, in grid order
    return key[0], choice


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transfer", required=True)
    p.add_argument("--directions", nargs="+", default=["A->B", "B->A"])
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    runs = {"A": ROOT / "work" / "experiments" / "det-a", "B": ROOT / "work" / "experiments" / "det-b"}
    kind = AnatomyDensityMap()
    for d in a.directions:
        data = runs[d.split("->")[1]]
        val, test = (studies_of(Path(a.transfer), d, data, s, 50.0, True) for s in ("val", "test"))
        cache = MapCache(kind, val)
        yv = np.array([s.label for s in val])
        on_val, on_test = {}, {}
        for sigma in SIGMAS:
            params = {"sigma_vox": sigma, "density_weight": 1.0, "tau_z": 4.0, "v_min_cm3": 0.0}
            refs, _ = cache.get(params)
            on_val[sigma] = volumes(kind, val, sigma, refs)
            full = cache.full_reference(params)
            on_test[sigma] = volumes(kind, test, sigma, [full] * len(test))
        for label, ratios in (("fused", RATIOS), ("flow alone", (np.inf,))):
            auc, (sigma, j, k, r) = choose(yv, on_val, ratios)
            vf, vd = on_test[sigma]
            # AUROC does not depend on T: the platform's evaluation gives it with its CI and per kind
            te = summarise(evaluate_volumes(test, fused(vf[:, j], vd[:, k], r), 0.0, n_boot=200))
            lo, hi = te["auroc_ci"]
            print(f"| {d} | {label} | σ {sigma:g}, τ {TAUS[j]:g}, τ_density {TAUS_DENSITY[k]:g}, ratio {r:g} | "
                  f"{auc:.3f} | **{te['auroc']:.3f}** ({lo:.2f}–{hi:.2f}) | "
                  + ", ".join(f"{v:.2f}" for v in te["per_kind_auroc"].values()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
