"""Studies → results rows; the operating-point search on validation; the test evaluation (Table 1).

No Ray here: the Ray Tune job and the screening job call these same functions. Patch log-likelihoods
are stored per study (``patch_scores.npz``) so that choosing σ, τ, v_min and T never reruns the model.

How the operating point is chosen (DESIGN §4.9, the paper's "T from the ROC curve on the validation
set"): for given σ, τ and v_min every validation study gets its abnormal volume; the search maximises
the validation AUROC of that volume (F1 breaks ties); T is then read off the validation ROC of those
volumes as the threshold with the best F1 (ties: the larger T). T changes no AUROC, so searching it
apart from σ, τ, v_min would only spend trials.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import StudyCache
from .metrics import bootstrap_ci, choose_threshold, patient_metrics, roc_curve_data
from .pipeline import error_reason
from .scoring import (
    OperatingPoint,
    PatchScores,
    abnormal_volume,
    healthy_reference,
    log_p_map,
    patch_log_likelihoods,
    scoring_windows,
    write_log_p_map_nifti,
    write_preview_png,
)
from .voxel_map import VoxelOperatingPoint, voxel_grid_search, voxel_log_p_volume

RESULT_COLUMNS = [
    "study_id", "path", "status", "error", "model", "n_patches", "abnormal_volume_cm3",
    "predicted_abnormal", "threshold_cm3", "log_p_min", "log_p_mean", "map_path", "preview_path",
    "patch_scores_path", "scored_at", "voxel_map_path",
]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def score_row(model, row: dict, cache_dir, out_dir, scoring: dict, op: OperatingPoint | None,
              model_uri: str = "", device="cpu", write_outputs: bool = True) -> dict:
    """Score one cached study: patch scores (always stored), and with an operating point the map,
    the abnormal volume, the decision, the NIfTI map and the PNG preview. Never raises."""
    sid = str(row["study_id"])
    out = dict.fromkeys(RESULT_COLUMNS)
    out.update(study_id=sid, path=str(row.get("path")), model=model_uri, scored_at=_now())
    try:
        study = StudyCache(cache_dir).load(sid)
        size = int(scoring.get("patch_size") or 48)
        ps = patch_log_likelihoods(model, study.volume, study.permissive, size=size,
                                   stride=int(scoring.get("stride", 38)),
                                   batch_size=int(scoring.get("batch_size", 16)), device=device)
        d = Path(out_dir) / sid
        d.mkdir(parents=True, exist_ok=True)
        fin = ps.log_p[np.isfinite(ps.log_p)]
        out.update(status="ok", error="", n_patches=len(ps),
                   log_p_min=float(fin.min()) if fin.size else float("nan"),
                   log_p_mean=float(fin.mean()) if fin.size else float("nan"),
                   patch_scores_path=str(ps.save(d / "patch_scores.npz")))
        if op is not None:
            lpm = log_p_map(study.volume.shape, ps.centres, ps.log_p, op.sigma_vox, mask=study.permissive)
            vol, ab = abnormal_volume(lpm, study.permissive, op.tau_abs, op.v_min_cm3, study.spacing)
            out.update(abnormal_volume_cm3=vol, predicted_abnormal=bool(vol > op.threshold_cm3),
                       threshold_cm3=op.threshold_cm3)
            if write_outputs:
                # outside the mask the map is NaN; SimpleITK readers turn NaN into 0, so store the minimum
                fill = float(np.nanmin(lpm)) if np.isfinite(lpm).any() else 0.0
                out.update(_write_map_outputs(sid, study, lpm, ab, vol, op.threshold_cm3, op.tau_abs,
                                              d / "log_p_map.nii.gz", fill))
    except Exception as exc:  # noqa: BLE001 - one broken study becomes one error row
        out.update(status="error", error=error_reason(exc))
    return out


def _write_map_outputs(sid, study, study_map, abnormal, vol, threshold_cm3, tau_abs, nifti_path, fill) -> dict:
    """The map as NIfTI on the study's grid and the PNG preview beside it; their paths as result columns."""
    nifti_path = Path(nifti_path)
    ref = (study.spacing, study.origin, study.direction)
    title = f"{sid}: {vol:.1f} cm3 {'ABNORMAL' if vol > threshold_cm3 else 'normal'}"
    return {"map_path": str(write_log_p_map_nifti(study_map, ref, nifti_path, fill_value=fill)),
            "preview_path": str(write_preview_png(study.volume, study_map, abnormal, nifti_path.parent / "preview.png",
                                                  title=title, tau_abs=tau_abs))}


