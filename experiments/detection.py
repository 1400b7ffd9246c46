"""Patient-level detection on synthetic phantoms, end to end on one CPU machine (issue 3).

    .venv/bin/python experiments/detection.py --out work/experiments/detection-cpu-k8w64

(everything, ≈ 35 min on 2 idle cores: 14 min of training, 12 min of voxel maps, 6 min of the paper's
map, the rest tuning and outputs; see docs/RESULTS.md. ``--device cuda`` trains and scores on a GPU,
``experiments/device_run.sh`` is the lent-GPU run.)

Stages (each is skipped when its output already exists, unless --force STAGE):

1. archive    — healthy phantoms for train; held-out healthy + abnormal (every pathology kind) for val/test
2. preprocess — the study cache (2 mm grid, strict and permissive lung masks)
3. train      — a small 3D GLOW on healthy training patches, under a wall-clock budget (prints the time)
4. score      — patch log-likelihoods on the inference grid of every val and test study
5. tune       — σ, τ, v_min, T (and the patch statistic) on the validation split only
6. test       — patient-level AUROC / F1 / accuracy with stratified-bootstrap 95 % CIs, overall and per kind;
                Log P maps (NIfTI) and previews (PNG) for the test studies
7. analysis   — patch log-likelihoods of windows that overlap the lesion vs healthy windows, per kind
8. voxel      — the same model through the voxel-level map of ct3dflow.voxel_map (not in the paper): score,
                tune on validation, test once, lesion-voxel analysis; outputs under OUT/voxel/

The patch statistic (``--statistics``; the one with the best *validation* AUROC is used on test):

* ``raw``   — the patch log-likelihood ℓ_p, as in the paper.
* ``resid`` — ℓ_p minus its expected value for a healthy window with the same permissive-lung fraction
  and body fraction (share of the window that is not outside air) — a quadratic least-squares fit on the
  windows of the healthy *validation* studies. ℓ_p of a window is dominated by how much outside air,
  chest wall and mediastinum it holds (correlation 0.97 with the body fraction on healthy validation
  windows); this removes that anatomy-driven variation, which otherwise swamps lesions.
* ``typ``   — −|resid|: a typicality test (Nalisnick et al. 2019): a window is atypical when its
  likelihood is unusually *low or high*. Flows give smooth, low-texture inputs a high likelihood, and
  emphysema or consolidation are smoother than lung parenchyma.

No test label is looked at before stage 6; test labels are used only for the final metrics and analysis.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ct3dflow.cache import StudyCache  # noqa: E402
from ct3dflow.evaluation import TuningStudy, abnormal_volumes, write_json  # noqa: E402
from ct3dflow.metrics import bootstrap_ci, patient_metrics, roc_curve_data  # noqa: E402
from ct3dflow.patches import box_sums, integral_image, pad_to_patch  # noqa: E402
from ct3dflow.phantoms import PATHOLOGIES, make_archive, make_phantom  # noqa: E402
from ct3dflow.pipeline import cached_patches, manifest_rows  # noqa: E402
from ct3dflow.scoring import (  # noqa: E402
    OperatingPoint,
    PatchScores,
    decide_from_patch_scores,
    write_log_p_map_nifti,
    write_preview_png,
)

STAGES = ("archive", "preprocess", "train", "score", "tune", "test", "analysis", "voxel")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- archive
def stage_archive(a, out: Path) -> Path:
    """Two make_archive calls: healthy (train/val/test) and abnormal (val/test), one manifest."""
    arch = out / "archive"
    manifest = arch / "manifest.parquet"
    if manifest.exists() and "archive" not in a.force:
        return manifest
    n_norm = a.train_normal + a.val_normal + a.test_normal
    healthy = make_archive(arch, n_norm, 0, seed=a.seed, size=a.size,
                           splits=(a.train_normal, a.val_normal, a.test_normal))
    sick = make_archive(arch, 0, a.val_abnormal + a.test_abnormal, seed=a.seed + 1, size=a.size,
                        splits=(0, a.val_abnormal, a.test_abnormal))
    df = pd.concat([healthy, sick], ignore_index=True)
    df["pathology"] = df["pathology"].astype(object).where(df["pathology"].notna(), None)
    df.to_parquet(manifest, index=False)
    log(f"archive: {len(df)} studies\n" + df.groupby(["split", "label", "pathology"], dropna=False)
        .size().rename("studies").to_string())
    return manifest


# ---------------------------------------------------------------------------------------- preprocess
def stage_preprocess(a, manifest: Path, cache: Path) -> None:
    if (cache / "summary.parquet").exists() and "preprocess" not in a.force:
        return
    from ct3dflow.cli import preprocess_local

    t = time.time()
    s = preprocess_local(manifest, cache)
    n_err = int((s["status"] != "ok").sum())
    log(f"preprocess: {len(s)} studies, {n_err} errors, {time.time() - t:.0f} s")
    if n_err:
        print(s[s["status"] != "ok"][["study_id", "error"]].to_string(index=False))


# --------------------------------------------------------------------------------------------- train
def stage_train(a, rows, cache: Path, mdir: Path) -> Path:
    import torch

    from ct3dflow.train import FlowTrainer, TrainConfig, patch_batches_from_arrays

    model_path = mdir / "model.pt"
    if model_path.exists() and "train" not in a.force:
        return model_path
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = TrainConfig(levels=a.levels, steps=a.steps, width=a.width, patch_size=a.patch_size,
                      batch_size=a.batch_size, iterations=a.max_iterations, lr=a.lr, weight_decay=1e-5,
                      warmup_steps=a.warmup, grad_clip=50.0, min_lung_fraction=0.5, seed=a.seed,
                      fast=False)  # eager layers on every device: the experiment measures the method, not speed
    c = StudyCache(cache)
    train_ids = [r["study_id"] for r in rows if r["split"] == "train" and r["label"] == 0]
    val_ids = [r["study_id"] for r in rows if r["split"] == "val" and r["label"] == 0]
    studies = [c.load(s, mmap=True) for s in train_ids]
    batches = patch_batches_from_arrays([s.volume for s in studies], [s.strict for s in studies], cfg,
                                        seed=a.seed)
    val = torch.from_numpy(cached_patches(cache, val_ids, a.n_val_patches, a.patch_size, 0.5, a.seed + 1))
    model = cfg.build_model().to(a.device)
    trainer = FlowTrainer(model, cfg, a.device)
    t0 = time.time()
    trainer.initialise(torch.cat([next(batches) for _ in range(4)]))
    hist = [{"step": 0, "wall_s": 0.0, "train_bpd": float("nan"), "val_bpd": trainer.validate(val)}]
    log(f"train: {len(train_ids)} healthy studies, L={a.levels} K={a.steps} width={a.width} "
        f"{a.patch_size}^3 batch {a.batch_size}, {model.num_parameters():,} parameters, "
        f"budget {a.train_minutes:g} min; held-out healthy val {hist[0]['val_bpd']:.3f} bits/dim after "
        f"ActNorm init")
    budget = 60.0 * a.train_minutes
    run = []
    decayed = False
    while trainer.step < cfg.iterations:
        el = time.time() - t0
        if el > budget:
            break
        if not decayed and el > a.decay_at * budget:  # last part of the budget at lr/10
            trainer.cfg = dataclasses.replace(trainer.cfg, lr=a.lr / 10)
            decayed = True
        m = trainer.train_step(next(batches))
        run.append(m["bits_per_dim"])
        if trainer.step % a.val_every == 0 and not m["skipped"]:
            v = trainer.validate(val)
            hist.append({"step": trainer.step, "wall_s": time.time() - t0,
                         "train_bpd": float(np.mean(run[-a.val_every:])), "val_bpd": v})
            log(f"  step {trainer.step}: train {hist[-1]['train_bpd']:.3f}, val {v:.3f} bits/dim "
                f"({hist[-1]['wall_s']:.0f} s)")
    v = trainer.validate(val)
    wall = time.time() - t0
    hist.append({"step": trainer.step, "wall_s": wall, "train_bpd": float(np.mean(run[-a.val_every:])),
                 "val_bpd": v})
    mdir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(hist).to_csv(mdir / "train_log.csv", index=False)
    trainer.glow.eval()
    trainer.glow.save(model_path)
    info = {"wall_s": wall, "steps": trainer.step, "skipped": trainer.skipped_steps,
            "val_bpd_init": hist[0]["val_bpd"], "val_bpd_final": v, "parameters": model.num_parameters(),
            "config": cfg.to_dict(), "threads": a.threads}
    write_json(info, mdir / "train_info.json")
    log(f"train: wall time {wall / 60:.1f} min, {trainer.step} steps ({trainer.skipped_steps} skipped); "
        f"held-out healthy {hist[0]['val_bpd']:.3f} → {v:.3f} bits/dim")
    return model_path


# --------------------------------------------------------------------------------------------- score
def stage_score(a, rows, cache: Path, model_path: Path, sdir: Path) -> pd.DataFrame:
    import torch

    from ct3dflow.evaluation import score_row
    from ct3dflow.models import load_patch_scorer

    res_path = sdir / "results.parquet"
    if res_path.exists() and "score" not in a.force:
        return pd.read_parquet(res_path)
    torch.set_num_threads(a.threads)
    model = load_patch_scorer(model_path).to(a.device).eval()
    size = model.config()["patch_size"]
    scoring = {"patch_size": size, "stride": a.stride, "batch_size": 32}
    t = time.time()
    todo = [r for r in rows if r["split"] in ("val", "test")]
    res = []
    for i, r in enumerate(todo):
        done = sdir / r["study_id"] / "patch_scores.npz"
        if done.exists() and "score" not in a.force:  # resume an interrupted scoring run
            ps = PatchScores.load(done)
            res.append({"study_id": r["study_id"], "path": r["path"], "status": "ok", "error": "",
                        "model": str(model_path), "n_patches": len(ps), "log_p_min": float(ps.log_p.min()),
                        "log_p_mean": float(ps.log_p.mean()), "patch_scores_path": str(done)})
            continue
        res.append(score_row(model, r, cache, sdir, scoring, None, model_uri=str(model_path),
                             device=a.device))
        if (i + 1) % 10 == 0:
            log(f"  scored {i + 1}/{len(todo)} ({time.time() - t:.0f} s)")
    df = pd.DataFrame(res)
    df.to_parquet(res_path, index=False)
    log(f"score: {len(df)} studies, {int((df.status == 'ok').sum())} ok, {df.n_patches.mean():.0f} windows "
        f"each, stride {a.stride}, {time.time() - t:.0f} s")
    return df


# --------------------------------------------------------------------------------- patch statistics
def window_fraction(mask: np.ndarray, ps: PatchScores) -> np.ndarray:
    """Fraction of each scored window inside ``mask`` (windows in the padded frame, as scored)."""
    m, before = pad_to_patch(np.asarray(mask) != 0, ps.size, value=0)
    corners = ps.corners + np.asarray(before, dtype=np.int64)
    return box_sums(integral_image(m), corners, ps.size) / float(ps.size**3)


@dataclasses.dataclass
class Loaded:
    row: dict
    scores: PatchScores
    perm_frac: np.ndarray
    permissive: np.ndarray
    spacing: tuple
    body_frac: np.ndarray | None = None


def load_scored(rows, results: pd.DataFrame, cache: Path, split: str) -> list[Loaded]:
    ok = results[results.status == "ok"].set_index("study_id")
    c = StudyCache(cache)
    out = []
    for r in rows:
        if r["split"] != split or r["study_id"] not in ok.index:
            continue
        s = c.load(r["study_id"], mmap=True)
        ps = PatchScores.load(ok.loc[r["study_id"], "patch_scores_path"])
        out.append(Loaded(r, ps, window_fraction(s.permissive, ps), np.asarray(s.permissive),
                          tuple(s.spacing), window_fraction(body_mask(s.volume), ps)))
    return out


def body_mask(volume: np.ndarray) -> np.ndarray:
    """Everything but the outside air (air below −500 HU connected to the in-plane border): anatomy only,
    a lesion inside the lung does not change it."""
    from ct3dflow.lungs import outside_air

    hu = (np.asarray(volume, dtype=np.float32) + 0.5) * 1220.0 - 1020.0
    return ~outside_air(hu, -500.0)


def design(perm: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Quadratic design matrix in the window's permissive-lung fraction and body fraction."""
    return np.c_[np.ones(len(perm)), perm, perm**2, body, body**2, perm * body]


