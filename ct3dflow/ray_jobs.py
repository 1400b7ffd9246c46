"""The platform's jobs, as functions the thin ``jobs/*.py`` entrypoints (and the demo) call.

Each takes the job's ``JobConfig``; Ray is initialised by the caller (``ray.init()`` joins the cluster a
``ray job submit`` runs on, or starts a local one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .pipeline import cached_patches, manifest_rows, ok_study_ids


def _log(msg: str) -> None:
    print(f"[ct3dflow] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
def preprocess_job(cfg, rows_filter=None) -> pd.DataFrame:
    """Manifest → Ray Data preprocessing on CPU workers → the cache and ``cache/summary.parquet``."""
    from .ray_data import preprocess_manifest

    cache = cfg.cache_path
    cache.mkdir(parents=True, exist_ok=True)
    summary = preprocess_manifest(cfg.manifest_path, cache, cfg.preprocess_config().to_dict(),
                                  concurrency=cfg.ray.get("preprocess_concurrency"))
    summary.to_parquet(cache / "summary.parquet", index=False)
    n_err = int((summary["status"] == "error").sum())
    _log(f"preprocessed {len(summary)} studies into {cache}: {len(summary) - n_err} ok, {n_err} errors "
         f"({int(summary['cache_hit'].fillna(False).sum())} served from the cache)")
    for r in summary[summary["status"] == "error"].itertuples():
        _log(f"  error {r.study_id}: {r.error}")
    return summary


# ---------------------------------------------------------------------------------------------------
def train_job(cfg, summary: pd.DataFrame | None = None) -> dict:
    """Ray Train over the cached healthy training studies; MLflow run, checkpoint, registered model."""
    import mlflow
    import torch

    from . import tracking
    from .manifest import manifest_fingerprint, read_manifest
    from .ray_data import training_patch_dataset
    from .ray_train import MLFLOW_RUN_FILE, fit
    from .train import CHECKPOINT_NAME, FlowTrainer

    tcfg = cfg.train_config()
    if summary is None:
        summary = preprocess_job(cfg)
    rows = manifest_rows(cfg.manifest_path)
    train_ids = ok_study_ids(summary, rows, "train")
    val_ids = ok_study_ids(summary, rows, "val") or train_ids[-1:]
    if not train_ids:
        raise ValueError("no usable training study: the manifest needs healthy rows with split 'train'")
    storage = Path(cfg.ray.get("storage_path") or cfg.work_path / "ray_results")
    run_dir = storage / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    world = int(cfg.ray.get("num_workers", 1))

    init_file, val_file = run_dir / "init_patches.npy", run_dir / "val_patches.npy"
    if not init_file.exists():  # fixed once per run name: a resumed job sees the same patches
        np.save(init_file, cached_patches(cfg.cache_path, train_ids, max(2 * tcfg.batch_size, 16),
                                          tcfg.patch_size, tcfg.min_lung_fraction, tcfg.seed))
        np.save(val_file, cached_patches(cfg.cache_path, val_ids, tcfg.n_val_patches, tcfg.patch_size,
                                         tcfg.min_lung_fraction, tcfg.seed + 1))

    uri = tracking.configure(cfg)
    run_file = run_dir / MLFLOW_RUN_FILE
    run_id = run_file.read_text().strip() if run_file.exists() else None
    tags = {"ct3dflow.manifest_fingerprint": manifest_fingerprint(read_manifest(cfg.manifest_path)),
            "ct3dflow.ray_run_name": cfg.name}
    with tracking.job_run(cfg, "train", run_name=cfg.name, run_id=run_id, tags=tags) as run:
        run_file.write_text(run.info.run_id)
        _log(f"MLflow run {run.info.run_id} ({'resumed' if run_id else 'new'}) at {uri}")
        n_patches = int(tcfg.iterations * tcfg.batch_size * world * 1.1) + 4 * tcfg.batch_size * world
        ds = training_patch_dataset(cfg.cache_path, train_ids, n_patches, tcfg.patch_size,
                                    tcfg.min_lung_fraction, seed=tcfg.seed)
        result = fit(cfg, ds, str(init_file), str(val_file), run.info.run_id, uri, str(storage), cfg.name)
        if result.error:
            raise RuntimeError(f"training failed: {result.error}")
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
        model = tcfg.build_model()
        trainer = FlowTrainer(model, tcfg, "cpu")
        trainer.load_state_dict(state)
        model.eval()
        model_file = run_dir / "model.pt"
        model.save(model_file)
        val = torch.from_numpy(np.load(val_file))
        val_bpd = trainer.validate(val)
        mlflow.log_metric("final_val_bits_per_dim", val_bpd, step=trainer.step)
        mlflow.log_artifact(str(model_file), "checkpoint")
        settings = {"kind": "glow3d", "preprocess": cfg.preprocess_config().to_dict(),
                    "patch_size": tcfg.patch_size, "train": tcfg.to_dict(),
                    "scoring": cfg.scoring}
        name = cfg.mlflow.get("registered_model")
        version = tracking.log_patch_model(model_file, settings, name, val_bits_per_dim=val_bpd)
        champion = bool(name and version and tracking.promote_if_best(name, version, val_bpd))
        out = {"run_id": run.info.run_id, "model_version": version, "registered_model": name,
               "val_bits_per_dim": val_bpd, "steps": trainer.step, "champion": champion,
               "skipped_steps": trainer.skipped_steps}
        mlflow.log_dict(out, "train_result.json")
    _log(f"trained {trainer.step} steps; validation {val_bpd:.3f} bits/dim; registered {name} v{version}"
         f"{' (champion)' if champion else ''}")
    (run_dir / "train_result.json").write_text(json.dumps(out, indent=1))
    return out
