"""One operating-point schema for every map kind: what the CLI writes, the MLflow model version carries and
the nightly screening applies.

```json
{"schema": "ct3dflow.operating_point/2", "map": "voxel",
 "params": {"sigma_vox": 2.0, "tau_z": 4.0, "v_min_cm3": 0.0}, "threshold_cm3": 1.81,
 "threshold_rule": {"rule": "best_f1"},
 "reference": {...the kind's healthy reference, fitted on validation normals...},
 "scoring": {"stride": 12, "patch_size": 24, "part": "top_latent"},
 "validation": {"auroc": 0.94, "f1": 0.88, "sensitivity": 0.9, "specificity": 0.8, "n": 36, "n_abnormal": 20}}
```

``map`` names the kind (:data:`ct3dflow.detect.MAP_KINDS`); ``params`` are that kind's searched parameters;
``scoring`` is how the scores it was chosen on were made, and a later scoring with this point uses it, so
that the map is the one the point was chosen for. Files written before this schema (the paper map's flat
``{sigma_vox, tau_z, v_min_cm3, threshold_cm3, healthy_mean, healthy_std}`` and the voxel map's
``{"map": "voxel", ..., "reference": {bins, median, scale}}``) are read as well: model versions in a
registry keep the tags they were given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "ct3dflow.operating_point/2"
THRESHOLD_RULES = ("best_f1", "youden", "specificity")
_LEGACY_PATCH = ("sigma_vox", "tau_z", "v_min_cm3", "threshold_cm3", "healthy_mean", "healthy_std")


def describe_rule(rule: dict) -> str:
    """How T was chosen, in words (the CLI, the jobs' logs and the screening report)."""
    name = (rule or {}).get("rule", "best_f1")
    if name == "specificity":
        return f"validation specificity ≥ {rule.get('target'):g}"
    return "best Youden's J on validation" if name == "youden" else "best F1 on validation"


@dataclass
class OperatingPoint:
    map: str
    params: dict
    threshold_cm3: float
    reference: dict
    scoring: dict = field(default_factory=dict)
    threshold_rule: dict = field(default_factory=lambda: {"rule": "best_f1"})
    validation: dict = field(default_factory=dict)

    def param(self, name: str) -> float:
        if name not in self.params:
            raise KeyError(f"the {self.map} operating point has no parameter {name!r} (it has {sorted(self.params)})")
        return float(self.params[name])

    @property
    def v_min_cm3(self) -> float:
        return self.param("v_min_cm3")

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "map": self.map, "params": {k: float(v) for k, v in self.params.items()},
                "threshold_cm3": float(self.threshold_cm3), "threshold_rule": dict(self.threshold_rule),
                "reference": self.reference, "scoring": dict(self.scoring), "validation": dict(self.validation)}

    def flat(self) -> dict:
        """Scalars for MLflow params and metrics: ``map``, each parameter, ``threshold_cm3``, the rule."""
        out = {"map": self.map, **{k: float(v) for k, v in self.params.items()},
               "threshold_cm3": float(self.threshold_cm3), "threshold_rule": self.threshold_rule.get("rule", "")}
        if "target" in self.threshold_rule:
            out["target_specificity"] = float(self.threshold_rule["target"])
        out.update({f"scoring_{k}": v for k, v in self.scoring.items()})
        return out

    def describe(self) -> str:
        ps = ", ".join(f"{k} = {v:g}" for k, v in self.params.items())
        return f"{self.map} map: {ps}, T = {self.threshold_cm3:.3g} cm³ ({describe_rule(self.threshold_rule)})"

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        """The point a dict describes; a field of the wrong shape is an error that names it."""
        again = "write the point again with `ct3dflow tune-local` or the tune job"
        try:
            return cls._from_dict(d)
        except KeyError as exc:
            raise ValueError(f"operating point lacks the field {exc}; {again}") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"operating point has a field of the wrong shape ({exc}); {again}") from None
        except ValueError as exc:
            if str(exc).startswith(("operating point", "an operating point")):
                raise
            raise ValueError(f"operating point has a value of the wrong type ({exc}); {again}") from None

    @classmethod
    def _from_dict(cls, d: dict) -> OperatingPoint:
        if not isinstance(d, dict):
            raise ValueError(f"an operating point is a JSON object, got {type(d).__name__}")
        schema = d.get("schema")
        if schema is not None and schema != SCHEMA:
            raise ValueError(f"operating point schema {schema!r} is not one this version reads ({SCHEMA!r}); "
                             "was it written by a newer ct3dflow? Tune it again with this version")
        if schema == SCHEMA:
            missing = [k for k in ("map", "params", "threshold_cm3", "reference") if k not in d]
            if missing:
                raise ValueError(f"operating point lacks {missing}; write it with `ct3dflow tune-local` or the tune "
                                 "job")
            rule = d.get("threshold_rule") or {"rule": "best_f1"}
            rule = {"rule": rule} if isinstance(rule, str) else dict(rule)
            if rule.get("rule") not in THRESHOLD_RULES:
                raise ValueError(f"operating point: unknown threshold rule {rule.get('rule')!r}; known: "
                                 f"{THRESHOLD_RULES}")
            if rule["rule"] == "specificity" and not isinstance(rule.get("target"), int | float):
                raise ValueError("operating point: the specificity rule needs its target, e.g. "
                                 '"threshold_rule": {"rule": "specificity", "target": 0.9}')
            return cls(str(d["map"]), {k: float(v) for k, v in d["params"].items()}, float(d["threshold_cm3"]),
                       d["reference"], dict(d.get("scoring") or {}), rule, dict(d.get("validation") or {}))
        if d.get("map") == "voxel":  # session 3's voxel-map files
            params = {k: float(d[k]) for k in ("sigma_vox", "tau_z", "v_min_cm3")}
            return cls("voxel", params, float(d["threshold_cm3"]), d["reference"],
                       {"stride": int(d.get("stride", 6)), "part": str(d.get("part", "top_latent"))})
        missing = [k for k in _LEGACY_PATCH if d.get(k) is None]
        if missing:
            raise ValueError(f"operating point lacks {missing}; write it with `ct3dflow tune-local` or the tune job")
        params = {k: float(d[k]) for k in ("sigma_vox", "tau_z", "v_min_cm3")}
        return cls("patch", params, float(d["threshold_cm3"]),
                   {"mean": float(d["healthy_mean"]), "std": float(d["healthy_std"])})

    @classmethod
    def load(cls, path_or_dict) -> OperatingPoint:
        if isinstance(path_or_dict, OperatingPoint):
            return path_or_dict
        if isinstance(path_or_dict, dict):
            return cls.from_dict(path_or_dict)
        p = Path(path_or_dict)
        if not p.is_file():
            raise FileNotFoundError(f"operating point {p} not found: write one with `ct3dflow tune-local`")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"operating point {p} is not JSON ({exc}): give the operating_point.json that "
                             "`ct3dflow tune-local` or the tune job wrote") from None
        try:
            return cls.from_dict(d)
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None

    def save(self, path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return p