def fit_healthy_trend(val: list[Loaded]) -> np.ndarray:
    """Least squares ℓ ≈ f(permissive fraction, body fraction) on the windows of healthy validation
    studies (how likely a *healthy* window is, given how much lung and how much outside air it holds)."""
    X = np.concatenate([design(v.perm_frac, v.body_frac) for v in val if v.row["label"] == 0])
    y = np.concatenate([v.scores.log_p for v in val if v.row["label"] == 0])
    ok = np.isfinite(y)
    return np.linalg.lstsq(X[ok], y[ok], rcond=None)[0]


def transform(stat: str, ld: Loaded, coef) -> PatchScores:
    lp = ld.scores.log_p
    if stat == "raw":
        v = lp
    elif stat == "resid":
        v = lp - design(ld.perm_frac, ld.body_frac) @ coef
    elif stat == "typ":
        v = -np.abs(lp - design(ld.perm_frac, ld.body_frac) @ coef)
    else:
        raise ValueError(stat)
    return dataclasses.replace(ld.scores, log_p=np.asarray(v, dtype=np.float64))


def tuning_studies(loaded: list[Loaded], stat: str, coef) -> list[TuningStudy]:
    return [TuningStudy(ld.row["study_id"], int(ld.row["label"]), ld.row.get("pathology"), ld.permissive,
                        ld.spacing, transform(stat, ld, coef)) for ld in loaded]


