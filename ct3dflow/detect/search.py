"""One search for the operating point, on validation studies only (DESIGN §4.9), for every map kind.

* **Trials**: each point of the kind's space (σ, τ, v_min) gives every validation study an abnormal volume.
* **Objective**: the validation AUROC of those volumes, plus ``1e-3 ×`` F1 at the chosen T (F1 breaks AUROC
  ties). A trial without both classes, or with a constant volume, scores AUROC 0.5.
* **T** is read off the validation ROC of the volumes inside each trial, not searched: for fixed σ, τ,
  v_min one pass over the sorted volumes finds it exactly, and AUROC does not depend on it. The rule is the
  operating point's: ``best_f1`` (ties to the larger T), ``youden`` (the most sensitivity + specificity, ties to
  the larger T) or ``specificity`` (the lowest T whose validation specificity reaches a target, for a hospital
  that sets one). ``t_range`` clips it.
* **One tie-break**: the highest objective; exact ties go to the kind's stricter, simpler setting
  (:attr:`MapKind.tie_break`: smaller σ, the τ that flags less, larger v_min), so the choice does not depend
  on the order trials finished in. ``ct3dflow tune-local`` and the Ray Tune job call :func:`evaluate_params`
  and :func:`best_trial` alike, and therefore pick the same point from the same trials.
* Maps depend only on the kind's ``map_params`` (σ): a grid search builds them, and the healthy reference,
  once per value.
* **Cross-fitted reference** (not in the paper): the healthy reference is fitted on validation normals and the
  search scores validation normals, so fitted and scored on the *same* normals every normal looks typical, the
  validation AUROC is optimistic (the more a reference can bend, the more) and T comes out too low
  (docs/RESULTS.md: anatomy bands 1.000 on validation, 0.745 on test; test specificity 0.125 at a
  "specificity 0.9" T). So the validation studies are dealt into ``folds`` folds (normals and abnormal ones
  round-robin in study-id order) and each fold's maps use a reference fitted on the normals of the other
  folds: no normal is judged by a reference that has seen it. The operating point then stores the reference
  refitted on *all* validation normals, as a hospital would use it. ``folds=1`` is the in-sample search of
  before.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..metrics import choose_threshold, patient_metrics
from .decision import abnormal_region
from .kind import MapKind
from .operating_point import THRESHOLD_RULES, OperatingPoint

REPORTED = ("objective", "auroc", "f1", "accuracy", "sensitivity", "specificity", "threshold_cm3")


@dataclass
class ScoredStudy:
    """What the search and the evaluation need of one study: label, mask, spacing and its stored score."""

    study_id: str
    label: int | None
    pathology: str | None
    permissive: np.ndarray
    spacing: tuple
    score: object


def threshold_rule(rule: dict | str | None = None, target: float | None = None) -> dict:
    """``{"rule": "best_f1"}``, ``{"rule": "youden"}`` (the most sensitivity + specificity: never "flag every
    study" while the map ranks at all, which best F1 can be on a weak map with many abnormal studies) or
    ``{"rule": "specificity", "target": 0.9}`` from a config value."""
    if isinstance(rule, dict):
        rule, target = rule.get("rule"), rule.get("target", target)
    rule = rule or "best_f1"
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}: use one of {THRESHOLD_RULES}")
    if rule == "specificity":
        if target is None or not 0.0 < float(target) <= 1.0:
            raise ValueError("the specificity rule needs a target in (0, 1], e.g. tune.target_specificity: 0.9")
        return {"rule": "specificity", "target": float(target)}
    return {"rule": rule}


def choose_T(y, volumes, rule: dict, t_range=(0.0, math.inf)) -> float:
    """T from the validation volumes by the operating point's rule, clipped to ``t_range``."""
    rule = threshold_rule(rule)
    if rule["rule"] == "specificity":
        t = choose_threshold(y, volumes, criterion="specificity", target=rule["target"])
    elif rule["rule"] == "youden":
        t = choose_threshold(y, volumes, criterion="youden")
    else:
        t = choose_threshold(y, volumes, criterion="f1")
    lo, hi = t_range
    return float(np.clip(t, max(float(lo), 0.0), float(hi)))


def check_studies(kind: MapKind, studies: list[ScoredStudy]) -> dict:
    """Both classes, labelled; every score made with the same settings. Returns those settings."""
    labels = {s.label for s in studies}
    if labels != {0, 1}:
        raise ValueError(f"the validation split needs labelled normal and abnormal studies that scored ok; it has "
                         f"labels {sorted(labels, key=str)} over {len(studies)} studies: add labelled validation rows")
    made = {tuple(sorted(kind.score_settings(s.score).items())) for s in studies}
    if len(made) != 1:
        raise ValueError(f"the validation {kind.name} scores were made with different settings {sorted(made)}; "
                         "score them again with one setting")
    return dict(made.pop())


DEFAULT_REFERENCE_FOLDS = 4


def reference_folds(studies: list[ScoredStudy], folds: int = DEFAULT_REFERENCE_FOLDS) -> tuple[np.ndarray, int]:
    """The cross-fitting fold of every study and the number of folds used (module docstring).

    Normals and abnormal studies are dealt round-robin in study-id order, each class on its own, so the folds
    do not depend on the order the studies came in. With fewer normals than ``folds`` each normal is its own
    fold (leave one out); with a single normal there is nothing to hold out and the search is in-sample."""
    folds = int(folds)
    if folds < 1:
        raise ValueError(f"reference_folds = {folds}: use 1 (in-sample reference) or more (cross-fitted, e.g. 4)")
    healthy = sorted((i for i, s in enumerate(studies) if s.label == 0), key=lambda i: studies[i].study_id)
    other = sorted((i for i, s in enumerate(studies) if s.label != 0), key=lambda i: studies[i].study_id)
    k = min(folds, len(healthy))
    fold = np.zeros(len(studies), dtype=int)
    if k < 2:
        return fold, 1
    for group in (healthy, other):
        for j, i in enumerate(group):
            fold[i] = j % k
    return fold, k


class MapCache:
    """The references and the atypicality maps of every study, per value of the kind's ``map_params``.

    ``get`` gives each study the reference of its cross-fitting fold (fitted without that fold's normals) and
    its map under that reference; ``full_reference`` is the one fitted on every validation normal."""

    def __init__(self, kind: MapKind, studies: list[ScoredStudy], keep: int = 1,
                 folds: int = DEFAULT_REFERENCE_FOLDS):
        self.kind, self.studies, self.keep = kind, studies, keep
        self.fold, self.folds = reference_folds(studies, folds)
        self._store: dict[tuple, tuple[list[dict], list[np.ndarray]]] = {}
        self._refs: dict[tuple, dict] = {}  # the references of the latest reference key, by fold

    def _key(self, params: dict, names=None) -> tuple:
        return tuple(float(params[p]) for p in (names or self.kind.map_params))

    def _by_fold(self, params: dict) -> dict:
        """Each fold's reference; refitted only when the kind's ``reference_params`` change."""
        key = self._key(params, self.kind.reference_params)
        if key not in self._refs:
            self._refs.clear()
            self._refs[key] = ({0: self._fit(params, None)} if self.folds == 1
                               else {k: self._fit(params, k) for k in range(self.folds)})
        return self._refs[key]

    def _fit(self, params: dict, held_out: int | None) -> dict:
        healthy = [s for i, s in enumerate(self.studies) if s.label == 0 and self.fold[i] != held_out]
        if not healthy:
            raise ValueError("the validation split has no healthy study: the reference is fitted on healthy ones")
        return self.kind.fit_reference([s.score for s in healthy], [s.permissive for s in healthy], params)

    def full_reference(self, params: dict) -> dict:
        if self.folds == 1:
            return self.get(params)[0][0]
        return self._fit(params, None)

    def get(self, params: dict) -> tuple[list[dict], list[np.ndarray]]:
        """``(reference of each study, map of each study)`` at ``params``."""
        key = self._key(params)
        if key not in self._store:
            if len(self._store) >= self.keep:  # maps are large: keep one σ at a time
                self._store.clear()
            by_fold = self._by_fold(params)
            refs = [by_fold[int(k)] for k in self.fold]
            maps = [self.kind.atypicality(s.score, s.permissive, params, r)
                    for s, r in zip(self.studies, refs, strict=True)]
            self._store[key] = (refs, maps)
        return self._store[key]


def trial_volumes(kind: MapKind, studies, params: dict, cache: MapCache | None = None,
                  folds: int = DEFAULT_REFERENCE_FOLDS) -> np.ndarray:
    """Every study's abnormal volume at ``params``, each judged by its fold's reference."""
    cache = cache or MapCache(kind, studies, folds=folds)
    refs, maps = cache.get(params)
    return np.array([abnormal_region(m, s.permissive, kind.level(params, r), float(params["v_min_cm3"]),
                                     s.spacing)[0]
                     for m, s, r in zip(maps, studies, refs, strict=True)])


def evaluate_params(kind: MapKind, studies, params: dict, rule: dict | None = None, t_range=(0.0, math.inf),
                    cache: MapCache | None = None, folds: int = DEFAULT_REFERENCE_FOLDS) -> dict:
    """One trial: the searched parameters with the validation metrics, T and the objective."""
    y = np.array([s.label for s in studies])
    vols = trial_volumes(kind, studies, params, cache, folds)
    t = choose_T(y, vols, rule or {"rule": "best_f1"}, t_range)
    m = patient_metrics(y, vols, t)
    auroc = 0.5 if not np.isfinite(m["auroc"]) else float(m["auroc"])
    out = {k: float(params[k]) for k in kind.space}
    out.update(auroc=auroc, f1=float(m["f1"]), accuracy=float(m["accuracy"]), sensitivity=float(m["sensitivity"]),
               specificity=float(m["specificity"]), threshold_cm3=t, objective=auroc + 1e-3 * float(m["f1"]))
    return out


def best_trial(kind: MapKind, trials: pd.DataFrame) -> pd.Series:
    """The best row: highest objective; exact ties by the kind's ``tie_break`` (module docstring)."""
    ok = trials[np.isfinite(trials["objective"].astype(float))]
    if ok.empty:
        raise RuntimeError("no trial reported a finite objective; see the trial errors")
    key = ok.assign(_obj=(-ok["objective"].astype(float)).round(12))
    cols, asc = ["_obj"], [True]
    for name, order in kind.tie_break:
        cols.append(name)
        asc.append(order == "asc")
    return key.sort_values(cols, ascending=asc, kind="stable").drop(columns="_obj").iloc[0]


def grid(space: dict) -> list[dict]:
    """Every point of a ``{name: [values]}`` space, in sorted order."""
    names = list(space)
    return [dict(zip(names, v, strict=True)) for v in sorted(itertools.product(*(space[n] for n in names)))]


def operating_point(kind: MapKind, studies, params: dict, scoring: dict, rule: dict | None = None,
                    t_range=(0.0, math.inf), folds: int = DEFAULT_REFERENCE_FOLDS,
                    cache: MapCache | None = None) -> OperatingPoint:
    """The operating point at ``params``: T by the rule and what it scored on validation, both from the
    cross-fitted maps the search saw, and the reference refitted on every healthy validation study."""
    rule = threshold_rule(rule)
    y = np.array([s.label for s in studies])
    params = {k: float(params[k]) for k in kind.space}
    cache = cache or MapCache(kind, studies, folds=folds)
    vols = trial_volumes(kind, studies, params, cache)
    t = choose_T(y, vols, rule, t_range)
    m = patient_metrics(y, vols, t)
    val = {k: float(m[k]) for k in ("auroc", "f1", "accuracy", "sensitivity", "specificity")}
    val.update(n=int(len(y)), n_abnormal=int(y.sum()), reference_folds=int(cache.folds),
               normal_volume_median_cm3=float(np.median(vols[y == 0])))
    return OperatingPoint(kind.name, params, t, cache.full_reference(params), dict(scoring), rule, val)


def grid_search(kind: MapKind, studies, space: dict | None = None, rule: dict | None = None,
                t_range=(0.0, math.inf), max_trials: int | None = None, seed: int = 0,
                folds: int = DEFAULT_REFERENCE_FOLDS) -> tuple[OperatingPoint, pd.DataFrame]:
    """Every point of ``space`` (default: the kind's) on the validation studies; returns the operating point
    and the trials, best first. This is ``ct3dflow tune-local``; the Ray Tune job samples the same trials."""
    scoring = check_studies(kind, studies)
    space = {**kind.space, **(space or {})}
    points = grid(space)
    if max_trials and len(points) > max_trials:
        rng = np.random.default_rng(seed)
        points = [points[i] for i in sorted(rng.choice(len(points), max_trials, replace=False))]
    cache = MapCache(kind, studies, folds=folds)
    trials = pd.DataFrame([evaluate_params(kind, studies, p, rule, t_range, cache) for p in points])
    best = best_trial(kind, trials)
    op = operating_point(kind, studies, best.to_dict(), scoring, rule, t_range, cache=cache)
    return op, order_trials(trials, best)


def order_trials(trials: pd.DataFrame, best: pd.Series) -> pd.DataFrame:
    """The chosen trial first, the others by objective."""
    first = trials.index == best.name
    return (trials.assign(_b=first).sort_values(["_b", "objective"], ascending=False, kind="stable")
            .drop(columns="_b").reset_index(drop=True))
