"""Is a likelihood ratio against a low-capacity flow a better voxel map? (issue 16's candidate, validation first)

    .venv/bin/python experiments/detection.py --out work/experiments/ref-a --levels 2 --steps 2 --width 16 \
        --iterations 1500 --stop-after train        # the reference flow, on the same healthy training patches
    .venv/bin/python experiments/likelihood_ratio.py --main work/experiments/det-a/model/model.pt \
        --ref work/experiments/ref-a/model/model.pt --data work/experiments/det-a --out work/experiments/ratio-aa

A flow's log-likelihood is dominated by local statistics (noise, texture, smoothness) that any flow of the
same data learns; Schirrmeister et al. (2020) remove them by subtracting the log-likelihood of a simpler
model, leaving what only the detection model knows. Per voxel that is ``log p_main − log p_ref`` of the full
local decomposition (:func:`ct3dflow.flow.local.local_log_prob`, ``part="all"``), merged over the same
windows as the platform's voxel map.

Maps compared, each searched on validation with the cross-fitted search of every kind (depth-banded and
anatomy-banded MAD references), then tested once at its validation point:

* ``top_latent`` — the platform's voxel map (the coarsest latent's energy), read from ``--top-latent``;
* ``all`` — the main flow's full per-voxel log-likelihood (the control: what the ratio starts from);
* ``ratio`` — ``all`` of the main flow minus ``all`` of the reference flow.

Test labels are read only in the test stage. Writes ``<out>/ratio.json`` and ``<out>/ratio.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transfer import CANDIDATES, SPACE, scores_for, summarise  # noqa: E402 - the crosswise experiment's

from ct3dflow.detect import get_kind  # noqa: E402
from ct3dflow.detect.evaluate import evaluate  # noqa: E402
from ct3dflow.detect.outputs import write_json  # noqa: E402
from ct3dflow.detect.row import load_scored_studies  # noqa: E402
from ct3dflow.detect.search import DEFAULT_REFERENCE_FOLDS, grid_search  # noqa: E402
from ct3dflow.pipeline import manifest_rows  # noqa: E402

REFERENCES = {k: CANDIDATES[k] for k in ("depth", "anatomy-mad")}  # the depth bands and the platform default


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ratio_studies(main, ref):
    """The studies of ``main`` with their map replaced by ``main − ref`` (the same study order)."""
    by_id = {s.study_id: s for s in ref}
    out = []
    for s in main:
        r = by_id[s.study_id]
        v = s.score.voxel_map - r.score.voxel_map  # NaN where either is NaN
        out.append(dataclasses.replace(s, score=dataclasses.replace(s.score, voxel_map=v.astype(np.float32))))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--main", required=True, help="the detection model (model.pt)")
    p.add_argument("--ref", required=True, help="the low-capacity reference flow (model.pt)")
    p.add_argument("--data", required=True, help="an experiment run whose archive/ and cache/ are screened")
    p.add_argument("--top-latent", default=None,
                   help="its stored voxel-map results (default <data>/voxel-stride12), the platform map's row")
    p.add_argument("--out", required=True)
    p.add_argument("--stride", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reference-folds", type=int, default=DEFAULT_REFERENCE_FOLDS)
    p.add_argument("--test", action="store_true", help="test each map once at its best validation point")
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    data, out = Path(a.data), Path(a.out)
    rows = manifest_rows(data / "archive" / "manifest.parquet")
    voxel = get_kind("voxel")
    t0 = time.time()
    _, res_main = scores_for(Path(a.main), data, out / "main-all", a.stride, a.threads, part="all")
    _, res_ref = scores_for(Path(a.ref), data, out / "ref-all", a.stride, a.threads, part="all")
    top = Path(a.top_latent) if a.top_latent else data / f"voxel-stride{a.stride}"
    splits = {}
    for split in ("val", "test"):
        srows = [r for r in rows if r["split"] == split]
        m = load_scored_studies(voxel, srows, res_main[split], data / "cache")
        r = load_scored_studies(voxel, srows, res_ref[split], data / "cache")
        maps = {"all": m, "ratio": ratio_studies(m, r)}
        if (top / split / "results.parquet").exists():
            maps = {"top_latent": load_scored_studies(voxel, srows, pd.read_parquet(top / split / "results.parquet"),
                                                      data / "cache"), **maps}
        splits[split] = maps
    record = {"main": a.main, "ref": a.ref, "data": a.data, "reference_folds": a.reference_folds, "rows": []}
    for mname in splits["val"]:
        for rname, kind in REFERENCES.items():
            t = time.time()
            op, trials = grid_search(kind, splits["val"][mname], SPACE, folds=a.reference_folds)
            row = {"map": mname, "reference": rname, "val_auroc": op.validation["auroc"],
                   "objective": float(trials.iloc[0]["objective"]), "params": op.params,
                   "threshold_cm3": op.threshold_cm3,
                   "val_normal_volume_median_cm3": op.validation.get("normal_volume_median_cm3")}
            if a.test and mname in splits["test"]:
                row["test"] = summarise(evaluate(kind, op, splits["test"][mname], n_boot=2000))
            record["rows"].append(row)
            tt = row.get("test", {})
            log(f"[{mname} / {rname}] val AUROC {row['val_auroc']:.3f} (cross-fitted) — {op.describe()}"
                + (f"; test AUROC {tt['auroc']:.3f} {tt['auroc_ci']}, specificity {tt['specificity']:.3f}, normals "
                   f"{tt['normal_volume_median_cm3']:.1f} cm³" if tt else "") + f" ({time.time() - t:.0f} s)")
            write_json(record, out / "ratio.json")
    lines = ["| map | reference | val AUROC (cross-fitted) | chosen σ, τ, v_min, T | test AUROC (95 % CI) | "
             "test specificity | test normals: median cm³ | per kind (test AUROC) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        p_ = row["params"]
        pt = f"{p_['sigma_vox']:g}, {p_['tau_z']:g}, {p_['v_min_cm3']:g}, {row['threshold_cm3']:.2f}"
        t = row.get("test")
        tcols = (f"{t['auroc']:.3f} ({t['auroc_ci'][0]:.2f}–{t['auroc_ci'][1]:.2f}) | {t['specificity']:.3f} | "
                 f"{t['normal_volume_median_cm3']:.1f} | "
                 + ", ".join(f"{k} {v:.2f}" for k, v in sorted(t["per_kind_auroc"].items()))) if t else "— | — | — | —"
        lines.append(f"| {row['map']} | {row['reference']} | {row['val_auroc']:.3f} | {pt} | {tcols} |")
    (out / "ratio.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    log(f"done in {(time.time() - t0) / 60:.1f} min\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