# ---------------------------------------------------------------------------------------------- tune
def fast_grid_search(studies: list[TuningStudy], space: dict) -> tuple[OperatingPoint, pd.DataFrame]:
    """Same trials, objective and T rule as :func:`ct3dflow.evaluation.grid_search`, but each study's Log P
    map is computed once per σ (it does not depend on τ or v_min) instead of once per trial."""
    from ct3dflow.evaluation import healthy_stats
    from ct3dflow.scoring import abnormal_volume, log_p_map

    healthy = healthy_stats(studies)
    y = np.array([s.label for s in studies])
    trials = []
    for sigma in space["sigma_vox"]:
        maps = [log_p_map(s.permissive.shape, s.scores.centres, s.scores.log_p, sigma, mask=s.permissive)
                for s in studies]
        for tau in space["tau_z"]:
            tau_abs = healthy[0] + tau * healthy[1]
            for vmin in space["v_min_cm3"]:
                vols = np.array([abnormal_volume(m, s.permissive, tau_abs, vmin, s.spacing)[0]
                                 for m, s in zip(maps, studies, strict=True)])
                trials.append({"sigma_vox": sigma, "tau_z": tau, "v_min_cm3": vmin,
                               **_trial(y, vols, sigma, tau, vmin, healthy)})
    df = pd.DataFrame(trials).sort_values("objective", ascending=False, kind="stable")
    return OperatingPoint.from_dict(df.iloc[0]["operating_point"]), df


