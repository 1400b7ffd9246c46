"""From a preprocessed study to a decision: one detection pipeline for every path (no Ray here).

Shaped like MONAI's sliding-window inference, with the decision of the paper after it:

    grid (splitter)  →  kind.score (predictor)  →  kind.atypicality (merger → map)  →  decision (v_min, T)
    grid.py             patch_map.py / voxel_map.py                                     decision.py

* :data:`MAP_KINDS` — the registry of map kinds behind one interface (:class:`MapKind`): ``anatomy`` (the
  coarse-latent voxel map against a healthy reference per band of depth and position in the lung; not in the
  paper), ``anatomy-density`` (the platform default: that map, the aerated lung's parenchyma density, its
  bright blobs and its bite, each against such a reference; not in the paper), ``voxel`` (the same map against
  a depth-banded reference only; not in the paper) and ``patch`` (the paper's Log P map).
* :mod:`.search` — the one operating-point search (objective, T rule, tie-break); :mod:`.evaluate` — the
  one evaluation; :mod:`.operating_point` — the one schema; :mod:`.row` — ``score_row``; :mod:`.batch` —
  a scoring run over many studies with one resume rule (the CLI loops it, the Ray adapter distributes it).
"""

from __future__ import annotations

from .anatomy_map import AnatomyMap
from .density_map import AnatomyDensityMap
from .kind import MapKind
from .operating_point import OperatingPoint
from .patch_map import PatchMap
from .voxel_map import VoxelMap

#: every map kind, by the name configurations and operating points use (``scoring.map``, ``"map"``)
MAP_KINDS: dict[str, MapKind] = {"voxel": VoxelMap(), "anatomy": AnatomyMap(), "anatomy-density": AnatomyDensityMap(),
                                  "patch": PatchMap()}
# anatomy-density, reading the aerated lung, beat anatomy on all 8 stored crosswise, in-domain and adapted runs
# (mean test AUROC 0.711 → 0.815) and on the demo's stored scores (0.758 → 0.812); with the bright blobs 0.911 and
# 0.946, with the lung's bite as well 0.940 and 0.975, its bands split from front to back 0.954 and 0.979 (another
# demo's scores): docs/RESULTS.md, 2026-12-07
DEFAULT_KIND = "anatomy-density"


def get_kind(name: str | None) -> MapKind:
    """The map kind called ``name`` (``None``: the platform default)."""
    name = name or DEFAULT_KIND
    if name not in MAP_KINDS:
        raise ValueError(f"unknown map kind {name!r}: choose one of {sorted(MAP_KINDS)} (scoring.map, --map)")
    return MAP_KINDS[name]


__all__ = ["DEFAULT_KIND", "MAP_KINDS", "MapKind", "OperatingPoint", "get_kind"]
