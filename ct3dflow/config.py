"""One configuration object per job, loaded from a YAML file and printed into the MLflow run.

Sections map onto the core's own settings objects (``preprocess`` → ``PreprocessConfig``, ``train`` →
``TrainConfig``, ``scoring``/``operating_point`` → ``scoring``), so a job never invents its own knobs.
Relative paths are resolved against ``$CT3DFLOW_WORK`` when set (a ``ray job submit`` runs in a temporary
copy of the working directory, so outputs must not land there), else against the current directory.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

_DEFAULTS: dict = {
    "name": "ct3dflow",
    "work_dir": "work/run",
    "data": {"manifest": None, "cache_dir": None},
    "preprocess": {},
    "train": {},
    # preprocess_concurrency / sampling_concurrency: at most this many preprocessing / patch-sampling tasks at
    # once (None: as many as the free CPUs allow; each runs in a Ray worker process of the job's own);
    # patches_per_task: patches a sampling task draws from its one study (≈ 15 ms to load it and find its windows,
    # shared by these); shuffle_buffer: patches a trainer draws its batches from. With the blocks of many tasks a
    # long run makes, a batch of 16 mixes ≈ 12 of 48 studies either way, like the experiment's sampler (a study per
    # patch); in a short run a block is one task, and the buffer alone mixes (MLflow logs studies_per_batch)
    "ray": {"num_workers": 1, "use_gpu": False, "backend": "gloo", "cpus_per_worker": 1,
            "max_failures": 1, "preprocess_concurrency": None, "sampling_concurrency": None,
            "patches_per_task": 8, "shuffle_buffer": 512},
    # map: anatomy-density (the platform default, beyond the paper: the voxel map against a healthy reference per
    # band of depth and position in the lung, and the lung's parenchyma density against its own anatomical
    # reference; docs/RESULTS.md; scoring.density_percentile, default 50, and
    # scoring.density_margin, default 2: voxels inside the strict lung's edge where the density is read, and
    # scoring.density_below_hu, default -300: the aerated lung it reads, or "off"; and the bright-blob response
    # on the permissive lung's core, scoring.blobs, default [1.5, 2.5, 3.5]: its scales in voxels, or "off"; and the
    # lung's bite there, scoring.bite, default 3: the lung's opening in voxels before it is measured, or "off"),
    # anatomy (the flow's map alone), voxel (the same map, depth bands only) or patch (the paper's Log P map);
    # stride and batch size default per kind (voxel kinds 12, patch: patch size - 10); precision (every kind): auto
    # (bf16 autocast where the hardware runs bf16 natively, else fp32), fp32 or bf16
    # voxel kinds: merge: mean (default) or gaussian (overlapping windows weighted towards their centres; unmeasured)
    "scoring": {"map": "anatomy-density", "stride": None, "batch_size": None},
    "operating_point": {},  # a whole operating point (tune-local's JSON) for models without one
    # the search space is the map kind's own; override per kind: tune.anatomy.tau_z: {grid: [3, 4, 5]}
    # reference_folds: the healthy reference is cross-fitted over this many folds of the validation normals
    # (ct3dflow.detect.search; 1 = fitted and judged on the same normals, as before 2026-12-02); threshold_rule:
    # best_f1, youden or specificity (with target_specificity)
    "tune": {"num_samples": 1, "threshold_cm3": None, "threshold_rule": "best_f1", "target_specificity": None,
             "reference_folds": 4, "n_boot": 1000, "seed": 0},
    "mlflow": {"tracking_uri": None, "experiment": None, "registered_model": "ct3dflow-glow3d"},
    # a PACS to screen (docs/PACS.md): url, credentials_file or username_env/password_env, lookback_days
    "source": {},
}


# the keys each section's readers know (train and preprocess: their settings objects check their own); a key
# not here is a typo the job would ignore, so it fails at load (tests/test_config.py holds this list to the code)
KNOWN_KEYS = {
    "data": {"manifest", "cache_dir", "results_dir"},
    "ray": {"num_workers", "use_gpu", "backend", "cpus_per_worker", "max_failures", "log_every", "torch_threads",
            "storage_path", "preprocess_concurrency", "sampling_concurrency", "patches_per_task", "shuffle_buffer",
            "preprocess_workers", "preprocess_cpus", "scoring_actors", "scoring_cpus", "scoring_threads",
            "studies_per_batch", "actor_max_restarts", "actor_max_task_retries"},
    "scoring": {"map", "stride", "batch_size", "precision", "part", "phases", "merge", "patch_size",
                "density_percentile", "density_margin", "density_below_hu", "blobs", "bite"},
    "tune": {"num_samples", "threshold_cm3", "threshold_rule", "target_specificity", "reference_folds", "n_boot",
             "seed", "max_concurrent_trials", "cpus_per_trial"},  # and one search space per map kind
    "mlflow": {"tracking_uri", "experiment", "registered_model", "comparison_experiment", "system_metrics"},
    "source": {"url", "credentials_file", "username_env", "password_env", "lookback_days", "timeout_s"},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_path(p: str | os.PathLike | None) -> Path | None:
    if p is None:
        return None
    p = Path(os.path.expanduser(os.path.expandvars(str(p))))
    if p.is_absolute():
        return p
    return (Path(os.environ.get("CT3DFLOW_WORK", os.getcwd())) / p).resolve()


@dataclass
class JobConfig:
    name: str
    work_dir: str
    data: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    ray: dict = field(default_factory=dict)
    scoring: dict = field(default_factory=dict)
    operating_point: dict = field(default_factory=dict)
    tune: dict = field(default_factory=dict)
    mlflow: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def work_path(self) -> Path:
        return resolve_path(self.work_dir)

    @property
    def manifest_path(self) -> Path:
        return resolve_path(self.data.get("manifest")) or self.work_path / "archive" / "manifest.parquet"

    @property
    def cache_path(self) -> Path:
        return resolve_path(self.data.get("cache_dir")) or self.work_path / "cache"

    @property
    def storage_path(self) -> Path:
        """Ray Train's and Ray Tune's storage (``ray.storage_path``; default ``<work_dir>/ray_results``)."""
        return resolve_path(self.ray.get("storage_path")) or self.work_path / "ray_results"

    # -- core settings objects -----------------------------------------------------------------
    def preprocess_config(self):
        from .preprocess import PreprocessConfig

        return PreprocessConfig.from_dict(self.preprocess)

    def train_config(self):
        from .train import TrainConfig

        return TrainConfig.from_dict(self.train)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _sections(raw: dict, where: str) -> dict:
    """Each section that is a mapping by default as a mapping: an empty one (``train:`` with nothing under it)
    is an empty mapping; a value (``scoring: anatomy``) is an error that names the section."""
    out = dict(raw)
    for k, v in raw.items():
        if isinstance(_DEFAULTS.get(k), dict):
            if v is None:
                out[k] = {}
            elif not isinstance(v, dict):
                raise ValueError(f"section {k} {where} must be a mapping (key: value lines under it), got {v!r}; "
                                 f"e.g. {k}.KEY=VALUE on the command line")
    return out


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> JobConfig:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"configuration file {p} not found: pass --config configs/demo.yaml "
                                    f"or a copy of it")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"configuration file {p} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"configuration file {p} must be a mapping of sections (name:, train:, ray:, …), "
                             f"not a {type(raw).__name__}; start from configs/demo.yaml")
        unknown = set(raw) - set(_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown configuration section(s) {sorted(unknown)} in {p}; "
                             f"known: {sorted(_DEFAULTS)}")
        raw = _sections(raw, f"in {p}")
    merged = _merge(_merge(_DEFAULTS, raw), _sections(overrides or {}, "in --set"))
    cfg = JobConfig(**merged)
    validate(cfg)
    return cfg


def validate(cfg: JobConfig) -> None:
    """Fail at once, naming the setting, rather than deep inside a job: the core settings objects check
    their own types; the scoring map must be a known kind."""
    import difflib

    from .detect import MAP_KINDS
    from .detect.kind import check_precision
    from .detect.search import threshold_rule

    cfg.train_config()
    cfg.preprocess_config()
    for section, known in KNOWN_KEYS.items():
        known = known | (set(MAP_KINDS) if section == "tune" else set())
        for key in sorted(set(getattr(cfg, section)) - known):
            near = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"unknown setting {section}.{key}" + (f": did you mean {section}.{near[0]}?" if near else
                             f"; known: {', '.join(sorted(known))}"))

    kind = cfg.scoring.get("map")
    if kind is not None and (not isinstance(kind, str) or kind not in MAP_KINDS):
        raise ValueError(f"setting scoring.map is {kind!r}; choose one of {sorted(MAP_KINDS)}")
    if cfg.scoring.get("precision") is not None:
        check_precision(cfg.scoring["precision"])
    # the tune job's choices, checked before it scores the validation split rather than after
    threshold_rule(cfg.tune.get("threshold_rule"), cfg.tune.get("target_specificity"))
    for section, key in (("scoring", "stride"), ("scoring", "batch_size"), ("ray", "patches_per_task"),
                         ("ray", "shuffle_buffer"), ("ray", "num_workers"), ("tune", "reference_folds"),
                         ("tune", "num_samples")):
        v = getattr(cfg, section).get(key)
        required = _DEFAULTS[section].get(key) is not None  # else None means "the kind's default"
        if (v is not None or required) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"setting {section}.{key} expects a positive integer, got {v!r}")


def parse_overrides(pairs: list[str] | None) -> dict:
    """``["train.lr=1e-3", "ray.num_workers=2"]`` → nested dict; numbers as people write them, the rest YAML
    (:func:`ct3dflow.settings.parse_value`)."""
    from .settings import parse_value

    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like section.key=value")
        key, value = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        if parts[0] not in _DEFAULTS:
            raise ValueError(f"override {pair!r}: unknown section {parts[0]!r}; known: {sorted(_DEFAULTS)}")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(value)
    return out