def _trial(y, vols, sigma, tau, vmin, healthy) -> dict:
    """ct3dflow.evaluation.evaluate_params from precomputed volumes."""
    from ct3dflow.metrics import choose_threshold

    t = float(np.clip(choose_threshold(y, vols, criterion="f1"), 0.0, np.inf))  # as evaluate_params
    m = patient_metrics(y, vols, t)
    auroc = 0.5 if not np.isfinite(m["auroc"]) else float(m["auroc"])
    return {"auroc": auroc, "f1": float(m["f1"]), "accuracy": float(m["accuracy"]), "threshold_cm3": t,
            "objective": auroc + 1e-3 * float(m["f1"]),
            "operating_point": OperatingPoint(sigma, tau, vmin, t, *healthy).to_dict()}


def stage_tune(a, val: list[Loaded], tdir: Path):
    space = {"sigma_vox": a.sigma, "tau_z": a.tau, "v_min_cm3": a.v_min}
    coef = fit_healthy_trend(val)
    best = None
    all_trials = []
    for stat in a.statistics:
        op, trials = fast_grid_search(tuning_studies(val, stat, coef), space)
        trials.insert(0, "statistic", stat)
        all_trials.append(trials)
        b = trials.iloc[0]
        log(f"tune [{stat:5s}]: {len(trials)} trials on {len(val)} val studies; best val AUROC "
            f"{b['auroc']:.3f} F1 {b['f1']:.3f} at σ={op.sigma_vox:g} τ_z={op.tau_z:g} "
            f"v_min={op.v_min_cm3:g} T={op.threshold_cm3:.2f} cm³")
        if best is None or b["objective"] > best[2] + 1e-9:
            best = (stat, op, float(b["objective"]))
    stat, op, _ = best
    tdir.mkdir(parents=True, exist_ok=True)
    pd.concat(all_trials).drop(columns=["operating_point"]).to_csv(tdir / "trials.csv", index=False)
    write_json({"statistic": stat, "trend_coef": list(map(float, coef)), **op.to_dict()},
               tdir / "operating_point.json")
    log(f"tune: chosen statistic {stat!r} (validation only): {json.dumps(op.to_dict())}")
    return stat, op, coef


# ---------------------------------------------------------------------------------------------- test
def kind_metrics(y, vols, kinds, kind, t):
    sel = (y == 0) | (kinds == kind)
    m = patient_metrics(y[sel], vols[sel], t)
    ci = bootstrap_ci(y[sel], vols[sel], t, n_boot=1000, seed=1)
    return m, ci


def fmt_ci(m, ci, k):
    v = m[k]
    if not np.isfinite(v):
        return "—"
    lo, hi = ci.get(k, (float("nan"), float("nan")))
    return f"{v:.3f} ({lo:.2f}–{hi:.2f})"


