"""Which model a job scores with, resolved once on the driver (:func:`ct3dflow.adapters.tracking.resolve_model`).

Kept apart from the MLflow adapter so that a scoring actor that is handed the model itself (through the
Ray object store, :func:`ct3dflow.adapters.ray_score.run_scoring`) never imports MLflow: that import and
the pyfunc load cost an actor ≈ 3 s of its start (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ModelRef:
    """A model pinned to one version, so that every Ray actor loads the same: ``uri`` is
    ``models:/NAME/VERSION`` (or ``runs:/…``, or the absolute path of a ``.pt`` file), ``version`` is
    ``NAME/VERSION`` (or ``file-<sha>``)."""

    spec: str  # what the user gave
    uri: str
    version: str
    settings: dict = field(default_factory=dict)
    operating_point: dict | None = None
    op_source: str = "model version tag"
    tracking_uri: str | None = None

    @property
    def is_file(self) -> bool:
        return not self.uri.startswith(("models:/", "runs:/"))

    @property
    def patch_size(self) -> int:
        return int(self.settings.get("patch_size") or 48)

    def load(self):
        """The model object (``.log_prob``; a Glow3D also ``.encode``) from its file or the registry."""
        if self.is_file:
            from ..models import load_patch_scorer

            return load_patch_scorer(self.uri, map_location="cpu")
        import mlflow

        from .tracking import load_patch_model

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        return load_patch_model(self.uri).model

    def to_dict(self) -> dict:
        return asdict(self)
