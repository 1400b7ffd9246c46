"""Ray Tune adapter of the operating-point search (:mod:`ct3dflow.detect.search`), validation only.

The model scores every validation study **once** (the tune job stores the kind's scores under
``work_dir/scores/<model>/v<version>/val/``); each trial only rebuilds maps and abnormal volumes from those
stored scores with :func:`ct3dflow.detect.search.evaluate_params`, the function ``ct3dflow tune-local``
calls too, and the best trial is chosen by the same :func:`~ct3dflow.detect.search.best_trial`. So both
paths choose the identical operating point from the same trials. The studies (masks and scores, no
volumes) go to the object store once, through ``tune.with_parameters``. T is not sampled: each trial reads
it off the validation ROC by the operating point's rule (the search module says why).

The space is the map kind's own (:attr:`MapKind.space`, every value a grid point), overridden per kind in
``cfg.tune.<kind>`` (``tune.anatomy.tau_z: {grid: [3, 4, 5]}``): ``[lo, hi]`` → ``tune.uniform(lo, hi)``;
``{"grid": [...]}`` or a list of other length → ``tune.grid_search``; ``{"choice": [...]}``; a number → fixed.
``num_samples`` (1: each grid point once), ``seed``, ``cpus_per_trial`` (default 1), ``max_concurrent_trials``
(default: as many as the CPUs hold), ``threshold_cm3``
(``[lo, hi]`` clips T), ``threshold_rule`` (``best_f1`` | ``youden`` | ``specificity``), ``target_specificity`` and
``reference_folds`` (the cross-fitting of the healthy reference) are read as well.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..detect import MapKind, OperatingPoint, get_kind
from ..detect.search import (
    DEFAULT_REFERENCE_FOLDS,
    REPORTED,
    best_trial,
    check_studies,
    evaluate_params,
    operating_point,
    order_trials,
)
from ..detect.search import threshold_rule as make_rule

LEGACY_KEYS = ("sigma_vox", "tau_z", "v_min_cm3")


def param_space(kind: MapKind, tune_cfg: dict) -> dict:
    """``cfg.tune`` → a Ray Tune ``param_space`` over the kind's parameters."""
    from ray import tune

    flat = [k for k in LEGACY_KEYS if k in tune_cfg]
    if flat:
        raise ValueError(f"tune.{flat[0]} is given for no map kind: put the search space under the kind, e.g. "
                         f"tune.{kind.name}.{flat[0]} (the voxel kinds and the patch map search different ranges)")
    over = dict(tune_cfg.get(kind.name) or {})
    unknown = sorted(set(over) - set(kind.space))
    if unknown:
        raise ValueError(f"tune.{kind.name} has {unknown}, which the {kind.name} map does not search "
                         f"(it searches {sorted(kind.space)})")
    space = {}
    for k, default in kind.space.items():
        v = over.get(k, {"grid": default})
        if isinstance(v, dict) and "grid" in v:
            space[k] = tune.grid_search([float(x) for x in v["grid"]])
        elif isinstance(v, dict) and "choice" in v:
            space[k] = tune.choice([float(x) for x in v["choice"]])
        elif isinstance(v, list | tuple) and len(v) == 2:
            lo, hi = float(v[0]), float(v[1])
            space[k] = tune.uniform(min(lo, hi), max(lo, hi)) if lo != hi else lo
        elif isinstance(v, list | tuple) and v:
            space[k] = tune.grid_search([float(x) for x in v])
        elif isinstance(v, int | float):
            space[k] = float(v)
        else:
            raise ValueError(f"tune.{kind.name}.{k} = {v!r}: give [lo, hi], {{grid: [...]}}, {{choice: [...]}} or a "
                             "number")
    return space


def threshold_range(tune_cfg: dict) -> tuple[float, float]:
    t = tune_cfg.get("threshold_cm3")
    if isinstance(t, list | tuple) and len(t) == 2:
        return float(min(t)), float(max(t))
    return 0.0, math.inf


def rule_of(tune_cfg: dict) -> dict:
    return make_rule(tune_cfg.get("threshold_rule"), tune_cfg.get("target_specificity"))


def reference_folds_of(tune_cfg: dict) -> int:
    """``tune.reference_folds``: how many folds the healthy reference is cross-fitted over (ct3dflow.detect.search)."""
    return int(tune_cfg.get("reference_folds", DEFAULT_REFERENCE_FOLDS))


def trial(config: dict, kind_name: str = "", studies=None, rule=None, t_range=(0.0, math.inf),
          folds: int = DEFAULT_REFERENCE_FOLDS) -> None:
    """One Tune trial: maps from the stored validation scores, the metrics reported."""
    from ray import tune

    r = evaluate_params(get_kind(kind_name), studies, config, rule, t_range, folds=folds)
    tune.report({k: float(r[k]) for k in REPORTED})


def run_search(kind: MapKind, studies, tune_cfg: dict, storage_path: str | Path, name: str
               ) -> tuple[OperatingPoint, pd.DataFrame, str]:
    """Ray Tune over the kind's space on the validation studies. Returns the operating point, the trials
    (the chosen one first) and the Tune experiment folder."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    scoring = check_studies(kind, studies)
    rule, t_range, folds = rule_of(tune_cfg), threshold_range(tune_cfg), reference_folds_of(tune_cfg)
    fn = tune.with_parameters(trial, kind_name=kind.name, studies=studies, rule=rule, t_range=t_range, folds=folds)
    fn = tune.with_resources(fn, {"cpu": float(tune_cfg.get("cpus_per_trial", 1))})
    tuner = tune.Tuner(
        fn, param_space=param_space(kind, tune_cfg),
        # a trial is seconds of NumPy over stored scores; a fresh actor per trial would cost as much to start
        tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=int(tune_cfg.get("num_samples", 1)),
                                    search_alg=BasicVariantGenerator(  # 0: no limit
                                        random_state=int(tune_cfg.get("seed", 0)),
                                        max_concurrent=int(tune_cfg.get("max_concurrent_trials") or 0)),
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(storage_path).resolve()), verbose=1),
    )
    rows = []
    for res in tuner.fit():
        row = {k: float(res.config[k]) for k in kind.space}
        row.update({k: float((res.metrics or {}).get(k, float("nan"))) for k in REPORTED})
        row["error"] = str(res.error)[:500] if res.error else ""
        rows.append(row)
    trials = pd.DataFrame(rows)
    if trials.empty:
        raise RuntimeError("Ray Tune ran no trial")
    best = best_trial(kind, trials)
    op = operating_point(kind, studies, best.to_dict(), scoring, rule, t_range, folds)
    return op, order_trials(trials, best), str(Path(storage_path).resolve() / name)