def stage_test(a, test: list[Loaded], stat, op: OperatingPoint, coef, cache: Path, odir: Path) -> dict:
    studies = tuning_studies(test, stat, coef)
    y = np.array([s.label for s in studies])
    kinds = np.array([s.pathology or "normal" for s in studies])
    vols = abnormal_volumes(studies, op.sigma_vox, op.tau_abs, op.v_min_cm3)
    t = op.threshold_cm3
    m = patient_metrics(y, vols, t)
    ci = bootstrap_ci(y, vols, t, n_boot=2000, seed=0)
    rows = [{"subset": "all", "n_abnormal": int(y.sum()), "n_normal": int((y == 0).sum()),
             **{k: m[k] for k in ("auroc", "f1", "accuracy", "sensitivity", "specificity")},
             "ci": {k: list(v) for k, v in ci.items()}}]
    lines = ["| test subset | abnormal / normal | AUROC (95 % CI) | F1 (95 % CI) | accuracy (95 % CI) | "
             "sensitivity | specificity |", "|---|---|---|---|---|---|---|",
             f"| all kinds | {int(y.sum())} / {int((y == 0).sum())} | {fmt_ci(m, ci, 'auroc')} | "
             f"{fmt_ci(m, ci, 'f1')} | {fmt_ci(m, ci, 'accuracy')} | {m['sensitivity']:.3f} | "
             f"{m['specificity']:.3f} |"]
    for kind in PATHOLOGIES:
        if not (kinds == kind).any():
            continue
        km, kci = kind_metrics(y, vols, kinds, kind, t)
        rows.append({"subset": kind, "n_abnormal": int((kinds == kind).sum()), "n_normal": int((y == 0).sum()),
                     **{k: km[k] for k in ("auroc", "f1", "accuracy", "sensitivity", "specificity")},
                     "ci": {k: list(v) for k, v in kci.items()}})
        lines.append(f"| {kind} vs normal | {int((kinds == kind).sum())} / {int((y == 0).sum())} | "
                     f"{fmt_ci(km, kci, 'auroc')} | {fmt_ci(km, kci, 'f1')} | {fmt_ci(km, kci, 'accuracy')} | "
                     f"{km['sensitivity']:.3f} | {km['specificity']:.3f} |")
    table = "\n".join(lines)
    per_study = pd.DataFrame({"study_id": [s.study_id for s in studies], "label": y, "pathology": kinds,
                              "lesion_volume_cm3": [ld.row.get("lesion_volume_cm3") for ld in test],
                              "abnormal_volume_cm3": vols, "predicted_abnormal": vols > t})
    odir.mkdir(parents=True, exist_ok=True)
    per_study.to_csv(odir / "test_studies.csv", index=False)
    # maps and previews from the stored patch scores (the model is not run again)
    c = StudyCache(cache)
    for s in studies:
        st = c.load(s.study_id)
        vol_cm3, ab, lpm = decide_from_patch_scores(s.scores, st.volume.shape, st.permissive, st.spacing, op)
        d = odir / "maps" / s.study_id
        fill = float(np.nanmin(lpm)) if np.isfinite(lpm).any() else 0.0
        write_log_p_map_nifti(lpm, (st.spacing, st.origin, st.direction), d / "log_p_map.nii.gz",
                              fill_value=fill)
        tag = f"{s.pathology or 'normal'}: {vol_cm3:.1f} cm3 {'ABNORMAL' if vol_cm3 > t else 'normal'}"
        write_preview_png(st.volume, lpm, ab, d / "preview.png", title=f"{s.study_id} {tag}",
                          tau_abs=op.tau_abs)
    ev = {"statistic": stat, "operating_point": op.to_dict(), "metrics": m, "rows": rows,
          "roc": roc_curve_data(y, vols), "table": table}
    write_json(ev, odir / "evaluation.json")
    log("test:\n" + table)
    print(per_study.sort_values(["pathology", "abnormal_volume_cm3"]).to_string(index=False))
    return ev