# ---------------------------------------------------------------------------------------------------
@dataclass
class TuningStudy:
    """What a trial needs of one validation study (no volume: the map needs only the mask)."""

    study_id: str
    label: int
    pathology: str | None
    permissive: np.ndarray
    spacing: tuple
    scores: PatchScores


def _labelled_scored(rows: list[dict], ok: pd.DataFrame, cache_dir):
    """``(study_id, label, pathology, cached study, result row)`` of each labelled row with an ok result."""
    cache = StudyCache(cache_dir)
    for r in rows:
        sid = r["study_id"]
        if sid not in ok.index or r.get("label") is None:
            continue
        pathology = r.get("pathology")
        yield (sid, int(r["label"]), pathology if isinstance(pathology, str) else None, cache.load(sid, mmap=True),
               ok.loc[sid])


def load_tuning_studies(rows: list[dict], results: pd.DataFrame, cache_dir) -> list[TuningStudy]:
    ok = results[results["status"] == "ok"].set_index("study_id")
    return [TuningStudy(sid, label, kind, np.asarray(s.permissive), tuple(s.spacing),
                        PatchScores.load(res["patch_scores_path"]))
            for sid, label, kind, s, res in _labelled_scored(rows, ok, cache_dir)]


def healthy_stats(studies: list[TuningStudy]) -> tuple[float, float]:
    healthy = [s.scores for s in studies if s.label == 0]
    if not healthy:
        raise ValueError("the validation split has no healthy study: τ is defined relative to healthy ones")
    return healthy_reference(healthy)


def study_maps(studies: list[TuningStudy], sigma_vox: float) -> list[np.ndarray]:
    """The Log P map of every study at one σ (it depends on nothing else, so a search builds it once)."""
    return [log_p_map(s.permissive.shape, s.scores.centres, s.scores.log_p, sigma_vox, mask=s.permissive)
            for s in studies]


def abnormal_volumes(studies: list[TuningStudy], sigma_vox: float, tau_abs: float, v_min_cm3: float,
                     maps: list[np.ndarray] | None = None) -> np.ndarray:
    maps = maps if maps is not None else study_maps(studies, sigma_vox)
    return np.asarray([abnormal_volume(m, s.permissive, tau_abs, v_min_cm3, s.spacing)[0]
                       for s, m in zip(studies, maps, strict=True)])


def evaluate_params(studies: list[TuningStudy], sigma_vox: float, tau_z: float, v_min_cm3: float,
                    healthy: tuple[float, float], t_range=(0.0, np.inf), maps=None) -> dict:
    """One trial: validation AUROC/F1 of the abnormal volume, and T from the validation ROC."""
    y = np.array([s.label for s in studies])
    tau_abs = healthy[0] + tau_z * healthy[1]
    vols = abnormal_volumes(studies, sigma_vox, tau_abs, v_min_cm3, maps=maps)
    t = float(np.clip(choose_threshold(y, vols, criterion="f1"), *t_range))
    m = patient_metrics(y, vols, t)
    auroc = 0.5 if not np.isfinite(m["auroc"]) else float(m["auroc"])
    return {"auroc": auroc, "f1": float(m["f1"]), "accuracy": float(m["accuracy"]), "threshold_cm3": t,
            "objective": auroc + 1e-3 * float(m["f1"]),  # AUROC first, F1 breaks ties
            "operating_point": OperatingPoint(sigma_vox, tau_z, v_min_cm3, t, *healthy).to_dict()}


