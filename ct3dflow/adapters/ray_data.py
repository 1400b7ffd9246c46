"""Ray Data adapters: parallel preprocessing into the cache, and the stream of training patches.

Both call the core's per-study functions (``pipeline.preprocess_row``, ``patches.sample_patch_corners``);
nothing here re-implements the science. Per-study errors are caught inside the map functions and become
error rows: ``DataContext.max_errored_blocks`` would drop whole blocks, not rows.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import ray
from ray.data import DataContext
from ray.data._internal.execution.execution_callback import ExecutionCallback

from ..cache import StudyCache
from ..patches import extract_patches, sample_patch_corners, valid_patch_corners
from ..pipeline import SUMMARY_COLUMNS, manifest_rows, preprocess_row

MIN_STEP_S = 0.01


class SchedulingLoopPace(ExecutionCallback):
    """Keeps Ray Data's scheduling loop from spinning: at most one step of it per ``MIN_STEP_S``.

    Ray Data 2.60's streaming executor blocks in ``ray.wait`` (up to 0.1 s) only until its running tasks are
    done. When the finished ones cannot be read because every operator is backpressured (the training patch
    stream, full, waiting for a trainer slower than its sampler), the loop goes round without blocking and
    holds a whole CPU: on 2 cores the recipe's model then trained at 1.64 s a step in Ray Train, against
    0.23 s in one process (docs/BENCHMARKS.md). This callback runs at every step of that loop; when the last
    step began less than ``MIN_STEP_S`` ago it sleeps the rest. A loop that blocks anyway is not slowed, and
    each step still dispatches and collects everything that is ready, so a pipeline of tasks that take
    tens of milliseconds or more loses nothing.
    """

    def __init__(self):
        self._last = 0.0
        self.slept_s = 0.0  # what the pace has cost this execution, for the record

    def on_execution_step(self, executor) -> None:
        rest = self._last + MIN_STEP_S - time.perf_counter()
        if rest > 0:
            time.sleep(rest)
            self.slept_s += rest
        self._last = time.perf_counter()


def configure_data_context() -> None:
    """The current Ray Data context as every job of ours runs it: no progress bars (job logs are read by
    people: one line per stage beats a redrawn bar per operator), and :class:`SchedulingLoopPace`, so that the
    executor of every dataset made after this (the train job's patch stream in its split coordinator too)
    does not spin while it waits."""
    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = False
    ctx.enable_progress_bars = False
    if SchedulingLoopPace not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(SchedulingLoopPace)


def preprocess_manifest(manifest_path, cache_dir, preprocess_cfg: dict, concurrency: int | None = None
                        ) -> pd.DataFrame:
    """Preprocess every manifest row on Ray CPU workers; one summary row per manifest row."""
    rows = manifest_rows(manifest_path)
    if not rows:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    # one row per block so studies spread over the workers instead of queueing behind each other
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(preprocess_row, fn_kwargs={"cache_dir": str(cache_dir), "cfg": preprocess_cfg},
                num_cpus=1, compute=ray.data.TaskPoolStrategy(size=concurrency))
    out = pd.DataFrame(ds.take_all(), columns=SUMMARY_COLUMNS)
    # keep the manifest's order for people reading the summary
    order = {r["study_id"]: i for i, r in reversed(list(enumerate(rows)))}
    return out.sort_values("study_id", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def _sample_study_patches(batch: dict) -> dict:
    """One task's patches as one block ``{"patch": (n, S, S, S), "study": (n,)}`` (``study``: the study's index in
    the training list, so a trainer can count how many studies its batches mix): a row per patch would cost Ray
    Data more than the sampling itself (docs/BENCHMARKS.md)."""
    out, study_index = [], []
    for i in range(len(batch["study_id"])):
        study = StudyCache(str(batch["cache_dir"][i])).load(str(batch["study_id"][i]), mmap=True)
        size, frac = int(batch["patch_size"][i]), float(batch["min_lung_fraction"][i])
        rng = np.random.default_rng(int(batch["seed"][i]))
        valid = valid_patch_corners(study.strict, size, frac)
        corners = sample_patch_corners(study.strict, size, int(batch["n"][i]), frac, rng, valid_corners=valid)
        out.append(extract_patches(study.volume, corners, size))
        study_index.append(np.full(len(corners), int(batch["study_index"][i]), dtype=np.int32))
    return {"patch": np.concatenate(out).astype(np.float32, copy=False), "study": np.concatenate(study_index)}


def training_patch_dataset(cache_dir, study_ids: list[str], n_patches: int, patch_size: int,
                           min_lung_fraction: float, seed: int = 0, patches_per_task: int = 8,
                           concurrency: int | None = None):
    """A lazily sampled dataset of ``n_patches`` healthy training patches ``{"patch": (S,S,S) float32, "study":
    int32}`` (``study``: an index into ``study_ids``).

    Patches are drawn on the fly from the cached volumes (500,000 stored 48³ patches would be 221 GB);
    each task samples ``patches_per_task`` from one study, studies visited in a seeded random order.
    ``concurrency`` caps the sampling tasks that run at once (None: as many as the free CPUs allow); every
    task runs in a Ray worker process of its own job, and on a small node each costs seconds to start.
    """
    if not study_ids:
        raise ValueError("no training studies: the manifest needs rows with split 'train' that preprocessed ok")
    rng = np.random.default_rng(seed)
    n_tasks = -(-n_patches // patches_per_task)
    picks = rng.choice(len(study_ids), size=n_tasks, replace=True)
    items = [{"cache_dir": str(cache_dir), "study_id": study_ids[i], "study_index": int(i),
              "seed": int(seed * 1_000_003 + t),
              "n": patches_per_task, "patch_size": patch_size, "min_lung_fraction": min_lung_fraction}
             for t, i in enumerate(picks)]
    # a fraction of a CPU: on a small node the trainers hold whole CPUs, and a sampler that waits for a
    # free one would starve them (a deadlock, not an error)
    return ray.data.from_items(items, override_num_blocks=min(len(items), 64)).map_batches(
        _sample_study_patches, batch_size=1, batch_format="numpy", num_cpus=0.25,
        compute=ray.data.TaskPoolStrategy(size=concurrency))
