"""MLflow adapter: runs, the model registry, operating points.

A trained flow is logged as an MLflow *pyfunc* whose artifacts are the ``Glow3D.save`` file (weights and
configuration, loaded with ``weights_only=True``) and the preprocessing settings it was trained with.
``mlflow.pytorch``'s default torch.export format would need an input example and drop ``log_prob``; the
pyfunc keeps the real object: ``load_patch_model(uri).model.log_prob(x)``. The operating point chosen by
tuning is stored as a tag on the model version, so every later scoring job picks it up by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from .. import __version__
from .model_ref import ModelRef

OPERATING_POINT_TAG = "ct3dflow.operating_point"
VAL_METRIC_TAG = "ct3dflow.val_bits_per_dim"
CHAMPION = "champion"


def configure(cfg) -> str:
    """Point MLflow at the job's tracking server (config, then $MLFLOW_TRACKING_URI, then local SQLite)."""
    uri = cfg.mlflow.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        db = cfg.work_path / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    mlflow.set_tracking_uri(uri)
    return uri


def code_version() -> str:
    """The git commit when there is one, plus a hash of the package sources (a Ray working dir has no .git)."""
    pkg = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.read_bytes())
    commit = os.environ.get("CT3DFLOW_GIT_COMMIT")
    if not commit:
        with contextlib.suppress(Exception):
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=pkg, capture_output=True,
                                    text=True, timeout=5).stdout.strip()
    return f"{__version__}+{commit or 'nogit'}.src{h.hexdigest()[:10]}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def job_run(cfg, kind: str, run_name: str | None = None, run_id: str | None = None,
            tags: dict | None = None, system_metrics: bool = True):
    """An MLflow run for one job: configuration as params and config.yaml, code version, tags.

    ``run_id`` continues an earlier run (a resumed training job keeps its history).
    """
    configure(cfg)
    experiment = cfg.mlflow.get("experiment") or f"ct3dflow-{kind}"
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id, run_name=run_name, log_system_metrics=system_metrics) as run:
        if run_id is None:
            params = {k: v for k, v in _flatten(cfg.to_dict()).items() if v is not None}
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_text(cfg.to_yaml(), "config.yaml")
        mlflow.set_tags({"ct3dflow.job": kind, "ct3dflow.code_version": code_version(), **(tags or {})})
        yield run


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
class PatchModelPyfunc(mlflow.pyfunc.PythonModel):
    """A patch likelihood model in the registry: ``predict`` returns per-patch log-likelihoods."""

    def load_context(self, context):
        from ..models import load_patch_scorer

        self.model = load_patch_scorer(context.artifacts["model"])
        self.model.eval()
        self.settings = json.loads(Path(context.artifacts["settings"]).read_text(encoding="utf-8"))

    def predict(self, context, model_input, params=None):
        import torch

        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 4:
            x = x[:, None]
        with torch.no_grad():
            return self.model.log_prob(torch.from_numpy(x)).numpy()


@dataclass
class LoadedModel:
    model: object  # has .log_prob(x: (B,1,S,S,S)) -> (B,)
    settings: dict  # {"kind", "preprocess", "patch_size", ...}
    uri: str
    name: str | None
    version: str | None
    operating_point: dict | None


def log_patch_model(model_file: str | Path, settings: dict, registered_name: str | None,
                    val_bits_per_dim: float | None = None) -> str | None:
    """Log the model of the active run as a pyfunc; register it. Returns the registered version."""
    with tempfile.TemporaryDirectory() as tmp:
        sfile = Path(tmp) / "settings.json"
        sfile.write_text(json.dumps(settings, indent=1), encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("mlflow_pyfunc_model.py")),
            artifacts={"model": str(model_file), "settings": str(sfile)},
            pip_requirements=["torch", "numpy", f"ct3dflow=={__version__}"],
            registered_model_name=registered_name,
        )
    version = getattr(info, "registered_model_version", None)
    if registered_name and version is not None and val_bits_per_dim is not None:
        MlflowClient().set_model_version_tag(registered_name, str(version), VAL_METRIC_TAG,
                                             f"{val_bits_per_dim:.6f}")
    return None if version is None else str(version)


def promote_if_best(name: str, version: str, lower_is_better_metric: float) -> bool:
    """Give ``version`` the champion alias when it beats the current champion's validation metric."""
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        best = float(current.tags.get(VAL_METRIC_TAG, "inf"))
    except Exception:  # noqa: BLE001 - no champion yet
        current, best = None, float("inf")
    if current is None or lower_is_better_metric < best:
        client.set_registered_model_alias(name, CHAMPION, str(version))
        return True
    return False


def _resolve_version(uri: str) -> tuple[str | None, str | None]:
    if not uri.startswith("models:/"):
        return None, None
    ref = uri[len("models:/"):]
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, ver = ref.partition("/")
    return name, ver or None


def load_patch_model(uri: str) -> LoadedModel:
    """Load a registered (``models:/NAME@champion``, ``models:/NAME/3``) or run model with its settings."""
    name, version = _resolve_version(uri)
    pinned = f"models:/{name}/{version}" if name and version else uri
    pyfunc = mlflow.pyfunc.load_model(pinned)
    py = pyfunc.unwrap_python_model()
    op = get_operating_point(name, version) if name and version else None
    return LoadedModel(py.model, py.settings, pinned, name, version, op)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_model(spec: str, tracking_uri: str | None = None) -> tuple[ModelRef, object]:
    """``models:/NAME@champion``, ``models:/NAME/3``, ``runs:/…`` or a model ``.pt`` file → (ref, model)."""
    from ..config import resolve_path
    from ..models import load_patch_scorer

    if spec.startswith(("models:/", "runs:/")):
        loaded = load_patch_model(spec)
        version = f"{loaded.name}/{loaded.version}" if loaded.name else loaded.uri
        ref = ModelRef(spec, loaded.uri, version, dict(loaded.settings or {}), loaded.operating_point,
                       tracking_uri=tracking_uri)
        return ref, loaded.model
    path = resolve_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model {spec} not found: pass models:/NAME@champion, models:/NAME/VERSION or the "
                                "path of a saved model (.pt)")
    model = load_patch_scorer(path, map_location="cpu")
    settings = {"patch_size": int(getattr(model, "patch_size", 48))}
    return ModelRef(spec, str(path), f"file-{_file_sha(path)}", settings, None, tracking_uri=tracking_uri), model


def set_operating_point(name: str, version: str, op: dict) -> None:
    MlflowClient().set_model_version_tag(name, str(version), OPERATING_POINT_TAG, json.dumps(op))


def get_operating_point(name: str, version: str) -> dict | None:
    mv = MlflowClient().get_model_version(name, str(version))
    raw = mv.tags.get(OPERATING_POINT_TAG)
    return json.loads(raw) if raw else None
