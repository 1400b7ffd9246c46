"""What reading a real scan's lungs on their bounding box saves the default decision (``anatomy-density``).

    .venv/bin/python bench/lung_box.py [--ct ../shared/data/nsclc-lung1-001/image] [--repeat 3] [--write-docs]

A hospital scan's field of view holds the whole chest and the table; the lungs fill a fifth to a half of it. The
anatomical bands (a distance transform per mask), the lung's bite (an opening, a closing and a distance
transform) and the smoothing inside a mask are computed on the mask's bounding box with what each needs around it
(:func:`ct3dflow.lungs.bounding_box`). This times each, the platform's way, against the same arithmetic on the
whole scan (the baseline, written out here as the platform computed it before 2026-12-07 15:00), and checks that
the two give the same numbers. Input: LUNG1-001 (NSCLC-Radiomics, ``../shared/data``) preprocessed as the
platform does; the bands' per-mask cache is cleared before every call.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
from _machine import best_of, cpu_model, publish
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## The lungs' bounding box in the decision (`bench/lung_box.py`)"


def whole_scan_bands(m, bins, lateral=3, vertical=3):
    from ct3dflow.detect.anatomy_map import anatomy_coordinates

    depth, lat, ver = anatomy_coordinates(m)
    d = np.digitize(depth, np.asarray(bins, dtype=np.float64)[1:])
    li = np.minimum((lat * lateral).astype(np.int64), lateral - 1)
    vi = np.minimum((ver * vertical).astype(np.int64), vertical - 1)
    return np.where(m, (d * lateral + li) * vertical + vi, -1), np.where(m, d, -1)


def whole_scan_bite(strict, region, spacing, opening, closing_mm):
    from ct3dflow.lungs import closing_ball

    lung = ndimage.binary_opening(strict != 0, ndimage.generate_binary_structure(3, 1), iterations=opening)
    samp = tuple(float(s) for s in spacing)[::-1]
    filled = np.zeros(strict.shape, bool)
    for label in np.unique(strict[strict != 0]):
        filled |= closing_ball(strict == label, closing_mm, samp)
    out = np.full(strict.shape, np.nan, np.float32)
    out[region] = np.where(filled, ndimage.distance_transform_edt(~lung), 0.0)[region]
    return out


def whole_scan_smoothing(v, mask, sigma):
    m = (mask != 0) & np.isfinite(v)
    num = ndimage.gaussian_filter(np.where(m, v, 0.0).astype(np.float32), sigma)
    den = ndimage.gaussian_filter(m.astype(np.float32), sigma)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m, num / np.maximum(den, 1e-6), np.nan).astype(np.float32)


def main() -> int:
    from ct3dflow.detect.anatomy_map import DEFAULT_DEPTH_BINS, band_index, clear_band_cache
    from ct3dflow.detect.bite import BITE_CLOSING_MM, BITE_OPENING, lung_bite
    from ct3dflow.detect.density_map import DENSITY_MARGIN, core_bins, lung_core
    from ct3dflow.detect.voxel_map import smooth_in_mask
    from ct3dflow.lungs import bounding_box
    from ct3dflow.preprocess import preprocess_study

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", default=str(ROOT.parent / "shared" / "data" / "nsclc-lung1-001" / "image"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    if not Path(a.ct).exists():
        sys.exit(f"no CT at {a.ct}: pass --ct with a DICOM series folder or an image file of a chest CT")
    study = preprocess_study(Path(a.ct))
    perm, strict = np.asarray(study.permissive) != 0, np.asarray(study.strict)
    core = lung_core(perm, DENSITY_MARGIN)
    # the masks the default decision bands: the flow's (permissive), the density's (strict), the blobs' and bite's
    masks = (("permissive", perm, DEFAULT_DEPTH_BINS), ("strict", strict != 0, core_bins(DEFAULT_DEPTH_BINS, 2)),
             ("permissive core", core, core_bins(DEFAULT_DEPTH_BINS, 2)))
    rows, total_box, total_whole = [], 0.0, 0.0

    def row(what, t_box, t_whole, same):
        nonlocal total_box, total_whole
        total_box, total_whole = total_box + t_box, total_whole + t_whole
        rows.append(f"| {what} | {t_whole:.2f} | {t_box:.2f} | {t_whole / t_box:.1f}× | {'yes' if same else 'NO'} |")

    for name, m, bins in masks:
        def on_box(m=m, bins=bins):
            clear_band_cache()
            return band_index(m, bins, 3, 3)

        t_box, got = best_of(on_box, a.repeat)
        t_whole, want = best_of(lambda m=m, bins=bins: whole_scan_bands(m, bins), a.repeat)
        row(f"anatomical bands of the {name} mask", t_box, t_whole,
            all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)))
    t_box, got = best_of(lambda: lung_bite(strict, core, study.spacing), a.repeat)
    t_whole, want = best_of(lambda: whole_scan_bite(strict, core, study.spacing, BITE_OPENING, BITE_CLOSING_MM),
                            a.repeat)
    row("the lung's bite on the permissive core", t_box, t_whole, np.array_equal(got, want, equal_nan=True))
    v = np.random.default_rng(0).normal(size=perm.shape).astype(np.float32)  # the cost does not depend on it
    for sigma in (1.0, 2.0):
        t_box, got = best_of(lambda s=sigma: smooth_in_mask(v, perm, s), a.repeat)
        t_whole, want = best_of(lambda s=sigma: whole_scan_smoothing(v, perm, s), a.repeat)
        row(f"smoothing in the permissive mask, σ {sigma:g} (one of four channels)", t_box, t_whole,
            np.array_equal(got, want, equal_nan=True))
    z, y, x = perm.shape
    box = bounding_box(perm, 1)
    share = np.prod([s.stop - s.start for s in box]) / perm.size
    publish(SECTION, [
        SECTION, "",
        f"{datetime.now():%Y-%m-%d %H:%M}, {cpu_model()}; best of {a.repeat}; `.venv/bin/python bench/lung_box.py`",
        "",
        f"- input: LUNG1-001 preprocessed, {x} × {y} × {z} voxels on the 2 mm grid; the permissive mask's box "
        f"(one voxel around it) is {100 * share:.0f} % of the scan",
        "",
        "| step | whole scan (s, the baseline) | lungs' box (s, the platform) | faster | the same numbers |",
        "|---|---|---|---|---|",
        *rows,
        f"| **all of the above** | {total_whole:.2f} | {total_box:.2f} | {total_whole / total_box:.1f}× | |",
    ], a.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