def grid_search(studies: list[TuningStudy], space: dict, max_trials: int | None = None, seed: int = 0
                ) -> tuple[OperatingPoint, pd.DataFrame]:
    """Local search over a grid (``space``: name → list of values) — the Ray Tune job samples the same
    function; this is the single-machine path (``ct3dflow tune-local``)."""
    healthy = healthy_stats(studies)
    grid = list(itertools.product(space["sigma_vox"], space["tau_z"], space["v_min_cm3"]))
    if max_trials and len(grid) > max_trials:
        rng = np.random.default_rng(seed)
        grid = [grid[i] for i in sorted(rng.choice(len(grid), max_trials, replace=False))]
    trials, maps = [], {}
    for sigma, tau, vmin in sorted(grid):
        if sigma not in maps:
            maps = {sigma: study_maps(studies, sigma)}  # one σ at a time: maps are large
        r = evaluate_params(studies, sigma, tau, vmin, healthy, maps=maps[sigma])
        trials.append({"sigma_vox": sigma, "tau_z": tau, "v_min_cm3": vmin, **r})
    df = pd.DataFrame(trials).sort_values("objective", ascending=False, kind="stable")
    return OperatingPoint.from_dict(df.iloc[0]["operating_point"]), df


def evaluate_test(studies: list[TuningStudy], op: OperatingPoint, n_boot: int = 1000, seed: int = 0) -> dict:
    """Patient-level metrics with bootstrap CIs, ROC data and a per-pathology-kind breakdown."""
    vols = abnormal_volumes(studies, op.sigma_vox, op.tau_abs, op.v_min_cm3)
    return evaluate_volumes(studies, vols, op.threshold_cm3, n_boot=n_boot, seed=seed)