# ------------------------------------------------------------------------------------------ analysis
def lesion_on_grid(row: dict, study) -> np.ndarray:
    """The phantom's lesion mask (regenerated from its seed) on the study's 2 mm grid."""
    import SimpleITK as sitk

    ph = make_phantom(int(row["seed"]), row["pathology"], size=row.get("_size"))
    img = ph.to_image(ph.lesion_mask.astype(np.float32))
    res = sitk.Resample(img, study.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(res) >= 0.5


def stage_analysis(a, test: list[Loaded], val: list[Loaded], stat, op, coef, cache: Path, odir: Path) -> str:
    """Per kind: z-scores (healthy reference of the validation split) of windows holding ≥ 5 % lesion,
    against all windows of the healthy test studies, for the raw ℓ and the chosen statistic."""
    from sklearn.metrics import roc_auc_score

    c = StudyCache(cache)
    ref = {}
    for s in ("raw", "resid"):
        v = np.concatenate([transform(s, ld, coef).log_p for ld in val if ld.row["label"] == 0])
        ref[s] = (v.mean(), v.std(ddof=1))
    healthy = {s: np.concatenate([(transform(s, ld, coef).log_p - ref[s][0]) / ref[s][1]
                                  for ld in test if ld.row["label"] == 0]) for s in ref}
    recs = []
    for ld in test:
        if ld.row["label"] != 1:
            continue
        st = c.load(ld.row["study_id"])
        les = lesion_on_grid({**ld.row, "_size": a.size}, st)
        frac = window_fraction(les, ld.scores)
        sel = frac >= 0.02
        hu = (np.asarray(st.volume)[les] + 0.5) * 1220 - 1020
        for s in ref:
            z = (transform(s, ld, coef).log_p - ref[s][0]) / ref[s][1]
            recs.append({"kind": ld.row["pathology"], "study_id": ld.row["study_id"], "stat": s,
                         "lesion_cm3": float(les.sum() * 0.008),
                         "lesion_hu": float(np.median(hu)) if hu.size else np.nan,
                         "n_lesion_windows": int(sel.sum()), "z_lesion": z[sel].tolist(),
                         "max_frac": float(frac.max())})
    df = pd.DataFrame(recs)
    lines = ["| kind | lesion windows (≥ 2 % lesion) | median lesion HU | raw ℓ: median z of lesion windows | "
             "raw ℓ: window AUROC (low = abnormal) | resid: median z | resid: window AUROC | "
             "resid: share of lesion windows with z > +2 |", "|---|---|---|---|---|---|---|---|"]
    for kind in PATHOLOGIES:
        k = df[df.kind == kind]
        if k.empty:
            continue
        cells = [kind, str(int(k[k.stat == "raw"].n_lesion_windows.sum())),
                 f"{np.nanmedian(k[k.stat == 'raw'].lesion_hu):.0f}"]
        for s in ("raw", "resid"):
            z = np.concatenate([np.asarray(v, float) for v in k[k.stat == s].z_lesion]) if len(k) else np.zeros(0)
            if z.size == 0:
                cells += ["—", "—"]
                continue
            yy = np.r_[np.ones(z.size), np.zeros(healthy[s].size)]
            auc = roc_auc_score(yy, -np.r_[z, healthy[s]])
            cells += [f"{np.median(z):+.2f}", f"{auc:.3f}"]
            if s == "resid":
                cells.append(f"{np.mean(z > 2):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    hz = healthy["resid"]
    note = (f"healthy test windows (resid): median z {np.median(hz):+.2f}, share z < −2: {np.mean(hz < -2):.3f}, "
            f"share z > +2: {np.mean(hz > 2):.3f}")
    table = "\n".join(lines) + "\n\n" + note
    df.to_json(odir / "window_analysis.json", orient="records")
    (odir / "window_analysis.md").write_text(table + "\n", encoding="utf-8")
    log("analysis (windows overlapping the lesion vs windows of healthy test studies):\n" + table)
    return table


# ------------------------------------------------------------------------------------- voxel map
def stage_voxel(a, rows, cache: Path, model_path: Path, vdir: Path) -> dict:
    """The voxel-level map of :mod:`ct3dflow.voxel_map` with the same model and the same protocol: local
    log-likelihood terms per voxel (score), σ / τ / v_min / T on validation only (tune), then the test split
    once (test) and the lesion-voxel analysis. Outputs under ``vdir``."""
    import torch
    from sklearn.metrics import roc_auc_score

    from ct3dflow.flow import Glow3D
    from ct3dflow.voxel_map import voxel_grid_search, voxel_log_p_volume

    torch.set_num_threads(a.threads)
    glow = Glow3D.load(model_path).to(a.device).eval()
    c = StudyCache(cache)
    todo = [r for r in rows if r["split"] in ("val", "test")]
    stride = a.voxel_stride or a.stride
    mdir = vdir / f"maps-{a.voxel_part}-stride{stride}"
    mdir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    for r in todo:
        f = mdir / f"{r['study_id']}.npy"
        if not f.exists() or "voxel" in a.force:
            s = c.load(r["study_id"], mmap=True)
            np.save(f, voxel_log_p_volume(glow, s.volume, s.permissive, glow.patch_size, stride,
                                          part=a.voxel_part, device=a.device))
    log(f"voxel score: {len(todo)} studies, part {a.voxel_part!r}, stride {stride}, {time.time() - t:.0f} s")

    def load(split):
        out = []
        for r in todo:
            if r["split"] == split:
                s = c.load(r["study_id"], mmap=True)
                out.append({"row": r, "map": np.load(mdir / f"{r['study_id']}.npy"),
                            "perm": np.asarray(s.permissive) != 0, "spacing": tuple(s.spacing)})
        return out

    # tune: validation only
    val = load("val")
    space = {"sigma_vox": a.voxel_sigma, "tau_z": a.voxel_tau, "v_min_cm3": a.v_min}
    op, trials = voxel_grid_search([d["map"] for d in val], [d["perm"] for d in val], [d["spacing"] for d in val],
                                   [d["row"]["label"] for d in val], space, a.voxel_part, stride)
    trials.to_csv(vdir / "trials.csv", index=False)
    write_json(op.to_dict(), vdir / "operating_point.json")
    best = trials.iloc[0]
    sigma, tau, vmin, thr = op.sigma_vox, op.tau_z, op.v_min_cm3, op.threshold_cm3
    log(f"voxel tune: {len(trials)} trials on {len(val)} val studies; best val AUROC {best['auroc']:.3f} "
        f"F1 {best['f1']:.3f} at σ={sigma:g} τ={tau:g} v_min={vmin:g} T={thr:.2f} cm³")

    # test: once
    test = load("test")
    yt = np.array([d["row"]["label"] for d in test])
    kinds = np.array([d["row"].get("pathology") or "normal" for d in test])
    decided = [op.abnormal(d["map"], d["perm"], d["spacing"]) for d in test]  # (volume, mask, z) once each
    vols = np.array([v for v, _, _ in decided])
    m = patient_metrics(yt, vols, thr)
    ci = bootstrap_ci(yt, vols, thr, n_boot=2000, seed=0)
    lines = ["| test subset | abnormal / normal | AUROC (95 % CI) | F1 (95 % CI) | accuracy (95 % CI) | "
             "sensitivity | specificity |", "|---|---|---|---|---|---|---|",
             f"| all kinds | {int(yt.sum())} / {int((yt == 0).sum())} | {fmt_ci(m, ci, 'auroc')} | "
             f"{fmt_ci(m, ci, 'f1')} | {fmt_ci(m, ci, 'accuracy')} | {m['sensitivity']:.3f} | "
             f"{m['specificity']:.3f} |"]
    rows_out = [{"subset": "all", **{k: m[k] for k in ("auroc", "f1", "accuracy", "sensitivity", "specificity")},
                 "ci": {k: list(v) for k, v in ci.items()}}]
    for kind in PATHOLOGIES:
        if not (kinds == kind).any():
            continue
        km, kci = kind_metrics(yt, vols, kinds, kind, thr)
        rows_out.append({"subset": kind, **{k: km[k] for k in ("auroc", "f1", "accuracy", "sensitivity",
                                                                "specificity")},
                         "ci": {k: list(v) for k, v in kci.items()}})
        lines.append(f"| {kind} vs normal | {int((kinds == kind).sum())} / {int((yt == 0).sum())} | "
                     f"{fmt_ci(km, kci, 'auroc')} | {fmt_ci(km, kci, 'f1')} | {fmt_ci(km, kci, 'accuracy')} | "
                     f"{km['sensitivity']:.3f} | {km['specificity']:.3f} |")
    table = "\n".join(lines)
    odir = vdir / "test"
    odir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"study_id": [d["row"]["study_id"] for d in test], "label": yt, "pathology": kinds,
                  "lesion_volume_cm3": [d["row"].get("lesion_volume_cm3") for d in test],
                  "abnormal_volume_cm3": vols, "predicted_abnormal": vols > thr}).to_csv(
        odir / "test_studies.csv", index=False)
    # maps (z, NIfTI) and previews; voxel-level analysis of lesion voxels vs healthy test lung voxels
    healthy_z, lesion_z = [], {}
    for d, (vol_cm3, ab, z) in zip(test, decided, strict=True):
        r = d["row"]
        st = c.load(r["study_id"])
        sd = odir / "maps" / r["study_id"]
        write_log_p_map_nifti(-np.abs(z), (st.spacing, st.origin, st.direction), sd / "atypicality_map.nii.gz",
                              fill_value=0.0)
        tag = f"{r.get('pathology') or 'normal'}: {vol_cm3:.1f} cm3 {'ABNORMAL' if vol_cm3 > thr else 'normal'}"
        write_preview_png(st.volume, -np.abs(z), ab, sd / "preview.png", title=f"{r['study_id']} {tag}",
                          tau_abs=-tau)
        if r["label"] == 0:
            healthy_z.append(z[d["perm"]])
        else:
            les = lesion_on_grid({**r, "_size": a.size}, st) & d["perm"]
            lesion_z.setdefault(r["pathology"], []).append(z[les])
    hz = np.concatenate(healthy_z)
    vox = ["| kind | lesion voxels in the permissive mask | median z | voxel AUROC (|z|, two-sided) | "
           "voxel AUROC (low z only) |", "|---|---|---|---|---|"]
    for kind in PATHOLOGIES:
        if kind not in lesion_z:
            continue
        lz = np.concatenate(lesion_z[kind])
        lz, hzz = lz[np.isfinite(lz)], hz[np.isfinite(hz)]
        yy = np.r_[np.ones(lz.size), np.zeros(hzz.size)]
        vox.append(f"| {kind} | {lz.size} | {np.median(lz):+.2f} | {roc_auc_score(yy, np.abs(np.r_[lz, hzz])):.3f} | "
                   f"{roc_auc_score(yy, -np.r_[lz, hzz]):.3f} |")
    vox_table = "\n".join(vox) + f"\n\nhealthy test lung voxels: share |z| > τ={tau:g}: {np.mean(np.abs(hz) > tau):.4f}"
    ev = {"operating_point": op.to_dict(), "metrics": m, "rows": rows_out, "roc": roc_curve_data(yt, vols),
          "table": table, "voxel_table": vox_table}
    write_json(ev, odir / "evaluation.json")
    (odir / "voxel_analysis.md").write_text(vox_table + "\n", encoding="utf-8")
    log("voxel test:\n" + table + "\n\nvoxel analysis (test):\n" + vox_table)
    return ev


# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "work" / "experiments" / "detection"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--size", default="small", choices=["small", "demo"])
    p.add_argument("--train-normal", type=int, default=48)
    p.add_argument("--val-normal", type=int, default=16)
    p.add_argument("--val-abnormal", type=int, default=20)
    p.add_argument("--test-normal", type=int, default=16)
    p.add_argument("--test-abnormal", type=int, default=30)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--decay-at", type=float, default=0.8, help="fraction of the budget after which lr/10")
    p.add_argument("--train-minutes", type=float, default=14.0)
    p.add_argument("--max-iterations", type=int, default=1_000_000)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--n-val-patches", type=int, default=64)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads: 2 on 2 idle cores (9.2 vs 5.4 steps/s); use 1 if other jobs share the cores")
    p.add_argument("--stride", type=int, default=12)
    p.add_argument("--statistics", nargs="+", default=["raw", "resid", "typ"])
    p.add_argument("--sigma", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--tau", type=float, nargs="+", default=[-3.0, -2.5, -2.0, -1.5, -1.0, -0.5])
    p.add_argument("--v-min", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    p.add_argument("--voxel-part", default="top_latent", choices=["top_latent", "all"],
                   help="voxel stage: which local log-likelihood terms to map (ct3dflow.flow.local)")
    p.add_argument("--voxel-stride", type=int, default=6,
                   help="voxel stage grid stride (6: every voxel averaged over 64 windows)")
    p.add_argument("--voxel-sigma", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--voxel-tau", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0, 6.0],
                   help="voxel stage: |z| thresholds against the depth-banded healthy reference")
    p.add_argument("--device", default="cpu", help="torch device for training and scoring (cpu, cuda)")
    p.add_argument("--skip-paper-map", action="store_true",
                   help="after training go straight to the voxel stage (no score/tune/test/analysis)")
    p.add_argument("--force", nargs="*", default=[], choices=STAGES)
    p.add_argument("--stop-after", choices=STAGES, default="voxel")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    np.seterr(all="ignore")
    t_all = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(a), indent=1), encoding="utf-8")
    cache = out / "cache"
    manifest = stage_archive(a, out)
    rows = manifest_rows(manifest)
    if a.stop_after == "archive":
        return 0
    stage_preprocess(a, manifest, cache)
    if a.stop_after == "preprocess":
        return 0
    model_path = stage_train(a, rows, cache, out / "model")
    info = json.loads((out / "model" / "train_info.json").read_text(encoding="utf-8"))
    log(f"model: {info['parameters']:,} parameters, {info['steps']} steps in {info['wall_s'] / 60:.1f} min wall "
        f"time; held-out healthy {info['val_bpd_init']:.3f} → {info['val_bpd_final']:.3f} bits/dim")
    if a.stop_after == "train":
        return 0
    if a.skip_paper_map:
        stage_voxel(a, rows, cache, model_path, out / "voxel")
        log(f"total wall time {(time.time() - t_all) / 60:.1f} min")
        return 0
    results = stage_score(a, rows, cache, model_path, out / f"scores-stride{a.stride}")
    if a.stop_after == "score":
        return 0
    val = load_scored(rows, results, cache, "val")
    stat, op, coef = stage_tune(a, val, out / "tune")
    if a.stop_after == "tune":
        return 0
    # the test split is touched from here on, once
    test = load_scored(rows, results, cache, "test")
    stage_test(a, test, stat, op, coef, cache, out / "test")
    if a.stop_after == "test":
        return 0
    stage_analysis(a, test, val, stat, op, coef, cache, out / "test")
    if a.stop_after == "analysis":
        return 0
    stage_voxel(a, rows, cache, model_path, out / "voxel")
    log(f"total wall time {(time.time() - t_all) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
