"""docs/img/transfer-ground-glass-a-to-b.png: two ground-glass lesions of family B that A→B misses, before and
after site adaptation (issue 16). Reads the stored maps and operating points of two ``experiments/transfer.py``
runs (docs/RESULTS.md has their commands):

    .venv/bin/python experiments/figure_ground_glass.py
"""

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from detection import lesion_on_grid  # noqa: E402

from ct3dflow.cache import StudyCache  # noqa: E402
from ct3dflow.detect import OperatingPoint  # noqa: E402
from ct3dflow.detect.anatomy_map import AnatomyMap  # noqa: E402
from ct3dflow.detect.voxel_map import VoxelScore  # noqa: E402
from ct3dflow.pipeline import manifest_rows  # noqa: E402

EXP = ROOT / "work" / "experiments"
STUDIES = ("phantom-b-8-0003", "phantom-b-8-0041")
MODELS = (("transfer-2711", "model A as trained"), ("transfer-adapt400", "model A adapted to B (400 steps)"))


def main() -> None:
    np.seterr(all="ignore")
    data = EXP / "det-b"
    rows = {r["study_id"]: r for r in manifest_rows(data / "archive" / "manifest.parquet")}
    kind = AnatomyMap()  # anatomy-mad, the platform's reference
    fig, axes = plt.subplots(len(STUDIES), 3, figsize=(12, 4.0 * len(STUDIES)))
    for i, sid in enumerate(STUDIES):
        st = StudyCache(data / "cache").load(sid)
        lesion = lesion_on_grid(rows[sid], st, "small")
        z0 = int(np.argmax(lesion.sum(axis=(1, 2))))  # the axial slice with the most lesion
        axes[i, 0].imshow(st.volume[z0], cmap="gray", vmin=-0.5, vmax=0.5)
        axes[i, 0].contour(lesion[z0], levels=[0.5], colors="yellow", linewidths=1)
        axes[i, 0].set_title(f"{sid}\nground glass {rows[sid]['lesion_volume_cm3']:.1f} cm³ (yellow), axial",
                             fontsize=8)
        for j, (run, title) in enumerate(MODELS):
            r = json.loads((EXP / run / "transfer.json").read_text())["A->B"]
            op = OperatingPoint.from_dict(r["operating_points"]["anatomy-mad"])
            res = pd.read_parquet(EXP / run / "A->B" / "test" / "results.parquet").set_index("study_id")
            vol, _, atyp = kind.decide(VoxelScore.load(res.loc[sid, "score_path"]), st.permissive, st.spacing, op)
            z = -atyp
            ax = axes[i, j + 1]
            ax.imshow(st.volume[z0], cmap="gray", vmin=-0.5, vmax=0.5)
            im = ax.imshow(z[z0], cmap="magma", vmin=0, vmax=op.params["tau_z"] + 1, alpha=0.7)
            ax.contour(lesion[z0], levels=[0.5], colors="yellow", linewidths=1)
            lz = np.nanmedian(z[lesion & np.isfinite(z)])
            ax.set_title(f"{title}\n|z| (τ = {op.params['tau_z']:g}): lesion median {lz:.1f}; {vol:.1f} cm³ flagged",
                         fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.04)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / "transfer-ground-glass-a-to-b.png", dpi=90)


if __name__ == "__main__":
    main()
