"""What the parenchyma density, the bright blobs and the lung's bite of ``scoring.map: anatomy-density`` add to a
study's scoring and decision.

    .venv/bin/python bench/density.py [--threads 2] [--write-docs]

One realistic chest on the 2 mm grid (a ground-glass phantom of 150 × 180 × 180 voxels, as a 512 × 512 × 300
scan gives), preprocessed as the platform does. Timed in one run, each the best of ``--repeat``:

* the baseline: the ``anatomy`` kind's ``score`` (the flow's voxel map at stride 12, the default precision) with
  an initialised model of the detection architecture (L=3, K=8, width 64, 24³: a trained one runs as fast);
* ``parenchyma_density`` (the separable median over the strict lung's core, 2 voxels inside its edge: 7 voxels
  along z, y, x in turn; over the aerated lung only, as the default reads it, and over every core voxel), what
  ``anatomy-density`` adds to it, beside the full 7³ cube median it stands in for (scipy's ``median_filter``,
  the same nearest-lung filling outside the mask), with their agreement inside the lung;
* ``bright_blobness`` and ``lung_bite`` on the permissive lung's core, which the default adds as well;
* the decision's map at one operating point: ``anatomy``'s atypicality against ``anatomy-density``'s (four
  references, four z maps), with references fitted on this study (a stand-in: the cost does not depend on it).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
from _machine import best_of, cpu_model, publish

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## The parenchyma density's cost (`bench/density.py`)"


def cube_median(volume, strict, size: int = 7):
    """The full ``size³`` median that :func:`parenchyma_density` stands in for, with the same filling."""
    from scipy import ndimage

    m = np.asarray(strict) != 0
    filled = volume[tuple(ndimage.distance_transform_edt(~m, return_distances=False, return_indices=True))]
    return np.where(m, ndimage.median_filter(np.asarray(filled, np.float32), size=size), np.nan)


def main() -> None:
    import torch

    from ct3dflow.detect import get_kind
    from ct3dflow.detect.bite import BITE_OPENING, lung_bite
    from ct3dflow.detect.blobs import BLOB_SIGMAS, bright_blobness
    from ct3dflow.detect.density_map import (
        DENSITY_BELOW_HU,
        DensityScore,
        below_normalised,
        lung_core,
        parenchyma_density,
    )
    from ct3dflow.detect.row import resolve_settings
    from ct3dflow.patches import extract_patches, sample_patch_corners
    from ct3dflow.preprocess import preprocess_study
    from ct3dflow.synthetic import make_phantom, write_nifti
    from ct3dflow.train import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "ct3dflow-bench-density"
    tmp.mkdir(exist_ok=True)
    write_nifti(make_phantom(9101, "ground_glass", shape=(150, 180, 180), spacing=(2.0, 2.0, 2.0)),
                tmp / "chest.nii.gz")
    study = preprocess_study(tmp / "chest.nii.gz")
    torch.manual_seed(0)
    model = TrainConfig(levels=3, steps=8, width=64, patch_size=24).build_model()
    x = extract_patches(study.volume, sample_patch_corners(study.strict, 24, 64, 0.5, 0), 24)[:, None]
    model.initialize(torch.from_numpy(x))
    model.eval()

    anatomy, density = get_kind("anatomy"), get_kind("anatomy-density")
    settings = resolve_settings(anatomy, {}, 24)
    predictor = anatomy.prepare(model, "cpu")
    t_score, flow = best_of(lambda: anatomy.score(predictor, study, settings), a.repeat)
    t_density, dens = best_of(lambda: parenchyma_density(study.volume, study.strict), a.repeat)
    below = below_normalised(DENSITY_BELOW_HU)
    t_aerated, aerated = best_of(lambda: parenchyma_density(study.volume, study.strict, below=below), a.repeat)
    t_cube, cube = best_of(lambda: cube_median(study.volume, lung_core(study.strict)), 1)
    t_blob, blob = best_of(lambda: bright_blobness(study.volume, lung_core(study.permissive)), a.repeat)
    t_bite, bite = best_of(lambda: lung_bite(study.strict, lung_core(study.permissive), study.spacing), a.repeat)
    lung = np.isfinite(dens)  # the core, where the density is read
    diff = np.abs(dens[lung] - cube[lung])
    mad = 1.4826 * float(np.median(np.abs(cube[lung] - np.median(cube[lung]))))
    corr = float(np.corrcoef(dens[lung], cube[lung])[0, 1])
    both = DensityScore(**vars(flow), parenchyma=aerated, density_below_hu=DENSITY_BELOW_HU, blob=blob,
                        blob_sigmas=BLOB_SIGMAS, bite=bite, bite_opening=BITE_OPENING)
    params = {"sigma_vox": 1.0, "density_weight": 0.5, "blob_weight": 0.5}
    ref_a = anatomy.fit_reference([flow], [study.permissive], params)
    ref_d = density.fit_reference([both], [study.permissive], params)
    t_map_a, _ = best_of(lambda: anatomy.atypicality(flow, study.permissive, params, ref_a), a.repeat)

    def fresh_map():
        both.__dict__.pop("_z_memo", None)  # the search reuses z per σ; a study's decision computes it once
        return density.atypicality(both, study.permissive, params, ref_d)

    t_map_d, _ = best_of(fresh_map, a.repeat)
    z, y, xx = study.volume.shape
    lines = [
        SECTION, "",
        f"{datetime.now():%Y-%m-%d %H:%M}, {cpu_model()}, {a.threads} torch thread(s); best of {a.repeat}; "
        f"`.venv/bin/python bench/density.py --threads {a.threads}`", "",
        f"- input: a ground-glass phantom chest on the 2 mm grid, {xx} × {y} × {z} voxels, "
        f"{int((study.strict != 0).sum()):,} in the strict lung mask, {int((study.permissive != 0).sum()):,} in "
        "the permissive one",
        f"- model: an initialised one of the detection architecture (L=3, K=8, width 64, 24³), stride "
        f"{settings['stride']}, precision {settings['precision']}", "",
        "| step | seconds | against the flow's voxel map |",
        "|---|---|---|",
        f"| the flow's voxel map (`anatomy` score: the baseline) | {t_score:.2f} | 1 |",
        f"| the parenchyma density over the aerated lung (< {DENSITY_BELOW_HU:g} HU; what `anatomy-density`, the "
        f"default, adds to the score) | {t_aerated:.2f} | {t_aerated / t_score:.2f} |",
        f"| the same over every core voxel (`density_below_hu: off`) | {t_density:.2f} | {t_density / t_score:.2f} |",
        f"| the bright-blob response on the permissive core (scales {', '.join(map(str, BLOB_SIGMAS))} voxels; "
        f"what the default adds too) | {t_blob:.2f} | {t_blob / t_score:.2f} |",
        f"| the lung's bite on the permissive core (opening {BITE_OPENING} voxels; what the default adds too) | "
        f"{t_bite:.2f} | {t_bite / t_score:.2f} |",
        f"| the full 7³ cube median it stands in for (once) | {t_cube:.2f} | {t_cube / t_score:.2f} |",
        f"| the decision's map, `anatomy` (one z map) | {t_map_a:.2f} | {t_map_a / t_score:.2f} |",
        f"| the decision's map, `anatomy-density` (four z maps) | {t_map_d:.2f} | {t_map_d / t_score:.2f} |",
    ]
    lines += ["", "Separable against cube (both over every core voxel) inside the strict lung's core "
              f"({int(lung.sum()):,} voxels): correlation "
              f"{corr:.3f}; median |difference| "
              f"{np.median(diff):.4f} and 99th percentile {np.quantile(diff, 0.99):.4f}, against a lung MAD of "
              f"{mad:.4f} (normalised CT)."]
    publish(SECTION, lines, a.write_docs)


if __name__ == "__main__":
    main()
