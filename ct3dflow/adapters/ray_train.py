"""Ray Train adapter: the core's ``FlowTrainer`` under ``TorchTrainer`` (DDP over N workers).

Ray Train V2 (the default in Ray 2.60): resuming a killed job is running it again with the same
``RunConfig(name, storage_path)``; the loop then finds ``ray.train.get_checkpoint()``. The driver owns
the MLflow run (created once, its id kept beside the checkpoints so a resubmitted job continues it);
rank 0 alone logs metrics to it, with the global step, so a resumed run's history does not restart.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..train import CHECKPOINT_NAME, FlowTrainer, TimeBudget, TrainConfig

MLFLOW_RUN_FILE = "mlflow_run_id"


def _log_to_mlflow(client, run_id: str, step: int, metrics: dict) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, int | float | bool) and np.isfinite(float(v))]
    if batch:
        client.log_batch(run_id, metrics=batch)


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if it is true on one (each rank's clock is its own; all must stop at one step, or
    DDP's next all-reduce waits for ever)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    tcfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))  # N workers sharing a node: no oversubscription
    torch.manual_seed(tcfg.seed)
    model = tcfg.build_model().to(device)
    trainer = FlowTrainer(model, tcfg, device)

    resumed_from = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trainer.load_checkpoint(Path(d) / CHECKPOINT_NAME)
        resumed_from = trainer.step
        print(f"[rank {rank}] resumed from checkpoint at step {resumed_from}", flush=True)
    else:
        # identical init patches on every rank, and before DDP wraps the model (DESIGN §4.6)
        trainer.initialise(torch.from_numpy(np.load(config["init_patches"])))
    trainer.model = ray.train.torch.prepare_model(model)

    client = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["mlflow_tracking_uri"])
        _log_to_mlflow(client, config["mlflow_run_id"], trainer.step, {"resumed_from_step": resumed_from})
    val = torch.from_numpy(np.load(config["val_patches"])) if config.get("val_patches") else None

    shard = ray.train.get_dataset_shard("train")
    log_every = max(1, int(config.get("log_every", 10)))
    budget, out_of_time = None, False
    # the buffer mixes patches of many sampling tasks (each from one study) into a batch, as the local sampler does
    for batch in shard.iter_torch_batches(batch_size=tcfg.batch_size, drop_last=True,
                                          local_shuffle_buffer_size=int(config["shuffle_buffer"])):
        if trainer.step >= tcfg.iterations:
            break
        x = batch["patch"].unsqueeze(1).to(device, torch.float32)
        budget = budget or TimeBudget(tcfg.max_minutes)  # from the first update, not the stream's start
        if budget.limited and tcfg.lr_decay_at > 0 and not trainer.lr_decayed_by_clock:
            # every rank decays at the same update, or their weights part
            trainer.lr_decayed_by_clock = _any_rank(budget.fraction_spent() > tcfg.lr_decay_at, device)
        m = trainer.train_step(x)
        step = trainer.step
        metrics = {"studies_per_batch": len(torch.unique(batch["study"])),
                   "train_bits_per_dim": float(m["bits_per_dim"]), "loss": float(m["loss"]),
                   "lr": float(m["lr"]), "grad_norm": float(m.get("grad_norm", float("nan"))),
                   "skipped_steps": trainer.skipped_steps}
        out_of_time = budget.limited and _any_rank(budget.spent(), device)
        done = step >= tcfg.iterations or out_of_time
        if out_of_time and step < tcfg.iterations:
            metrics["stopped_by_time_budget"] = 1.0
            if rank == 0:
                print(f"[rank 0] train.max_minutes = {tcfg.max_minutes:g} spent at step {step} of "
                      f"{tcfg.iterations}: saving the model here", flush=True)
        if val is not None and tcfg.val_every and (step % tcfg.val_every == 0 or done) and not m["skipped"]:
            metrics["val_bits_per_dim"] = trainer.validate(val)
        if client is not None and (step % log_every == 0 or done or "val_bits_per_dim" in metrics):
            _log_to_mlflow(client, config["mlflow_run_id"], step, metrics)
        if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and not m["skipped"]) or done:
            metrics["step"] = step
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    trainer.save_checkpoint(Path(tmp) / CHECKPOINT_NAME)
                    (Path(tmp) / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
        if done:
            break
    if trainer.step < tcfg.iterations and not out_of_time:
        raise RuntimeError(f"the patch stream ended at step {trainer.step} of {tcfg.iterations}: "
                           "raise the number of sampled patches")


def cpus_left_for_data(cluster_cpus: float, num_workers: int, cpus_per_worker: float) -> int:
    """Whole CPUs Ray Data may use beside the trainers. Ray 2.60's autoscaling coordinator gives Ray Data only
    whole CPUs of what Train leaves (``amount // n``: 0.5 left is 0), and a patch sampler with no CPU never runs
    while the trainer waits for its patches. Per node on a real cluster; this is the single-node bound."""
    return int(math.floor(cluster_cpus - num_workers * cpus_per_worker + 1e-9))


def check_cpus_left_for_data(cluster_cpus: float, num_workers: int, cpus_per_worker: float) -> None:
    if cpus_left_for_data(cluster_cpus, num_workers, cpus_per_worker) < 1:
        left = cluster_cpus - num_workers * cpus_per_worker
        raise ValueError(
            f"ray.num_workers={num_workers} × ray.cpus_per_worker={cpus_per_worker:g} leaves "
            f"{left:g} of the cluster's {cluster_cpus:g} CPUs, and Ray Data "
            "is given only whole CPUs: the patch sampler would never run and training would hang. Lower "
            "ray.cpus_per_worker (ray.torch_threads sets the threads) so that at least one whole CPU is left.")


def fit(job_cfg, train_ds, init_patches: str, val_patches: str | None, mlflow_run_id: str | None,
        mlflow_tracking_uri: str | None, storage_path: str, run_name: str, train: dict | None = None):
    """Run (or resume) TorchTrainer; returns the Ray Train ``Result``. ``train``: the train section the workers
    get, where the driver has resolved it (default: the job's)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = job_cfg.ray
    use_gpu = bool(r.get("use_gpu"))
    if not use_gpu:
        check_cpus_left_for_data(float(ray.cluster_resources().get("CPU", 0)), int(r.get("num_workers", 1)),
                                 float(r.get("cpus_per_worker", 1)))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": train or job_cfg.train_config().to_dict(), "init_patches": init_patches,
            "val_patches": val_patches, "mlflow_run_id": mlflow_run_id,
            "mlflow_tracking_uri": mlflow_tracking_uri, "log_every": r.get("log_every", 10),
            # ray.torch_threads, else one per CPU the worker holds (N workers sharing a node: no oversubscription)
            "torch_threads": int(r.get("torch_threads") or max(1, int(float(r.get("cpus_per_worker", 1))))),
            "shuffle_buffer": int(r["shuffle_buffer"]),
        },
        scaling_config=ScalingConfig(
            num_workers=int(r.get("num_workers", 1)), use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": float(r.get("cpus_per_worker", 1))}),
        torch_config=TorchConfig(backend=r.get("backend") or ("nccl" if use_gpu else "gloo")),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=int(r.get("max_failures", 1))),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_ds},
    )
    return trainer.fit()
