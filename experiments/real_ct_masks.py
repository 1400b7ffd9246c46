"""The lung-mask figures on the real chest CTs of ../shared/data (docs/RESULTS.md, "Lung masks on real CT").

    .venv/bin/python experiments/real_ct_masks.py [--data ../shared/data]

LUNG1-001: Dice of the strict mask against the expert lungs, the share of the expert tumour (GTV-1) inside
the permissive mask, and the permissive volume against the expert lungs and tumour together. CIP: Dice of
the strict mask against CIP's whole-lung mask. All on the 2 mm grid that preprocessing produces.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ct3dflow.preprocess import preprocess_study


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))


def labels_on_grid(label_path: Path, study) -> np.ndarray:
    lab = sitk.Resample(sitk.ReadImage(str(label_path)), study.reference_image(), sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(lab)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    a = p.parse_args(argv)
    data = Path(a.data)
    out = {}
    t = time.time()
    lung1 = data / "nsclc-lung1-001"
    s = preprocess_study(lung1 / "image")
    lab = labels_on_grid(lung1 / "labels_from_rtstruct.nii.gz", s)
    lungs, tumour = (lab == 1) | (lab == 2), lab == 3
    vox = float(np.prod(s.spacing)) / 1000.0
    out["lung1"] = {
        "strict_dice_vs_expert_lungs": dice(s.strict > 0, lungs),
        "tumour_inside_permissive": float(s.permissive[tumour].mean()),
        "permissive_over_expert_lungs_and_tumour": float(s.permissive.sum() / (lungs | tumour).sum()),
        "permissive_cm3": float(s.permissive.sum() * vox),
        "expert_lungs_cm3": float(lungs.sum() * vox), "tumour_cm3": float(tumour.sum() * vox),
        "preprocess_s": round(time.time() - t, 2),
    }
    cip = data / "cip-ct-64"
    s = preprocess_study(cip / "ct-64.nrrd")
    out["cip"] = {"strict_dice_vs_whole_lung": dice(s.strict > 0, labels_on_grid(cip / "wholeLung-64.nrrd", s) > 0)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
