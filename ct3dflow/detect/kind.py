"""The map-kind seam: one small interface every way of mapping a study implements.

A *kind* is the predictor and the merger of the sliding-window pipeline (the splitter is
:mod:`ct3dflow.detect.grid`), plus what the decision needs to be relative to healthy lungs:

==============================  ===========================================================================
``score(predictor, study, s)``  run the model over the study's windows; returns the kind's *score* object
``save_score`` / ``load_score``  store it per study (``score_file``), so tuning never reruns the model
``fit_reference(scores, masks, params)``  the healthy reference, from validation normals only
``atypicality(score, mask, params, reference)``  the map: low = abnormal, NaN outside the mask
``level(params, reference)``   voxels with ``atypicality < level`` are abnormal
``space`` / ``map_params`` / ``tie_break``  its search space, which parameters the map depends on (the
                                search builds each map once per value; ``reference_params``: the reference, if
                                fewer), and how exact ties are broken
==============================  ===========================================================================

The decision after the map is the same for all kinds (:mod:`ct3dflow.detect.decision`), and so are the
search, the evaluation and the operating-point schema. A new kind is one file with a subclass of
:class:`MapKind` and one entry in :data:`ct3dflow.detect.MAP_KINDS` (docs/ARCHITECTURE.md has the recipe).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .decision import abnormal_region

# scoring.precision of every kind; auto: bf16 autocast where the hardware runs it natively (bf16_available).
# The default: on a realistic chest at stride 12 the voxel map's coupling networks under bf16 autocast took
# 4.0 s instead of 11.4 s on 2 AVX-512-BF16 cores, and the detection experiment chose the same point with the
# same validation AUROC (0.897) as with fp32; the demo's autoencoder scores 2.7× faster with log-likelihoods
# 4e-5 apart (docs/BENCHMARKS.md, docs/RESULTS.md). CPUs without native bf16 stay in fp32.
PRECISIONS = ("fp32", "bf16", "auto")
DEFAULT_PRECISION = "auto"


def check_precision(precision: str) -> str:
    """``scoring.precision`` as given, or the error that names the choices (a config's check and scoring's)."""
    if precision not in PRECISIONS:
        raise ValueError(f"setting scoring.precision is {precision!r}; choose one of {PRECISIONS}")
    return precision


def use_bf16(precision: str, device="cpu") -> bool:
    check_precision(precision)
    from ..flow.dtypes import bf16_available  # torch is imported lazily in this module

    return precision == "bf16" or (precision == "auto" and bf16_available(device))


class MapKind:
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # one line for people: what the map is
    score_file: ClassVar[str] = ""  # per-study file of the stored score
    map_file: ClassVar[str] = ""  # the map as NIfTI, written with an operating point
    space: ClassVar[dict] = {}  # the default search space: {parameter: [values]}
    map_params: ClassVar[tuple] = ("sigma_vox",)
    reference_params: ClassVar[tuple | None] = None  # what the healthy reference depends on (None: map_params)
    tie_break: ClassVar[tuple] = ()  # ((parameter, "asc" | "desc"), ...): stricter and simpler first
    needs_flow: ClassVar[bool] = False  # True: the model must be a Glow3D (not a likelihood proxy)
    # what a stored operating point's ``scoring`` means where it lacks a setting: the value its scores were
    # made with before the setting was recorded, so a later change of default never re-maps an old point
    point_defaults: ClassVar[dict] = {}

    # -------------------------------------------------------------------------------- the predictor
    def settings(self, scoring: dict, patch_size: int) -> dict:
        """The full scoring settings of this kind from a ``scoring`` section (stride, batch size, ...)."""
        raise NotImplementedError

    def prepare(self, model, device):
        """The model as this kind runs it on ``device`` (the fast path on CUDA); called once per scorer."""
        from ..models import prepare_for_scoring

        return prepare_for_scoring(model, device)

    def score(self, predictor, study, settings: dict, device="cpu"):
        raise NotImplementedError

    def save_score(self, score, path):
        return score.save(path)

    def load_score(self, path):
        raise NotImplementedError

    def summary(self, score) -> dict:
        """``n_patches``, ``log_p_min``, ``log_p_mean`` for the results row."""
        raise NotImplementedError

    def score_settings(self, score) -> dict:
        """How a stored score was made (must be the same for all studies of one search)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------- the merger
    def fit_reference(self, scores: list, masks: list, params: dict) -> dict:
        raise NotImplementedError

    def atypicality(self, score, mask, params: dict, reference: dict) -> np.ndarray:
        raise NotImplementedError

    def level(self, params: dict, reference: dict) -> float:
        raise NotImplementedError

    def nifti_fill(self, atypicality: np.ndarray) -> float:
        """What NIfTI readers that turn NaN into 0 should see outside the mask."""
        return 0.0

    # -------------------------------------------------------------------------------- the decision
    def decide(self, score, mask, spacing, op):
        """``(abnormal_volume_cm3, abnormal mask, atypicality map)`` of one study at an operating point."""
        a = self.atypicality(score, mask, op.params, op.reference)
        vol, ab = abnormal_region(a, mask, self.level(op.params, op.reference), op.v_min_cm3, spacing)
        return vol, ab, a

    def __repr__(self) -> str:
        return f"<map kind {self.name!r}>"
