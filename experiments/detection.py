"""Patient-level detection on synthetic phantoms, end to end on one machine, through the core pipeline.

    .venv/bin/python experiments/detection.py --out work/experiments/detection

(≈ 30 min on 2 idle cores: 14 min of training, then the platform's map and the paper's; docs/RESULTS.md).
``--device cuda`` trains and scores on a GPU. Every stage is skipped when its output exists, unless
``--force STAGE``.

Protocol (kept from issue 3): one archive of healthy phantoms for training and healthy + abnormal (every
pathology kind) for validation and test; a 3D GLOW trained on healthy training patches under a wall-clock
budget; then for each map kind (``--maps``, default the platform's — the voxel map against the anatomy-banded
reference, ``anatomy`` — and the paper's patch map):

1. **score** — :func:`ct3dflow.detect.batch.score_locally` over val and test (the scorer and resume rule of
   every path); for the voxel map once per stride of ``--voxel-strides``;
2. **tune** — :func:`ct3dflow.detect.search.grid_search` on validation only; with several strides, the one
   with the best validation objective (ties: the larger, cheaper stride) is kept;
3. **test** — :func:`ct3dflow.detect.evaluate.evaluate` once, the NIfTI maps and previews from the stored
   scores (the model is not run again), per-kind sensitivity, the normal studies' abnormal volume;
4. **lesion analysis** — the atypicality of lesion voxels (regenerated from the phantom seeds) against the
   lung voxels of healthy test studies, per kind.

No test label is read before the test stage; test labels are used only for the metrics and the analysis.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ct3dflow.cache import StudyCache  # noqa: E402
from ct3dflow.detect import DEFAULT_KIND, OperatingPoint, get_kind  # noqa: E402
from ct3dflow.detect.batch import ScoringPlan, entries_of_rows, score_locally  # noqa: E402
from ct3dflow.detect.evaluate import evaluate  # noqa: E402
from ct3dflow.detect.outputs import write_json  # noqa: E402
from ct3dflow.detect.row import load_scored_studies, write_outputs_of  # noqa: E402
from ct3dflow.detect.search import DEFAULT_REFERENCE_FOLDS, grid_search, threshold_rule  # noqa: E402
from ct3dflow.detect.voxel_map import VoxelMap  # noqa: E402
from ct3dflow.metrics import bootstrap_ci, patient_metrics  # noqa: E402
from ct3dflow.pipeline import cached_patches, manifest_rows  # noqa: E402
from ct3dflow.preprocess import PreprocessConfig  # noqa: E402
from ct3dflow.synthetic import PATHOLOGIES, make_archive, make_phantom  # noqa: E402

STAGES = ("archive", "preprocess", "train", "score", "tune", "test")


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
    healthy = make_archive(arch, n_norm, 0, seed=a.seed, size=a.size, family=a.family,
                           splits=(a.train_normal, a.val_normal, a.test_normal))
    sick = make_archive(arch, 0, a.val_abnormal + a.test_abnormal, seed=a.seed + 1, size=a.size, family=a.family,
                        splits=(0, a.val_abnormal, a.test_abnormal))
    df = pd.concat([healthy, sick], ignore_index=True)
    df["pathology"] = df["pathology"].astype(object).where(df["pathology"].notna(), None)
    df.to_parquet(manifest, index=False)
    log(f"archive: {len(df)} studies\n" + df.groupby(["split", "label", "pathology"], dropna=False)
        .size().rename("studies").to_string())
    return manifest


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
    seed = a.seed if a.train_seed is None else a.train_seed  # the same archive, another initialisation and batch order
    torch.manual_seed(seed)
    cfg = TrainConfig(levels=a.levels, steps=a.steps, width=a.width, patch_size=a.patch_size,
                      batch_size=a.batch_size, iterations=a.iterations or a.max_iterations, lr=a.lr, weight_decay=1e-5,
                      warmup_steps=a.warmup, lr_decay_at=a.decay_at, grad_clip=50.0,
                      min_lung_fraction=0.5, seed=seed,
                      fast=False)  # eager layers on every device: the experiment measures the method, not speed
    c = StudyCache(cache)
    train_ids = [r["study_id"] for r in rows if r["split"] == "train" and r["label"] == 0]
    val_ids = [r["study_id"] for r in rows if r["split"] == "val" and r["label"] == 0]
    studies = [c.load(s, mmap=True) for s in train_ids]
    batches = patch_batches_from_arrays([s.volume for s in studies], [s.strict for s in studies], cfg, seed=seed)
    val = torch.from_numpy(cached_patches(cache, val_ids, a.n_val_patches, a.patch_size, 0.5, a.seed + 1))
    model = cfg.build_model().to(a.device)
    trainer = FlowTrainer(model, cfg, a.device)
    t0 = time.time()
    trainer.initialise(torch.cat([next(batches) for _ in range(4)]))
    hist = [{"step": 0, "wall_s": 0.0, "train_bpd": float("nan"), "val_bpd": trainer.validate(val)}]
    log(f"train: {len(train_ids)} healthy studies, L={a.levels} K={a.steps} width={a.width} {a.patch_size}^3 "
        f"batch {a.batch_size}, {model.num_parameters():,} parameters, budget "
        f"{f'{a.iterations} steps' if a.iterations else f'{a.train_minutes:g} min'}; held-out "
        f"healthy {hist[0]['val_bpd']:.3f} bits/dim after ActNorm init")
    budget, run = 60.0 * a.train_minutes, []
    if a.iterations:  # a step budget: the wall clock no longer decides how far the model gets
        budget = float("inf")
    while trainer.step < cfg.iterations:
        el = time.time() - t0
        if el > budget:
            break
        trainer.note_clock(el / budget)  # the last part of the budget (steps or clock) at lr/10
        m = trainer.train_step(next(batches))
        run.append(m["bits_per_dim"])
        if trainer.step in a.snapshots:
            mdir.mkdir(parents=True, exist_ok=True)
            trainer.glow.save(mdir / f"model-step{trainer.step}.pt")
            log(f"  snapshot at step {trainer.step} ({time.time() - t0:.0f} s of training)")
        if trainer.step % a.val_every == 0 and not m["skipped"]:
            hist.append({"step": trainer.step, "wall_s": time.time() - t0,
                         "train_bpd": float(np.mean(run[-a.val_every:])), "val_bpd": trainer.validate(val)})
            log(f"  step {trainer.step}: train {hist[-1]['train_bpd']:.3f}, val {hist[-1]['val_bpd']:.3f} bits/dim "
                f"({hist[-1]['wall_s']:.0f} s)")
    v = trainer.validate(val)
    wall = time.time() - t0
    hist.append({"step": trainer.step, "wall_s": wall, "train_bpd": float(np.mean(run[-a.val_every:])), "val_bpd": v})
    mdir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(hist).to_csv(mdir / "train_log.csv", index=False)
    trainer.glow.eval()
    trainer.glow.save(model_path)
    write_json({"wall_s": wall, "steps": trainer.step, "skipped": trainer.skipped_steps,
                "val_bpd_init": hist[0]["val_bpd"], "val_bpd_final": v, "parameters": model.num_parameters(),
                "config": cfg.to_dict(), "threads": a.threads}, mdir / "train_info.json")
    log(f"train: wall time {wall / 60:.1f} min, {trainer.step} steps ({trainer.skipped_steps} skipped); held-out "
        f"healthy {hist[0]['val_bpd']:.3f} → {v:.3f} bits/dim")
    return model_path


# ----------------------------------------------------------------------------------- one map kind
def score_split(a, kind, stride, rows, cache, model_path, model, sdir: Path, split: str):
    """The core scoring run over one split (resumable: parts of an interrupted run are kept)."""
    done = sdir / split / "results.parquet"
    if done.exists() and "score" not in a.force:
        return pd.read_parquet(done)
    todo = [r for r in rows if r["split"] == split]
    plan = ScoringPlan.make(kind.name, {"stride": stride, "part": a.voxel_part, "merge": a.voxel_merge,
                                           "phases": a.voxel_phases, "batch_size": 32},
                            model.patch_size, None, str(model_path), "experiment", PreprocessConfig().to_dict(),
                            cache, sdir / split)
    t = time.time()
    res, _ = score_locally(entries_of_rows(todo), plan, model, a.device,
                           on_row=lambda i, it: i % 10 == 0 and log(f"  {kind.name} {split}: {i}/{len(todo)} "
                                                                     f"({time.time() - t:.0f} s)"))
    log(f"score [{kind.name}, stride {stride}, {split}]: {len(res)} studies, {int((res.status == 'ok').sum())} ok, "
        f"{time.time() - t:.0f} s ({(time.time() - t) / max(len(res), 1):.1f} s per study)")
    return res


def score_dir_name(a, kind, stride: int) -> str:
    """One folder per scoring variant, so variants compared on validation never overwrite each other."""
    name = f"{kind.name}-stride{stride}"
    if "phases" in kind.point_defaults:  # the voxel map and the kinds built on it
        if a.voxel_phases != kind.point_defaults["phases"]:
            name += f"-phases{a.voxel_phases}"
        if a.voxel_merge != kind.point_defaults["merge"]:
            name += f"-{a.voxel_merge}"
    return name


def fmt_ci(m, ci, k):
    v = m[k]
    if not np.isfinite(v):
        return "—"
    lo, hi = ci.get(k, (float("nan"), float("nan")))
    return f"{v:.3f} ({lo:.2f}–{hi:.2f})"


def test_table(studies, vols, t) -> tuple[str, list[dict]]:
    y = np.array([s.label for s in studies])
    kinds = np.array([s.pathology or "normal" for s in studies])
    lines = ["| test subset | abnormal / normal | AUROC (95 % CI) | F1 (95 % CI) | accuracy (95 % CI) | sensitivity | "
             "specificity |", "|---|---|---|---|---|---|---|"]
    out = []
    for subset in ("all", *PATHOLOGIES):
        sel = np.ones(len(y), bool) if subset == "all" else (y == 0) | (kinds == subset)
        if subset != "all" and not (kinds == subset).any():
            continue
        m = patient_metrics(y[sel], vols[sel], t)
        ci = bootstrap_ci(y[sel], vols[sel], t, n_boot=2000, seed=0 if subset == "all" else 1)
        name = "**all kinds**" if subset == "all" else f"{subset} vs normal"
        lines.append(f"| {name} | {int(y[sel].sum())} / {int((y[sel] == 0).sum())} | {fmt_ci(m, ci, 'auroc')} | "
                     f"{fmt_ci(m, ci, 'f1')} | {fmt_ci(m, ci, 'accuracy')} | {m['sensitivity']:.3f} | "
                     f"{m['specificity']:.3f} |")
        out.append({"subset": subset, **{k: m[k] for k in ("auroc", "f1", "accuracy", "sensitivity", "specificity")},
                    "ci": {k: list(v) for k, v in ci.items()}})
    return "\n".join(lines), out


def lesion_on_grid(row: dict, study, size) -> np.ndarray:
    """The phantom's lesion mask (regenerated from its seed) on the study's 2 mm grid."""
    import SimpleITK as sitk

    ph = make_phantom(int(row["seed"]), row["pathology"], size=size, family=row.get("family") or "a")
    img = ph.to_image(ph.lesion_mask.astype(np.float32))
    res = sitk.Resample(img, study.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(res) >= 0.5


def lesion_analysis(a, kind, op: OperatingPoint, studies, rows, cache: Path) -> str:
    """Atypicality of lesion voxels against lung voxels of healthy test studies, per kind (test labels)."""
    from sklearn.metrics import roc_auc_score

    by_id = {r["study_id"]: r for r in rows}
    c = StudyCache(cache)
    healthy, lesion = [], {}
    for s in studies:
        atyp = kind.atypicality(s.score, s.permissive, op.params, op.reference)
        inside = s.permissive != 0
        if s.label == 0:
            healthy.append(atyp[inside])
        else:
            les = lesion_on_grid(by_id[s.study_id], c.load(s.study_id, mmap=True), a.size) & inside
            lesion.setdefault(s.pathology, []).append(atyp[les])
    level = kind.level(op.params, op.reference)
    hz = np.concatenate(healthy)
    hz = hz[np.isfinite(hz)]
    lines = ["| kind | lesion voxels in the permissive mask | median atypicality | voxel AUROC (low = abnormal) | "
             "share below the level |", "|---|---|---|---|---|"]
    for k in PATHOLOGIES:
        if k not in lesion:
            continue
        lz = np.concatenate(lesion[k])
        lz = lz[np.isfinite(lz)]
        if not lz.size:
            continue
        auc = roc_auc_score(np.r_[np.ones(lz.size), np.zeros(hz.size)], -np.r_[lz, hz])
        lines.append(f"| {k} | {lz.size} | {np.median(lz):+.2f} | {auc:.3f} | {np.mean(lz < level):.3f} |")
    return "\n".join(lines) + f"\n\nhealthy test lung voxels below the level ({level:.4g}): {np.mean(hz < level):.4f}"


def stage_kind(a, kind_name: str, rows, cache: Path, model_path: Path, out: Path) -> dict:
    import torch

    from ct3dflow.models import load_patch_scorer

    kind = get_kind(kind_name)
    torch.set_num_threads(a.threads)
    model = load_patch_scorer(model_path).to(a.device).eval()
    per_voxel = isinstance(kind, VoxelMap)  # the voxel map and the kinds built on it (anatomy)
    strides = a.voxel_strides if per_voxel else [a.patch_stride]
    rule = threshold_rule("specificity" if a.target_specificity else "best_f1", a.target_specificity)
    space = {"sigma_vox": a.voxel_sigma, "tau_z": a.voxel_tau, "v_min_cm3": a.v_min} if per_voxel else \
        {"sigma_vox": a.patch_sigma, "tau_z": a.patch_tau, "v_min_cm3": a.v_min}
    val_rows = [r for r in rows if r["split"] == "val"]
    chosen = None
    for stride in strides:  # validation only: score, search
        sdir = out / score_dir_name(a, kind, stride)
        res = score_split(a, kind, stride, rows, cache, model_path, model, sdir, "val")
        val = load_scored_studies(kind, val_rows, res, cache)
        op, trials = grid_search(kind, val, space, rule, folds=a.reference_folds)
        trials.to_csv(sdir / "trials.csv", index=False)
        op.save(sdir / "operating_point.json")
        log(f"tune [{kind.name}, stride {stride}]: {len(trials)} trials on {len(val)} val studies; val AUROC "
            f"{op.validation['auroc']:.3f} F1 {op.validation['f1']:.3f}: {op.describe()}")
        obj = float(trials.iloc[0]["objective"])
        if chosen is None or obj > chosen[0] + 1e-9 or (abs(obj - chosen[0]) <= 1e-9 and stride > chosen[1]):
            chosen = (obj, stride, op, sdir)
    _, stride, op, sdir = chosen
    log(f"{kind.name} map: stride {stride} chosen on validation")
    if a.stop_after in ("score", "tune"):  # validation only: comparing variants never touches the test split
        return None
    # the test split, once
    res = score_split(a, kind, stride, rows, cache, model_path, model, sdir, "test")
    test_rows = [r for r in rows if r["split"] == "test"]
    test = load_scored_studies(kind, test_rows, res, cache)
    ev = evaluate(kind, op, test, n_boot=2000)
    vols = np.array([s["abnormal_volume_cm3"] for s in ev["studies"]])
    table, subsets = test_table(test, vols, op.threshold_cm3)
    c = StudyCache(cache)
    for s in test:  # maps and previews from the stored scores
        st = c.load(s.study_id)
        vol, ab, atyp = kind.decide(s.score, st.permissive, st.spacing, op)
        write_outputs_of(f"{s.study_id} {s.pathology or 'normal'}", st, kind, op, atyp, ab, vol,
                         vol > op.threshold_cm3, sdir / "test" / "maps" / s.study_id)
    analysis = lesion_analysis(a, kind, op, test, test_rows, cache)
    normals = vols[np.array([s.label for s in test]) == 0]
    result = {"kind": kind.name, "stride": stride, "operating_point": op.to_dict(), "metrics": ev["metrics"],
              "ci": ev["ci"], "per_kind": ev["per_kind"], "subsets": subsets, "table": table,
              "lesion_analysis": analysis, "normal_volume_cm3": ev["normal_volume_cm3"],
              "normal_volumes": normals.tolist(), "studies": ev["studies"]}
    write_json(result, sdir / "test" / "evaluation.json")
    log(f"test [{kind.name}, stride {stride}] ({op.describe()}):\n{table}\n\nnormal test studies' abnormal volume: "
        f"median {np.median(normals):.2f} cm³ (max {normals.max():.2f})\n\nlesion voxels (test):\n{analysis}")
    return result


# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "work" / "experiments" / "detection"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of the flow's initialisation and patch batches (default: --seed); another value on the "
                        "same archive measures the run-to-run noise of training")
    p.add_argument("--size", default="small", choices=["small", "demo"])
    p.add_argument("--family", default="a", help="phantom family of the archive (ct3dflow.synthetic.FAMILIES)")
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
    p.add_argument("--snapshots", type=int, nargs="*", default=[],
                   help="also save the model at these steps (model-step<N>.pt: minutes of training against AUROC)")
    p.add_argument("--iterations", type=int, default=None,
                   help="a step budget instead of the wall-clock one (same results on a faster or slower machine)")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--n-val-patches", type=int, default=64)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads: 2 on 2 idle cores; use 1 if other jobs share the cores")
    p.add_argument("--maps", nargs="+", default=[DEFAULT_KIND, "patch"],
                   help="map kinds to run (ct3dflow.detect; default: the platform's and the paper's)")
    p.add_argument("--voxel-strides", type=int, nargs="+", default=[12],
                   help="voxel map strides to compare on validation (the best is tested)")
    p.add_argument("--voxel-part", default="top_latent", choices=["top_latent", "all"])
    p.add_argument("--voxel-phases", type=int, default=1,
                   help="interleaved window grids per stride (scoring.phases; 2 doubles the windows)")
    p.add_argument("--voxel-merge", default="mean", choices=["mean", "gaussian"],
                   help="how the voxel map merges overlapping windows (ct3dflow.detect.voxel_map.window_weight)")
    p.add_argument("--voxel-sigma", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--voxel-tau", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0, 6.0],
                   help="voxel kinds: |z| thresholds against the healthy reference")
    p.add_argument("--patch-stride", type=int, default=12)
    p.add_argument("--patch-sigma", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--patch-tau", type=float, nargs="+", default=[-3.0, -2.5, -2.0, -1.5, -1.0, -0.5])
    p.add_argument("--v-min", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    p.add_argument("--reference-folds", type=int, default=DEFAULT_REFERENCE_FOLDS,
                   help="cross-fitting folds of the healthy reference in the validation search (1: in-sample)")
    p.add_argument("--target-specificity", type=float, default=None,
                   help="choose T for this validation specificity instead of the best F1")
    p.add_argument("--device", default="cpu", help="torch device for training and scoring (cpu, cuda)")
    p.add_argument("--force", nargs="*", default=[], choices=STAGES)
    p.add_argument("--stop-after", choices=STAGES, default="test",
                   help="score/tune: validation only (score, search, keep the operating point), no test split")
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
    summary = {}
    for kind_name in a.maps:
        r = stage_kind(a, kind_name, rows, cache, model_path, out)
        if r is None:
            continue
        summary[kind_name] = {"stride": r["stride"], "test_auroc": r["metrics"]["auroc"],
                              "test_auroc_ci": r["ci"]["auroc"],
                              "val_auroc": r["operating_point"]["validation"]["auroc"],
                              "specificity": r["metrics"]["specificity"], "sensitivity": r["metrics"]["sensitivity"],
                              "normal_volume_median_cm3": r["normal_volume_cm3"]["median"]}
    if not summary:
        return 0
    write_json({"model": info, "maps": summary, "wall_min": (time.time() - t_all) / 60}, out / "summary.json")
    log(f"summary: {json.dumps(summary, indent=1)}\ntotal wall time {(time.time() - t_all) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
