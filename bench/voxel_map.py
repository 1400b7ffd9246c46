"""The voxel map at the cost of a nightly job: seconds per realistic study for ways of computing it.

    .venv/bin/python bench/voxel_map.py [--model work/experiments/detection/model/model.pt] [--threads 2]

One realistic chest on the 2 mm grid (a phantom of 150 × 180 × 180 voxels, as a 512 × 512 × 300 scan gives)
and the detection model (L=3, K=8, width 64, 24³; a freshly initialised one of that architecture when the
experiment's is not on disk: the same speed). For each variant, the seconds of
:func:`ct3dflow.detect.voxel_map.voxel_log_p_volume` (the core scorer's model part) and the largest relative
difference of its map from the reference variant's (fp32, the reference layers) inside the lungs:

* ``fp32`` at strides 6 and 12 (stride 6: every voxel from 64 windows; 12: from 8);
* ``bf16 convolutions`` — every oneDNN convolution in bf16 (``torch.backends.mkldnn.conv.fp32_precision =
  "bf16"``, AMX tiles where the CPU has them);
* ``bf16 autocast`` — ``scoring.precision: bf16`` (the scorer's ``torch.autocast("cpu", bfloat16)``): the
  coupling networks in bf16, the main stream, the 1×1×1 convolutions, the log-dets and the latent in fp32 (the
  reference layers' mixed-precision rule);
* ``fast`` — the fast encoder of :mod:`ct3dflow.flow.fast` forced on the CPU (folded ActNorm, tap GEMMs);
* batch sizes;
* ``--grids``: only the window grids at the default precision (bf16 autocast where native): stride 12, stride
  12 with interleaved grids (``scoring.phases`` 2 and 4) and stride 6;
* ``--layouts``: only the weights' memory layout at stride 12 and the default precision, twice each in turn:
  contiguous (the CPU scorer before 2026-12-06) against channels-last (:func:`ct3dflow.models.
  channels_last_on_cpu`, the CPU scorer's layout since).

Whether a variant is *as good* is decided by validation AUROC on the detection experiment (docs/RESULTS.md),
not here; this measures the time and the numerical distance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from _machine import cpu_model, publish

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "work" / "experiments" / "detection" / "model" / "model.pt"
SECTION = "## The voxel map on a realistic study (`bench/voxel_map.py`)"


@contextlib.contextmanager
def conv_precision(p: str):
    import torch

    old = torch.backends.mkldnn.conv.fp32_precision
    torch.backends.mkldnn.conv.fp32_precision = p
    try:
        yield
    finally:
        torch.backends.mkldnn.conv.fp32_precision = old


def main() -> None:
    import torch

    from ct3dflow.detect.grid import window_grid
    from ct3dflow.detect.voxel_map import voxel_log_p_volume
    from ct3dflow.flow.dtypes import bf16_available
    from ct3dflow.models import load_patch_scorer
    from ct3dflow.preprocess import preprocess_study
    from ct3dflow.synthetic import make_phantom, write_nifti
    from ct3dflow.train import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--grids", action="store_true", help="only the window grids (stride, phases) in bf16 autocast")
    ap.add_argument("--layouts", action="store_true", help="only contiguous against channels-last weights")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "ct3dflow-bench-voxel"
    tmp.mkdir(exist_ok=True)
    write_nifti(make_phantom(9100, "nodule", shape=(150, 180, 180), spacing=(2.0, 2.0, 2.0)), tmp / "chest.nii.gz")
    study = preprocess_study(tmp / "chest.nii.gz")
    if Path(a.model).exists():
        model, which = load_patch_scorer(a.model), f"the detection model ({a.model})"
    else:
        torch.manual_seed(0)
        model = TrainConfig(levels=3, steps=8, width=64, patch_size=24).build_model()
        from ct3dflow.patches import extract_patches, sample_patch_corners

        x = extract_patches(study.volume, sample_patch_corners(study.strict, 24, 64, 0.5, 0), 24)[:, None]
        model.initialize(torch.from_numpy(x))
        which = "an initialised model of the detection architecture (no trained one on disk)"
    model.eval()
    inside = study.permissive != 0
    rows, ref = [], {}

    def run(name, glow, stride, batch, precision="none", autocast=False, phases=1):
        grid = window_grid(study.volume, study.permissive, 24, stride, phases)
        with conv_precision(precision):  # autocast: the scorer's own bf16 switch (scoring.precision: bf16)
            voxel_log_p_volume(glow, window_grid(study.volume[:48, :48, :48], study.permissive[:48, :48, :48] | 1,
                                                 24, 24), batch_size=batch, bf16=autocast)  # warm-up (oneDNN caches)
            t = time.time()
            m = voxel_log_p_volume(glow, grid, batch_size=batch, bf16=autocast)
            dt = time.time() - t
        key = 6 if a.grids else stride  # --grids: every grid against stride 6, the map it stands in for
        if key == stride:
            ref.setdefault(key, m)
        diff = float(np.nanmax(np.abs(m[inside] - ref[key][inside]) / (np.abs(ref[key][inside]) + 1e-3)))
        rows.append({"variant": name, "stride": stride, "phases": phases, "batch": batch, "windows": len(grid),
                     "seconds": dt, "max_rel_diff": diff})
        print(json.dumps(rows[-1]), flush=True)

    if a.grids:
        auto = bf16_available("cpu")
        name = "bf16 autocast" if auto else "fp32"
        for stride, phases in ((6, 1), (12, 1), (12, 2), (12, 4)):
            run(name, model, stride, 32, autocast=auto, phases=phases)
    elif a.layouts:
        import copy

        from ct3dflow.models import channels_last_on_cpu

        auto = bf16_available("cpu")
        cl = channels_last_on_cpu(copy.deepcopy(model), "cpu")
        for _ in range(2):
            run(f"contiguous weights ({'bf16 autocast' if auto else 'fp32'})", model, 12, 32, autocast=auto)
            run(f"channels-last weights ({'bf16 autocast' if auto else 'fp32'})", cl, 12, 32, autocast=auto)
    else:
        precision_rows(run, model, a)
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    title = SECTION + (" — window grids" if a.grids else " — weight layouts" if a.layouts else "")
    lines = [title, "",
             f"- date: {datetime.now().isoformat(timespec='seconds')}; CPU: {cpu_model()}, {a.threads} torch threads "
             f"(AMX tiles: {'yes' if amx else 'no'}, bf16 instructions: "
             f"{'yes' if torch.cpu._is_avx512_bf16_supported() else 'no'})",
             f"- command: `python bench/voxel_map.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
             f"- input: a phantom chest on the 2 mm grid, {study.volume.shape[2]} × {study.volume.shape[1]} × "
             f"{study.volume.shape[0]} voxels, {inside.sum() * 8e-3:.0f} cm³ in the permissive mask; {which}",
             "", "| variant | stride | phases | batch | windows | seconds | max relative difference from "
             + ("stride 6 |" if a.grids else "the first row |" if a.layouts else "fp32 |"),
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['stride']} | {r['phases']} | {r['batch']} | {r['windows']} | "
              f"{r['seconds']:.1f} | {r['max_rel_diff']:.1e} |" for r in rows]
    same = [r["variant"] for r in rows if "bf16" in r["variant"] and r["max_rel_diff"] == 0.0 and not a.grids]
    if same:
        # a fresh model's couplings are identities (zero-initialised last layer): bf16 in them changes nothing
        why = ("the model is untrained (its affine couplings are identities), not because fp32 ran; the times are "
               "bf16's" if not Path(a.model).exists() else
               "oneDNN kept fp32 convolutions on this CPU, so those rows time fp32 again")
        lines += ["", f"Notes: {', '.join(sorted(set(same)))} gave the fp32 map bit for bit: {why}."]
    publish(title, lines, a.write_docs)


def precision_rows(run, model, a) -> None:
    """The precisions and encoders at strides 12 and 6 (the default bench)."""
    from ct3dflow.models import load_patch_scorer, prepare_flow_encoder

    run("fp32 reference layers", model, 12, 32)
    run("fp32 reference layers", model, 12, 64)
    run("bf16 convolutions (oneDNN)", model, 12, 64, "bf16")
    run("bf16 autocast (coupling nets in bf16)", model, 12, 64, autocast=True)
    fast = prepare_flow_encoder(load_patch_scorer(a.model) if Path(a.model).exists() else model, "cpu", force=True)
    run("fast encoder (fp32)", fast, 12, 64)
    model.fast = None
    run("fp32 reference layers", model, 6, 32)
    run("fp32 reference layers", model, 6, 64)
    run("bf16 convolutions (oneDNN)", model, 6, 32, "bf16")
    run("bf16 autocast (coupling nets in bf16)", model, 6, 32, autocast=True)


if __name__ == "__main__":
    main()
