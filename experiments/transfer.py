"""Detection that transfers (issue 16): models trained on one phantom family, screened on the other.

    .venv/bin/python experiments/detection.py --out work/experiments/detection              # family A (model A)
    .venv/bin/python experiments/detection.py --out work/experiments/detection-b --family b # family B (model B)
    .venv/bin/python experiments/transfer.py --a work/experiments/detection --b work/experiments/detection-b

For each direction — A→A, A→B, B→B, B→A (model → the validation and test split of a family's archive) — the
voxel map of every validation and test study is computed once (the core scorer, stride 12), then each
candidate healthy reference is searched on **validation only**:

* ``depth`` — the voxel kind (median, MAD per depth band; the platform's reference before issue 16);
* ``depth-quantile`` — quantile calibration per depth band;
* ``anatomy-mad`` — depth × 3 medial–lateral × 3 cranio-caudal bands, median and MAD;
* ``anatomy-quantile`` — the same bands, quantile-calibrated (the ``anatomy`` map kind);
* ``fraction-mad`` / ``fraction-quantile`` — depth × 3 bands of the local lung fraction (the share of the
  window-sized box around a voxel that is lung: low at thin tips beside the mediastinum and the heart).

The candidate with the best validation objective (AUROC + 1e-3·F1; ties: the simpler, earlier one) is tested
once, with T by best validation F1 and with T for a validation specificity of 0.9; the others are tested
beside it for the record (the choice never sees them). The search cross-fits each reference
(``--reference-folds``, :mod:`ct3dflow.detect.search`): a validation normal is judged by a reference fitted on
the other folds' normals, so a reference that bends to its own normals no longer wins by it; the in-sample
validation AUROC is recorded beside it. The stored reference is fitted on all healthy validation studies of
the family screened (the hospital's own normals), never on test studies. Writes
``<out>/transfer.json`` and ``<out>/transfer.md``, and previews of the test studies each direction gets wrong.

``--adapt-steps N`` (site adaptation): in a crosswise direction the model is first fine-tuned for N steps on the
screened family's healthy *training* studies (a site's own normal archive; never its validation or test studies)
through the platform's trainer (``train_local`` with ``train.init_model``), then scored as above.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ct3dflow.cache import StudyCache  # noqa: E402
from ct3dflow.detect import get_kind  # noqa: E402
from ct3dflow.detect.anatomy_map import AnatomyMap  # noqa: E402
from ct3dflow.detect.batch import ScoringPlan, entries_of_rows, score_locally  # noqa: E402
from ct3dflow.detect.evaluate import evaluate  # noqa: E402
from ct3dflow.detect.outputs import write_json  # noqa: E402
from ct3dflow.detect.row import load_scored_studies, write_outputs_of  # noqa: E402
from ct3dflow.detect.search import DEFAULT_REFERENCE_FOLDS, grid_search, threshold_rule  # noqa: E402
from ct3dflow.detect.voxel_map import DEFAULT_PRECISION, PRECISIONS  # noqa: E402
from ct3dflow.pipeline import manifest_rows  # noqa: E402
from ct3dflow.preprocess import PreprocessConfig  # noqa: E402

CANDIDATES = {
    "depth": get_kind("voxel"),
    "depth-quantile": AnatomyMap(lateral=1, vertical=1, calibration="quantile"),
    "anatomy-mad": AnatomyMap(lateral=3, vertical=3, calibration="mad"),
    "anatomy-quantile": AnatomyMap(lateral=3, vertical=3, calibration="quantile"),
    "fraction-mad": AnatomyMap(lateral=1, vertical=1, calibration="mad", fraction=3),
    "fraction-quantile": AnatomyMap(lateral=1, vertical=1, calibration="quantile", fraction=3),
}
SPACE = {"sigma_vox": [1.0, 2.0], "tau_z": [2.0, 3.0, 4.0, 5.0, 6.0], "v_min_cm3": [0.0, 1.0, 5.0]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def scores_for(model_file: Path, data_run: Path, out: Path, stride: int, threads: int,
               precision: str = DEFAULT_PRECISION, part: str = "top_latent", splits=("val", "test")):
    """Voxel-map results of ``data_run``'s ``splits`` (val and test) with the model in ``model_file`` (resumable);
    ``part``: which local log-likelihood terms are mapped (:mod:`ct3dflow.flow.local`)."""
    import torch

    from ct3dflow.models import load_patch_scorer

    torch.set_num_threads(threads)
    model_run = model_file.parent.parent
    model = load_patch_scorer(model_file)
    rows = manifest_rows(data_run / "archive" / "manifest.parquet")
    res = {}
    for split in splits:
        todo = [r for r in rows if r["split"] == split]
        scoring = {"stride": stride, "part": part, "batch_size": 32, "precision": precision}
        plan = ScoringPlan.make("voxel", scoring, model.patch_size, None,
                                str(model_file), model_run.name, PreprocessConfig().to_dict(),
                                data_run / "cache", out / split)
        t = time.time()
        res[split], _ = score_locally(entries_of_rows(todo), plan, model)
        log(f"  {model_run.name} → {data_run.name} {split}: {len(todo)} studies, {time.time() - t:.0f} s")
    return rows, res


def adapt(model_file: Path, data_run: Path, out: Path, steps: int, lr: float, threads: int, seed: int = 5) -> Path:
    """``model_file`` fine-tuned for ``steps`` updates on ``data_run``'s healthy training studies (resumable);
    the settings are the detection recipe's (batch 16, 24³, the last 20 % at lr/10, fp32)."""
    import torch

    from ct3dflow.models import load_patch_scorer
    from ct3dflow.pipeline import cached_patches
    from ct3dflow.train import MODEL_NAME, TrainConfig, patch_batches_from_arrays, train_local

    if (out / MODEL_NAME).exists():
        return out / MODEL_NAME
    torch.set_num_threads(threads)
    arch = load_patch_scorer(model_file).config()
    cfg = TrainConfig(levels=arch["levels"], steps=arch["steps"], width=arch["width"], patch_size=arch["patch_size"],
                      batch_size=16, iterations=steps, lr=lr, weight_decay=1e-5, warmup_steps=min(50, steps // 10),
                      lr_decay_at=0.8, grad_clip=50.0, min_lung_fraction=0.5, val_every=100, n_val_patches=64,
                      checkpoint_every=0, seed=seed, fast=False, init_model=str(model_file))
    rows = manifest_rows(data_run / "archive" / "manifest.parquet")
    cache = StudyCache(data_run / "cache")
    studies = [cache.load(r["study_id"], mmap=True) for r in rows if r["split"] == "train" and r["label"] == 0]
    batches = patch_batches_from_arrays([s.volume for s in studies], [s.strict for s in studies], cfg, seed=cfg.seed)
    val_ids = [r["study_id"] for r in rows if r["split"] == "val" and r["label"] == 0]
    val = torch.from_numpy(cached_patches(data_run / "cache", val_ids, 64, cfg.patch_size, 0.5, cfg.seed))
    t = time.time()
    log(f"  adapting {model_file} on {len(studies)} healthy training studies of {data_run.name}: {steps} steps, "
        f"lr {lr:g}")
    train_local(cfg, batches, val, out, log_fn=lambda step, m: "val_bits_per_dim" in m and log(
        f"    step {step}: {m['val_bits_per_dim']:.3f} bits/dim on {data_run.name}'s healthy validation patches"))
    log(f"  adapted in {(time.time() - t) / 60:.1f} min")
    return out / MODEL_NAME


def summarise(ev: dict) -> dict:
    m = ev["metrics"]
    return {"auroc": m["auroc"], "auroc_ci": ev["ci"]["auroc"], "f1": m["f1"], "sensitivity": m["sensitivity"],
            "specificity": m["specificity"], "normal_volume_median_cm3": ev["normal_volume_cm3"]["median"],
            "per_kind_auroc": {k: v["auroc"] for k, v in ev["per_kind"].items()},
            "per_kind_sensitivity": {k: v["sensitivity"] for k, v in ev["per_kind"].items()}}


def direction(name: str, model_file: Path, data_run: Path, out: Path, a) -> dict:
    log(f"{name}: model {model_file}, studies of {data_run.name}")
    rows, res = scores_for(model_file, data_run, out / name, a.stride, a.threads, a.precision,
                           splits=("val", "test", *(("train",) if a.score_train else ())))
    if a.score_only:
        return {}
    cache = data_run / "cache"
    voxel = get_kind("voxel")
    val = load_scored_studies(voxel, [r for r in rows if r["split"] == "val"], res["val"], cache)
    test = load_scored_studies(voxel, [r for r in rows if r["split"] == "test"], res["test"], cache)
    record = {"reference_folds": a.reference_folds, "validation": {}, "in_sample_validation": {}, "test": {},
              "operating_points": {}}
    best = None
    for cname, kind in CANDIDATES.items():  # chosen on validation only, cross-fitted
        t = time.time()
        op, trials = grid_search(kind, val, SPACE, folds=a.reference_folds)
        obj = float(trials.iloc[0]["objective"])
        record["validation"][cname] = {**op.validation, "objective": obj, "params": op.params,
                                       "threshold_cm3": op.threshold_cm3}
        ins, _ = grid_search(kind, val, SPACE, folds=1)  # for the record: what the in-sample search believed
        record["in_sample_validation"][cname] = {**ins.validation, "params": ins.params}
        op90, _ = grid_search(kind, val, {k: [op.params[k]] for k in SPACE}, threshold_rule("specificity", 0.9),
                              folds=a.reference_folds)
        record["test"][cname] = {"best F1": summarise(evaluate(kind, op, test, n_boot=2000)),
                                 "specificity 0.9": summarise(evaluate(kind, op90, test, n_boot=2000))}
        record["operating_points"][cname] = op.to_dict()
        v, tt = op.validation, record["test"][cname]["best F1"]
        log(f"  [{cname}] val AUROC {v['auroc']:.3f} cross-fitted ({ins.validation['auroc']:.3f} in-sample), normal "
            f"volume median {v['normal_volume_median_cm3']:.1f} cm³; test AUROC {tt['auroc']:.3f} "
            f"({time.time() - t:.0f} s) — {op.describe()}")
        if best is None or obj > best[0] + 1e-9:
            best = (obj, cname, op)
    _, chosen, op = best
    kind = CANDIDATES[chosen]
    record["chosen"] = chosen
    # previews of what the chosen point gets wrong on test
    c = StudyCache(cache)
    wrong = []
    for s in test:
        st = c.load(s.study_id)
        vol, ab, atyp = kind.decide(s.score, st.permissive, st.spacing, op)
        flagged = vol > op.threshold_cm3
        if flagged != bool(s.label):
            write_outputs_of(f"{s.study_id} {s.pathology or 'normal'}", st, kind, op, atyp, ab, vol, flagged,
                             out / name / "wrong" / s.study_id)
            wrong.append({"study_id": s.study_id, "truth": s.pathology or "normal", "volume_cm3": vol})
    record["wrong"] = wrong
    t1 = record["test"][chosen]["best F1"]
    log(f"  test [{chosen}, chosen]: AUROC {t1['auroc']:.3f} {t1['auroc_ci']}, specificity {t1['specificity']:.3f}, "
        f"normal volume median {t1['normal_volume_median_cm3']:.1f} cm³; per kind {t1['per_kind_auroc']}")
    return record


def markdown(results: dict) -> str:
    lines = ["| direction | reference | val AUROC: cross-fitted (in-sample) | val normals: median volume | "
             "**test AUROC (95 % CI)** | test normals: median volume | specificity at best-F1 T | "
             "at the spec-0.9 T: specificity / sensitivity |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for cname in CANDIDATES:
            v, ins = r["validation"][cname], r["in_sample_validation"][cname]
            t, t90 = r["test"][cname]["best F1"], r["test"][cname]["specificity 0.9"]
            lo, hi = t["auroc_ci"]
            mark = " (chosen)" if cname == r["chosen"] else ""
            lines.append(f"| {name} | {cname}{mark} | {v['auroc']:.3f} ({ins['auroc']:.3f}) | "
                         f"{v['normal_volume_median_cm3']:.1f} cm³ | {t['auroc']:.3f} ({lo:.2f}–{hi:.2f}) | "
                         f"{t['normal_volume_median_cm3']:.1f} cm³ | {t['specificity']:.3f} | "
                         f"{t90['specificity']:.3f} / {t90['sensitivity']:.3f} |")
    lines += ["", "Per kind, the chosen reference (test AUROC / sensitivity at the best-F1 T):", ""]
    for name, r in results.items():
        t = r["test"][r["chosen"]]["best F1"]
        kinds = ", ".join(f"{k} {v:.2f} / {t['per_kind_sensitivity'][k]:.2f}" for k, v in t["per_kind_auroc"].items())
        lines.append(f"- {name} ({r['chosen']}): {kinds}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", default=str(ROOT / "work" / "experiments" / "detection"))
    p.add_argument("--b", default=str(ROOT / "work" / "experiments" / "detection-b"))
    p.add_argument("--out", default=str(ROOT / "work" / "experiments" / "transfer"))
    p.add_argument("--a-model", default=None, help="model file of A (default <a>/model/model.pt; e.g. a snapshot)")
    p.add_argument("--b-model", default=None, help="model file of B (default <b>/model/model.pt)")
    p.add_argument("--stride", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help="scoring.precision of the voxel map (bf16: the coupling networks under bf16 autocast; "
                        "default: the platform's, %(default)s)")
    p.add_argument("--reference-folds", type=int, default=DEFAULT_REFERENCE_FOLDS,
                   help="cross-fitting folds of the healthy reference in the validation search (1: in-sample)")
    p.add_argument("--directions", nargs="+", default=["A->A", "A->B", "B->B", "B->A"])
    p.add_argument("--adapt-steps", type=int, default=0,
                   help="crosswise: first fine-tune the model this many steps on the screened family's healthy "
                        "training studies (0: screen with the model as trained)")
    p.add_argument("--score-only", action="store_true",
                   help="only store the maps (for experiments/reference_checks.py); no reference is searched")
    p.add_argument("--score-train", action="store_true",
                   help="score the target family's healthy training studies too (a site's other healthy studies, for "
                        "reference_checks.py --reference-train)")
    p.add_argument("--adapt-lr", type=float, default=2e-4)
    p.add_argument("--adapt-seed", type=int, default=5, help="the adaptation's batch order")
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    runs = {"A": Path(a.a), "B": Path(a.b)}
    out = Path(a.out)
    t0 = time.time()
    results = {}
    for d in a.directions:
        m, s = d.split("->")
        model_file = Path(getattr(a, f"{m.lower()}_model") or runs[m] / "model" / "model.pt")
        if a.adapt_steps and m != s:
            model_file = adapt(model_file, runs[s], out / f"adapt-{m}-to-{s}" / "model", a.adapt_steps, a.adapt_lr,
                               a.threads, a.adapt_seed)
        results[d] = direction(d, model_file, runs[s], out, a)
        if not a.score_only:  # an earlier full run's record stays as it was
            write_json(results, out / "transfer.json")
    if a.score_only:
        log(f"maps stored in {(time.time() - t0) / 60:.1f} min")
        return 0
    (out / "transfer.md").write_text(markdown(results), encoding="utf-8")
    log(f"done in {(time.time() - t0) / 60:.1f} min\n{markdown(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