def evaluate_volumes(studies, vols, threshold_cm3: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of abnormal volumes ``vols`` at T for ``studies`` (anything with ``study_id``, ``label`` and
    ``pathology``): overall with bootstrap CIs, ROC data, per pathology kind against all normals."""
    y = np.array([s.label for s in studies])
    vols = np.asarray(vols, dtype=np.float64)
    metrics = patient_metrics(y, vols, threshold_cm3)
    ci = bootstrap_ci(y, vols, threshold_cm3, n_boot=n_boot, seed=seed) if len(set(y)) == 2 else {}
    per_kind = {}
    kinds = sorted({s.pathology for s in studies if s.label == 1 and s.pathology})
    for kind in kinds:
        sel = np.array([s.label == 0 or s.pathology == kind for s in studies])
        km = patient_metrics(y[sel], vols[sel], threshold_cm3)
        per_kind[kind] = {"n": int((y[sel] == 1).sum()), "auroc": km["auroc"],
                          "sensitivity": km["sensitivity"],
                          "median_abnormal_volume_cm3": float(np.median(vols[sel][y[sel] == 1]))}
    return {"metrics": metrics, "ci": {k: list(v) for k, v in ci.items()}, "roc": roc_curve_data(y, vols),
            "per_kind": per_kind,
            "studies": [{"study_id": s.study_id, "label": s.label, "pathology": s.pathology,
                         "abnormal_volume_cm3": float(v)} for s, v in zip(studies, vols, strict=True)]}


# ------------------------------------------------------------------------- the voxel map (not the paper's)
def load_operating_point(path_or_dict) -> OperatingPoint | VoxelOperatingPoint:
    """An ``operating_point.json`` of either map: ``"map": "voxel"`` marks the voxel map's."""
    d = path_or_dict if isinstance(path_or_dict, dict) else json.loads(Path(path_or_dict).read_text(encoding="utf-8"))
    return VoxelOperatingPoint.from_dict(d) if d.get("map") == "voxel" else OperatingPoint.from_dict(d)


def score_row_voxel(glow, row: dict, cache_dir, out_dir, stride: int = 6, part: str = "top_latent",
                    op: VoxelOperatingPoint | None = None, model_uri: str = "", device="cpu",
                    batch_size: int = 32, write_outputs: bool = True) -> dict:
    """:func:`score_row` for the voxel map of :mod:`ct3dflow.voxel_map`. The raw map is stored per study
    (``voxel_map.npz``, on the cache grid, with its stride and part) so that tuning never reruns the model.
    With an operating point: the abnormal volume, the decision, the atypicality map (−|z|) as NIfTI and the
    PNG preview; the operating point's stride and part override the arguments. Never raises."""
    sid = str(row["study_id"])
    out = dict.fromkeys(RESULT_COLUMNS)
    out.update(study_id=sid, path=str(row.get("path")), model=model_uri, scored_at=_now())
    try:
        if op is not None:
            stride, part = op.stride, op.part  # the map must be computed as it was when the point was chosen
        study = StudyCache(cache_dir).load(sid)
        vmap = voxel_log_p_volume(glow, study.volume, study.permissive, glow.patch_size, stride, part=part,
                                  batch_size=batch_size, device=device)
        d = Path(out_dir) / sid
        d.mkdir(parents=True, exist_ok=True)
        # the map with how it was made: an operating point chosen on these maps must be applied to the same
        np.savez(d / "voxel_map.npz", voxel_map=vmap, stride=np.int64(stride), part=np.str_(part))
        fin = vmap[np.isfinite(vmap)]
        out.update(status="ok", error="", n_patches=len(scoring_windows(study.volume, study.permissive,
                                                                         glow.patch_size, stride)[3]),
                   log_p_min=float(fin.min()) if fin.size else float("nan"),
                   log_p_mean=float(fin.mean()) if fin.size else float("nan"),
                   voxel_map_path=str(d / "voxel_map.npz"))
        if op is not None:
            vol, ab, z = op.abnormal(vmap, study.permissive, study.spacing)
            out.update(abnormal_volume_cm3=vol, predicted_abnormal=bool(vol > op.threshold_cm3),
                       threshold_cm3=op.threshold_cm3)
            if write_outputs:  # −|z|: low = atypical on either side, read like a Log P map
                out.update(_write_map_outputs(sid, study, -np.abs(z), ab, vol, op.threshold_cm3, -op.tau_z,
                                              d / "atypicality_map.nii.gz", 0.0))
    except Exception as exc:  # noqa: BLE001 - one broken study becomes one error row
        out.update(status="error", error=error_reason(exc))
    return out


@dataclass
class VoxelStudy:
    """What the voxel-map search needs of one study: its raw voxel map and permissive mask."""

    study_id: str
    label: int
    pathology: str | None
    permissive: np.ndarray
    spacing: tuple
    voxel_map: np.ndarray
    stride: int
    part: str


def load_voxel_studies(rows: list[dict], results: pd.DataFrame, cache_dir) -> list[VoxelStudy]:
    if "voxel_map_path" not in results.columns:
        raise ValueError("these results hold no voxel maps: score with `ct3dflow score-local --map voxel`")
    ok = results[(results["status"] == "ok") & results["voxel_map_path"].notna()].set_index("study_id")
    out = []
    for sid, label, kind, s, res in _labelled_scored(rows, ok, cache_dir):
        with np.load(res["voxel_map_path"]) as f:
            out.append(VoxelStudy(sid, label, kind, np.asarray(s.permissive), tuple(s.spacing), f["voxel_map"],
                                  int(f["stride"]), str(f["part"])))
    return out


def voxel_search(studies: list[VoxelStudy], space: dict | None = None):
    """:func:`ct3dflow.voxel_map.voxel_grid_search` over loaded validation studies (all scored alike)."""
    made = {(s.stride, s.part) for s in studies}
    if len(made) != 1:
        raise ValueError(f"the validation voxel maps were made with different (stride, part): {sorted(made)}; "
                         "score them again with one setting")
    stride, part = made.pop()
    return voxel_grid_search([s.voxel_map for s in studies], [s.permissive for s in studies],
                             [s.spacing for s in studies], [s.label for s in studies], space, part, stride)


def evaluate_test_voxel(studies: list[VoxelStudy], op: VoxelOperatingPoint, n_boot: int = 1000,
                        seed: int = 0) -> dict:
    """:func:`evaluate_test` for the voxel map."""
    vols = [op.abnormal(s.voxel_map, s.permissive, s.spacing)[0] for s in studies]
    return evaluate_volumes(studies, vols, op.threshold_cm3, n_boot=n_boot, seed=seed)


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float), encoding="utf-8")
    return path
