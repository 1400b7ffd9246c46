"""docs/img/transfer-misses-*.png: why crosswise detection misses a kind (issue 16 asks for a preview where a
kind misses). On the stored maps of the 2,711-step run, with ``anatomy-density`` searched on validation as
``experiments/reference_checks.py`` does, it shows for each kind the test study with the least flagged volume:
the CT with the lesion, ``|z_flow|``, ``|z_density|`` (which the decision weighs in at ``density_weight``) and
what was flagged, and prints, over every test study of the kind, where the lesion lies and what the two maps
read in it:

    .venv/bin/python experiments/figure_misses.py      # A→B: consolidation, honeycombing
    .venv/bin/python experiments/figure_misses.py --direction 'B->A' --kinds honeycombing ground_glass \
        --out docs/img/transfer-misses-b-to-a.png

With ``--blobs`` the kind is the platform's default as of 2026-12-07 02:30 UTC (the aerated density and the
bright-blob response, ``z_blob`` in a fifth panel):

    .venv/bin/python experiments/figure_misses.py --blobs --kinds honeycombing consolidation \
        --out docs/img/transfer-misses-blobs-a-to-b.png
    .venv/bin/python experiments/figure_misses.py --blobs --direction 'B->A' --kinds honeycombing nodule \
        --out docs/img/transfer-misses-blobs-b-to-a.png

With ``--bite`` as well, the default as of 2026-12-07 05:00 UTC: the fifth panel is the solid-lesion channel,
``max(z_blob, z_bite)`` (the lung's bite, ``ct3dflow.detect.bite``):

    .venv/bin/python experiments/figure_misses.py --blobs --bite --kinds consolidation ground_glass \
        --out docs/img/transfer-misses-bite-a-to-b.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from detection import lesion_on_grid  # noqa: E402
from reference_checks import studies_of  # noqa: E402
from transfer import SPACE  # noqa: E402

from ct3dflow.cache import StudyCache  # noqa: E402
from ct3dflow.detect.bite import BITE_OPENING  # noqa: E402
from ct3dflow.detect.density_map import AnatomyDensityMap  # noqa: E402
from ct3dflow.detect.search import grid_search  # noqa: E402
from ct3dflow.pipeline import manifest_rows  # noqa: E402

EXP = ROOT / "work" / "experiments"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transfer", default=str(EXP / "transfer-2711"))
    p.add_argument("--direction", default="A->B")
    p.add_argument("--kinds", nargs="+", default=["consolidation", "honeycombing"])
    p.add_argument("--out", default=str(ROOT / "docs" / "img" / "transfer-misses-a-to-b.png"))
    p.add_argument("--blobs", action="store_true",
                   help="the kind with the aerated density (-300 HU) and the bright blobs, as the platform's default")
    p.add_argument("--bite", action="store_true", help="with --blobs: the lung's bite too, in the solid-lesion channel")
    p.add_argument("--feature-cache", default=None, help="reference_checks.py's folder of blob responses")
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    data = EXP / ("det-" + a.direction.split("->")[1].lower())
    rows = {r["study_id"]: r for r in manifest_rows(data / "archive" / "manifest.parquet")}
    cache = StudyCache(data / "cache")
    extra = dict(below_hu=-300.0, blobs=True, feature_cache=a.feature_cache) if a.blobs else {}
    if a.blobs and a.bite:
        extra["bite"] = BITE_OPENING
    solid = "max(z_blob, z_bite)" if "bite" in extra else "z_blob"
    val, test = (studies_of(Path(a.transfer), a.direction, data, s, 50.0, True, **extra) for s in ("val", "test"))
    kind = AnatomyDensityMap()
    op, _ = grid_search(kind, val, SPACE if a.blobs else {**SPACE, "blob_weight": [0.0]})  # without: as before them
    w, tau, sigma = op.params["density_weight"], op.params["tau_z"], op.params["sigma_vox"]
    wb = op.params["blob_weight"]
    print(f"{a.direction}: chosen {op.params}, T {op.threshold_cm3:.2f} cm³")
    n_col = 5 if a.blobs else 4
    fig, axes = plt.subplots(len(a.kinds), n_col, figsize=(4 * n_col, 4.0 * len(a.kinds)), squeeze=False)
    for i, lesion_kind in enumerate(a.kinds):
        found = []
        for s in (s for s in test if s.pathology == lesion_kind):
            st = cache.load(s.study_id, mmap=True)
            lesion = lesion_on_grid(rows[s.study_id], st, "small") & (s.permissive != 0)
            vol, flagged, _ = kind.decide(s.score, s.permissive, s.spacing, op)
            z_flow, z_density, z_blob, z_bite = kind.z_maps(s.score, s.permissive, sigma, op.reference)
            z_blob = np.fmax(z_blob, z_bite)  # the solid-lesion channel (z_bite NaN without --bite)
            in_core = lesion & np.isfinite(z_density)
            found.append(dict(study=s, st=st, lesion=lesion, vol=vol, flagged=flagged, z_flow=z_flow,
                              z_density=z_density, z_blob=z_blob, core=in_core.sum() / max(lesion.sum(), 1),
                              blob=float(np.nanmedian(z_blob[lesion])) if a.blobs else np.nan,
                              blob90=float(np.nanpercentile(z_blob[lesion], 90)) if a.blobs else np.nan,
                              flow=float(np.nanmedian(z_flow[lesion])),
                              density=float(np.nanmedian(w * z_density[in_core])) if in_core.any() else np.nan,
                              raw=float(np.nanmedian(z_density[in_core])) if in_core.any() else np.nan,
                              hit=(flagged & lesion).sum() / max(lesion.sum(), 1),
                              cm3=float(rows[s.study_id]["lesion_volume_cm3"])))
        for f in found:
            print(f"  {lesion_kind} {f['study'].study_id}: lesion {f['cm3']:.1f} cm³, {f['core']:.0%} in the density's "
                  f"core; median |z_flow| {f['flow']:.1f}, |z_density| {f['raw']:.1f} "
                  f"(× weight {w:g}: {f['density']:.1f}; τ {tau:g}); "
                  + (f"{solid} median {f['blob']:.1f}, 90th pct {f['blob90']:.1f} (× {wb:g}); " if a.blobs else "") +
                  f"{f['hit']:.0%} of it flagged; study {f['vol']:.1f} cm³ against T {op.threshold_cm3:.1f}")
        f = min(found, key=lambda f: f["vol"])
        z0 = int(np.argmax(f["lesion"].sum(axis=(1, 2))))  # the axial slice with the most lesion
        panels = ((None, f"{f['study'].study_id}: {lesion_kind} {f['cm3']:.1f} cm³ (yellow)"),
                  ("z_flow", f"|z_flow|: lesion median {f['flow']:.1f}"),
                  ("z_density", f"|z_density| (core only; weighed in × {w:g}): lesion median {f['raw']:.1f}"),
                  *((("z_blob", f"{solid} (× {wb:g}): lesion median {f['blob']:.1f}, 90th pct {f['blob90']:.1f}"),)
                    if a.blobs else ()),
                  ("flagged", f"flagged (|z| > {tau:g}): {f['vol']:.1f} cm³, T {op.threshold_cm3:.1f}"))
        for j, (key, title) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(f["st"].volume[z0], cmap="gray", vmin=-0.5, vmax=0.5)
            if key in ("z_flow", "z_density", "z_blob"):
                im = ax.imshow(f[key][z0], cmap="magma", vmin=0, vmax=tau + 1, alpha=0.7)
                fig.colorbar(im, ax=ax, fraction=0.04)
            elif key == "flagged":
                ax.imshow(np.ma.masked_where(~f["flagged"][z0], f["flagged"][z0]), cmap="autumn", alpha=0.8)
            ax.contour(f["lesion"][z0], levels=[0.5], colors="yellow", linewidths=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{a.direction}, anatomy-density chosen on validation: {op.params}", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
