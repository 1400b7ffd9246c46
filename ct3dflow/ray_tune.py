"""Ray Tune adapter: the operating-point search (σ, τ, v_min; T read off the ROC) on validation only.

The flow (or baseline) scores every validation study **once** (``ray_jobs.tune_job`` stores the patch
log-likelihoods under ``work_dir/scores/<model>/v<version>/val/``); each trial only rebuilds Log P maps
and abnormal volumes from those stored scores with :func:`ct3dflow.evaluation.evaluate_params`, the same
function the single-machine ``ct3dflow tune-local`` grid search calls. The studies (masks and patch
scores, no volumes) go to the object store once, through ``tune.with_parameters``.

What is searched and why (DESIGN §4.9):

* **σ** (``sigma_vox``, voxels of the 2 mm grid), **τ** (``tau_z``: standard deviations of the pooled
  patch log-likelihoods of the *healthy validation* studies, ``τ_abs = mean + τ_z·std``, see
  :mod:`ct3dflow.scoring`) and **v_min** (``v_min_cm3``) are sampled by Tune.
* **T is not sampled.** For fixed σ, τ, v_min every validation study has a fixed abnormal volume, and the
  T maximising validation F1 is read off exactly from the ROC of those volumes inside the trial
  (``metrics.choose_threshold``, ties to the larger T). Sampling T as a fourth dimension would only
  approximate, with extra trials, what one pass over the sorted volumes computes exactly — and the
  objective's main term, AUROC, does not depend on T at all. ``tune.threshold_cm3 = [lo, hi]`` in the
  configuration clips T to a plausible range (the paper reports 0.5–20 cm³).
* **Objective**: validation AUROC of the abnormal volume, plus ``1e-3 ×`` F1 at the chosen T (F1 breaks
  AUROC ties). Remaining exact ties are broken towards the stricter, simpler setting: smaller σ, then the
  lower (stricter) τ, then the larger v_min (:func:`best_trial`), so the choice does not depend on the
  order in which Tune finished its trials.

Search-space syntax in ``cfg.tune`` (per parameter): ``[lo, hi]`` → ``tune.uniform(lo, hi)``;
``{"grid": [...]}`` → ``tune.grid_search`` (every value, ``num_samples`` times); ``{"choice": [...]}``;
a number → fixed. ``num_samples``, ``seed`` and ``cpus_per_trial`` (default 1) are read as well.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .evaluation import TuningStudy, evaluate_params, healthy_stats
from .scoring import OperatingPoint

SEARCHED = ("sigma_vox", "tau_z", "v_min_cm3")
REPORTED = ("objective", "auroc", "f1", "accuracy", "threshold_cm3")


def param_space(tune_cfg: dict) -> dict:
    """``cfg.tune`` → a Ray Tune ``param_space`` over σ, τ, v_min."""
    from ray import tune

    space = {}
    for k in SEARCHED:
        v = tune_cfg.get(k)
        if v is None:
            raise ValueError(f"tune.{k} is missing: give a range [lo, hi], {{grid: [...]}} or a value")
        if isinstance(v, dict) and "grid" in v:
            space[k] = tune.grid_search([float(x) for x in v["grid"]])
        elif isinstance(v, dict) and "choice" in v:
            space[k] = tune.choice([float(x) for x in v["choice"]])
        elif isinstance(v, list | tuple) and len(v) == 2:
            lo, hi = float(v[0]), float(v[1])
            space[k] = tune.uniform(min(lo, hi), max(lo, hi)) if lo != hi else lo
        elif isinstance(v, int | float):
            space[k] = float(v)
        else:
            raise ValueError(f"tune.{k} = {v!r}: give [lo, hi], {{grid: [...]}}, {{choice: [...]}} or a number")
    return space


def threshold_range(tune_cfg: dict) -> tuple[float, float]:
    t = tune_cfg.get("threshold_cm3")
    if isinstance(t, list | tuple) and len(t) == 2:
        return float(min(t)), float(max(t))
    return 0.0, math.inf


def trial(config: dict, studies: list[TuningStudy] | None = None, healthy: tuple[float, float] | None = None,
          t_range: tuple[float, float] = (0.0, math.inf)) -> None:
    """One Tune trial: rebuild maps from the stored validation patch scores, report the metrics."""
    from ray import tune

    r = evaluate_params(studies, float(config["sigma_vox"]), float(config["tau_z"]),
                        float(config["v_min_cm3"]), healthy, t_range=t_range)
    tune.report({k: float(r[k]) for k in REPORTED})


def best_trial(trials: pd.DataFrame) -> pd.Series:
    """The best row: highest objective; exact ties → smaller σ, lower τ, larger v_min (documented above)."""
    ok = trials[np.isfinite(trials["objective"].astype(float))]
    if ok.empty:
        raise RuntimeError("no Tune trial reported a finite objective; see the trial errors in the Tune folder")
    key = ok.assign(_obj=(-ok["objective"].astype(float)).round(12), _vmin=-ok["v_min_cm3"].astype(float))
    key = key.sort_values(["_obj", "sigma_vox", "tau_z", "_vmin"], kind="stable")
    return key.drop(columns=["_obj", "_vmin"]).iloc[0]


def run_search(studies: list[TuningStudy], tune_cfg: dict, storage_path: str | Path, name: str
               ) -> tuple[OperatingPoint, pd.DataFrame, str]:
    """Ray Tune over σ, τ, v_min on the validation studies. Returns the best operating point, the trials
    (sorted best first) and the Tune experiment folder."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    labels = {s.label for s in studies}
    if labels != {0, 1}:
        raise ValueError(f"the validation split needs normal and abnormal studies that scored ok; it has labels "
                         f"{sorted(labels)} over {len(studies)} studies: add labelled validation rows")
    healthy = healthy_stats(studies)
    t_range = threshold_range(tune_cfg)
    fn = tune.with_parameters(trial, studies=studies, healthy=healthy, t_range=t_range)
    fn = tune.with_resources(fn, {"cpu": float(tune_cfg.get("cpus_per_trial", 1))})
    tuner = tune.Tuner(
        fn,
        param_space=param_space(tune_cfg),
        tune_config=tune.TuneConfig(
            metric="objective", mode="max", num_samples=int(tune_cfg.get("num_samples", 48)),
            search_alg=BasicVariantGenerator(random_state=int(tune_cfg.get("seed", 0)))),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(storage_path).resolve()), verbose=1),
    )
    results = tuner.fit()
    rows = []
    for res in results:
        row = {k: float(res.config[k]) for k in SEARCHED}
        row.update({k: float((res.metrics or {}).get(k, float("nan"))) for k in REPORTED})
        row["error"] = str(res.error)[:500] if res.error else ""
        rows.append(row)
    trials = pd.DataFrame(rows)
    if trials.empty:
        raise RuntimeError("Ray Tune ran no trial")
    best = best_trial(trials)
    op = OperatingPoint(float(best["sigma_vox"]), float(best["tau_z"]), float(best["v_min_cm3"]),
                        float(best["threshold_cm3"]), *healthy)
    order = trials.assign(_b=trials.index == best.name)
    trials = order.sort_values(["_b", "objective"], ascending=False, kind="stable").drop(columns="_b")
    return op, trials.reset_index(drop=True), str(Path(storage_path).resolve() / name)
