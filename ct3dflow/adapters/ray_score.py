"""Ray Data adapter of a scoring run (:mod:`ct3dflow.detect.batch`): a CPU task pool prepares the studies
(skip what is done, preprocess into the cache), a pool of actors holding the model scores them.

The nightly screening and the tune and evaluate jobs' validation and test scoring all run through
:func:`run_scoring`, so they share one scorer and one resume rule. Scoring actors take a GPU each when the
cluster has GPUs (``ray.use_gpu: auto``), else CPUs; a task asking for a GPU the cluster lacks would wait
forever, so that is never asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pandas as pd
import ray

from ..detect.batch import STREAM_KEYS, Scorer, ScoringPlan, compact_results, prepare_item
from .model_ref import ModelRef


def log(msg: str) -> None:
    line = f"[ct3dflow] {msg}"
    try:
        print(line, flush=True)
    except UnicodeEncodeError:  # a driver whose locale is ASCII must still log, not crash
        print(line.encode("ascii", "backslashreplace").decode("ascii"), flush=True)


class ScoringActor:
    """A Ray actor holding the model (loaded once) around the core :class:`ct3dflow.detect.batch.Scorer`."""

    def __init__(self, ref: dict, plan: dict, use_gpu: bool, model=None, threads: int | None = None):
        import torch

        self.ref = ModelRef(**ref)
        if isinstance(model, list):  # [ObjectRef]: the driver's model through the object store
            model = ray.get(model[0])
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        # ray.scoring_threads; else Ray's OMP_NUM_THREADS, one per whole CPU the actor holds (at least one)
        threads = threads or os.environ.get("CT3DFLOW_TORCH_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        self.scorer = Scorer(plan, model if model is not None else self.ref.load(), device)
        log(f"scoring actor pid {os.getpid()} loaded {self.ref.version} on {device} ({self.scorer.kind.name} map, "
            f"{torch.get_num_threads()} torch thread(s))")

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        with torch.no_grad():
            out = [self.scorer(item) for item in batch.to_dict("records")]
        return pd.DataFrame(out, columns=list(STREAM_KEYS))


def gpu_plan(ray_cfg: dict) -> tuple[bool, float]:
    """(use GPUs, GPUs in the cluster): never ask for GPUs a cluster does not have (it would hang)."""
    gpus = float(ray.cluster_resources().get("GPU", 0) or 0)
    want = ray_cfg.get("use_gpu", "auto")
    want = str(want).lower() if want is not None else "auto"
    if want in ("auto", "none", ""):
        return gpus >= 1, gpus
    if want in ("true", "1", "yes"):
        if gpus < 1:
            log("WARNING: ray.use_gpu is true but the cluster has no GPU: scoring on CPU actors instead "
                "(a task asking for a GPU would wait forever)")
            return False, gpus
        return True, gpus
    return False, gpus


def scoring_threads(ray_cfg: dict) -> int | None:
    """``ray.scoring_threads``: torch threads per scoring actor (None: Ray's default, one per whole CPU it holds).
    More threads than the actor's CPUs oversubscribe the node: on 2 cores one actor of 2 threads was slower
    than two actors of one (0.79× against 0.94× of a 2-thread loop, docs/BENCHMARKS.md); the setting is for
    nodes where Ray's count is not what the hardware wants (e.g. fractional CPUs on a big node)."""
    v = ray_cfg.get("scoring_threads")
    if v in (None, "", 0):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
        raise ValueError(f"ray.scoring_threads must be a whole number ≥ 1 (torch threads per scoring actor), got {v!r}")
    return int(v)


def run_scoring(entries: list[dict], plan: ScoringPlan, ref: ModelRef, ray_cfg: dict,
                on_row: Callable[[int, int, dict], None] | None = None, before=None, after=None, model=None
                ) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Prepare and score ``entries`` on the cluster; returns ``(results, outcomes by entry)`` (results are
    also written to ``plan.results_dir``). ``before`` / ``after`` are ``(fn, kwargs)`` of an extra Ray Data
    task stage before the preparation (e.g. a PACS retrieval) and after the scoring (e.g. the write-back).
    ``model``: the model the driver loaded for ``ref``; the actors then take it from the object store
    instead of each loading it from the registry (the same weights: ``ref`` pins the version)."""
    from .ray_data import configure_data_context

    outcomes: dict[str, dict] = {}
    if entries:
        use_gpu, gpus = gpu_plan(ray_cfg)
        n_actors = max(1, int(ray_cfg.get("scoring_actors", 1)))
        if use_gpu:
            n_actors = min(n_actors, int(gpus))
        n_pre = max(1, int(ray_cfg.get("preprocess_workers", 2)))
        pre_cpus = float(ray_cfg.get("preprocess_cpus", 1))
        score_cpus = float(ray_cfg.get("scoring_cpus", 1))
        cpus = float(ray.cluster_resources().get("CPU", 0) or 0)
        if cpus and n_actors * score_cpus + pre_cpus > cpus:
            # actors hold their CPUs for the whole run: leave room for a preprocessing task, or it waits forever
            score_cpus = pre_cpus = round(cpus / (n_actors + 1), 3)
        threads = scoring_threads(ray_cfg)
        log(f"{len(entries)} studies: {n_pre} preprocessing task(s) of {pre_cpus:g} CPU, {n_actors} scoring "
            f"actor(s) on {'GPU' if use_gpu else f'{score_cpus:g} CPU'}"
            f"{f', {threads} torch threads each' if threads else ''} (cluster CPUs {cpus:g}, GPUs {gpus:g}); "
            f"{plan.kind} map {plan.settings}")
        configure_data_context()
        ds = ray.data.from_items(entries, override_num_blocks=len(entries))
        tasks = {"num_cpus": pre_cpus, "compute": ray.data.TaskPoolStrategy(size=n_pre)}
        if before:
            ds = ds.map(before[0], fn_kwargs=before[1], **tasks)
        ds = ds.map(prepare_item, fn_kwargs={"plan": plan.to_dict()}, **tasks)
        ds = ds.map_batches(
            ScoringActor, batch_format="pandas", batch_size=int(ray_cfg.get("studies_per_batch", 1)),
            fn_constructor_kwargs={"ref": ref.to_dict(), "plan": plan.to_dict(), "use_gpu": use_gpu,
                                   # in a list: Ray would not resolve a nested ObjectRef by itself
                                   "model": None if model is None else [ray.put(model.cpu().eval())],
                                   "threads": threads},
            num_gpus=1 if use_gpu else 0, num_cpus=score_cpus, compute=ray.data.ActorPoolStrategy(size=n_actors),
            max_restarts=int(ray_cfg.get("actor_max_restarts", -1)),
            max_task_retries=int(ray_cfg.get("actor_max_task_retries", -1)),
        )
        if after:
            ds = ds.map(after[0], fn_kwargs=after[1], **tasks)
        for i, row in enumerate(ds.iter_rows(), 1):
            outcomes[row["entry"]] = row
            if on_row:
                on_row(i, len(entries), row)
    return compact_results(plan.results_dir, entries, outcomes), outcomes


def describe_outcome(row: dict) -> str:
    """What happened to one study, for the job log."""
    if row["status"] == "error":
        return f"error: {row['error']}"
    if row["action"] == "skip":
        return "skipped (already scored)"
    flag = " (flagged)" if row.get("predicted_abnormal") == "True" else ""
    vol = f", {row['abnormal_volume_cm3']} cm³" if row.get("abnormal_volume_cm3") else ""
    return f"scored{vol}{flag}"
