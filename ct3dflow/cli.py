"""The ``ct3dflow`` command: phantoms → cache → model → scores → operating point → metrics, one machine.

The Ray jobs in ``jobs/`` run the same functions on a cluster; these subcommands need no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _progress(iterable, total=None, desc=None):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=None, file=sys.stderr)


# ------------------------------------------------------------------------------------------ phantoms
def cmd_phantoms(a) -> int:
    from .phantoms import make_archive

    df = make_archive(a.out, a.normal, a.abnormal, fmt=a.format, seed=a.seed, size=a.size)
    print(f"wrote {len(df)} studies and {Path(a.out) / 'manifest.parquet'}")
    print(df.groupby(["split", "label"], dropna=False).size().rename("studies").to_string())
    return 0


# ---------------------------------------------------------------------------------------- preprocess
def preprocess_local(manifest, out, cfg=None) -> pd.DataFrame:
    from .pipeline import manifest_rows, preprocess_row, summary_frame
    from .preprocess import PreprocessConfig

    cfg = cfg or PreprocessConfig()
    rows = manifest_rows(manifest)
    Path(out).mkdir(parents=True, exist_ok=True)
    summary = summary_frame([preprocess_row(r, str(out), cfg)
                             for r in _progress(rows, total=len(rows), desc="preprocess")])
    summary.to_parquet(Path(out) / "summary.parquet", index=False)
    return summary


def cmd_preprocess(a) -> int:
    from .config import load_config

    cfg = load_config(a.config).preprocess_config() if a.config else None
    summary = preprocess_local(a.manifest, a.out, cfg)
    with pd.option_context("display.width", 200, "display.max_colwidth", 90):
        print(summary[["study_id", "status", "shape", "lung_volume_right_cm3", "lung_volume_left_cm3",
                       "error"]].to_string(index=False))
    n_err = int((summary["status"] == "error").sum())
    print(f"\n{len(summary)} studies: {len(summary) - n_err} ok, {n_err} errors → {Path(a.out) / 'summary.parquet'}")
    return 0  # error rows are results, not a failure of the command


# --------------------------------------------------------------------------------------------- train
def cmd_train_local(a) -> int:
    import torch

    from .config import load_config, parse_overrides
    from .pipeline import cached_patches, manifest_rows, ok_study_ids
    from .train import patch_batches_from_arrays, train_local

    cfg = load_config(a.config, parse_overrides(a.set))
    tcfg = cfg.train_config()
    summary = pd.read_parquet(Path(a.cache) / "summary.parquet")
    rows = manifest_rows(a.manifest)
    train_ids = ok_study_ids(summary, rows, "train")
    val_ids = ok_study_ids(summary, rows, "val") or train_ids[-1:]
    from .cache import StudyCache

    cache = StudyCache(a.cache)
    studies = [cache.load(s, mmap=True) for s in train_ids]
    batches = patch_batches_from_arrays([s.volume for s in studies], [s.strict for s in studies], tcfg,
                                        seed=tcfg.seed)
    val = torch.from_numpy(cached_patches(a.cache, val_ids, tcfg.n_val_patches, tcfg.patch_size,
                                          tcfg.min_lung_fraction, tcfg.seed + 1))
    bar = _progress(range(tcfg.iterations), desc="train")
    last = {}

    def log(step, m):
        last.update(m)
        bar.update(1)
        if "val_bits_per_dim" in m:
            bar.write(f"step {step}: train {m['bits_per_dim']:.3f} bits/dim, val {m['val_bits_per_dim']:.3f}")

    torch.set_num_threads(a.threads)
    model = train_local(tcfg, batches, val, a.out, log_fn=log)
    bar.close()
    print(f"model: {Path(a.out) / 'model.pt'} ({model.num_parameters():,} parameters); "
          f"last train {last.get('bits_per_dim', float('nan')):.3f} bits/dim")
    return 0


# --------------------------------------------------------------------------------------------- score
def _load_op(path):
    from .evaluation import load_operating_point

    return load_operating_point(path) if path else None


def cmd_score_local(a) -> int:
    import torch

    from .evaluation import score_row, score_row_voxel
    from .flow import Glow3D
    from .models import load_patch_scorer
    from .pipeline import manifest_rows
    from .voxel_map import VoxelOperatingPoint

    torch.set_num_threads(a.threads)
    model = load_patch_scorer(a.model).to(a.device).eval()
    size = int(model.config().get("patch_size", 48)) if hasattr(model, "config") else 48
    op = _load_op(a.operating_point)
    if op is not None and a.map == "voxel" and not isinstance(op, VoxelOperatingPoint):
        raise SystemExit(f"{a.operating_point} is an operating point of the paper's patch map; tune one on voxel "
                         "maps (score-local --map voxel, then tune-local) or leave out --map voxel")
    voxel = isinstance(op, VoxelOperatingPoint) or a.map == "voxel"
    if voxel and not isinstance(model, Glow3D):
        raise SystemExit(f"the voxel map decomposes a flow's log-likelihood: {a.model} is a "
                         f"{type(model).__name__}, not a Glow3D; score it with --map patch")
    rows = [r for r in manifest_rows(a.manifest) if not a.split or r.get("split") in a.split]
    if voxel:
        stride = a.stride or 6

        def score(r):
            return score_row_voxel(model, r, a.cache, a.out, stride=stride, part=a.part, op=op,
                                   model_uri=str(a.model), device=a.device, batch_size=a.batch_size)
    else:
        scoring = {"patch_size": size, "stride": a.stride or max(1, size - 10), "batch_size": a.batch_size}

        def score(r):
            return score_row(model, r, a.cache, a.out, scoring, op, model_uri=str(a.model), device=a.device)

    res = pd.DataFrame([score(r) for r in _progress(rows, total=len(rows), desc="score")])
    Path(a.out).mkdir(parents=True, exist_ok=True)
    res.to_parquet(Path(a.out) / "results.parquet", index=False)
    print(res[["study_id", "status", "n_patches", "log_p_mean", "abnormal_volume_cm3", "predicted_abnormal",
               "error"]].to_string(index=False))
    return 0


# ------------------------------------------------------------------------------------- tune/evaluate
def _split_rows(manifest, split):
    from .pipeline import manifest_rows

    return [r for r in manifest_rows(manifest) if r.get("split") == split]


def _is_voxel(results: pd.DataFrame) -> bool:
    return "voxel_map_path" in results.columns and bool(results["voxel_map_path"].notna().any())


def cmd_tune_local(a) -> int:
    from .evaluation import grid_search, load_tuning_studies, load_voxel_studies, voxel_search, write_json

    results = pd.read_parquet(a.results)
    rows = _split_rows(a.manifest, "val")
    given = {k: v for k, v in {"sigma_vox": a.sigma, "tau_z": a.tau, "v_min_cm3": a.v_min}.items() if v}
    if _is_voxel(results):  # scored with --map voxel: τ is a |z| threshold against healthy depth bands
        studies = load_voxel_studies(rows, results, a.cache)
        op, trials = voxel_search(studies, given)
    else:
        studies = load_tuning_studies(rows, results, a.cache)
        space = {"sigma_vox": [1.0, 2.0, 4.0, 8.0], "tau_z": [-4.0, -3.0, -2.0, -1.5, -1.0, -0.5],
                 "v_min_cm3": [0.0, 0.5, 2.0], **given}
        op, trials = grid_search(studies, space)
    write_json(op.to_dict(), a.out)
    best = trials.iloc[0]
    shown = {k: v for k, v in op.to_dict().items() if k != "reference"}
    print(f"{len(trials)} trials on {len(studies)} validation studies; best AUROC {best['auroc']:.3f} "
          f"F1 {best['f1']:.3f}: {json.dumps(shown)} → {a.out}")
    return 0


def cmd_evaluate(a) -> int:
    from .evaluation import evaluate_test, evaluate_test_voxel, load_tuning_studies, load_voxel_studies, write_json
    from .metrics import table1
    from .voxel_map import VoxelOperatingPoint

    op = _load_op(a.operating_point)
    rows = _split_rows(a.manifest, a.split)
    results = pd.read_parquet(a.results)
    if isinstance(op, VoxelOperatingPoint):
        ev = evaluate_test_voxel(load_voxel_studies(rows, results, a.cache), op)
    else:
        ev = evaluate_test(load_tuning_studies(rows, results, a.cache), op)
    if a.out:
        write_json(ev, a.out)
    print(table1([(a.name, ev["metrics"], ev["ci"])]))
    m = ev["metrics"]
    print(f"\nsensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f} "
          f"(tp {m['tp']}, fp {m['fp']}, tn {m['tn']}, fn {m['fn']})")
    for kind, k in ev["per_kind"].items():
        print(f"  {kind:14s} n={k['n']:2d}  AUROC {k['auroc']:.3f}  sensitivity {k['sensitivity']:.3f}  "
              f"median volume {k['median_abnormal_volume_cm3']:.1f} cm3")
    return 0


# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct3dflow", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("phantoms", help="write a synthetic chest CT archive and its manifest")
    s.add_argument("out")
    s.add_argument("--normal", type=int, default=6)
    s.add_argument("--abnormal", type=int, default=4)
    s.add_argument("--format", choices=["nifti", "dicom"], default="nifti")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", choices=["small", "demo"], default="small")
    s.set_defaults(fn=cmd_phantoms)

    s = sub.add_parser("preprocess", help="fill the preprocessed-study cache from a manifest")
    s.add_argument("manifest")
    s.add_argument("--out", required=True, help="cache folder (DIR/<study_id>/…, DIR/summary.parquet)")
    s.add_argument("--config", help="job configuration whose `preprocess` section to use")
    s.set_defaults(fn=cmd_preprocess)

    s = sub.add_parser("train-local", help="train the flow in this process (no Ray)")
    s.add_argument("--config", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--cache", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.set_defaults(fn=cmd_train_local)

    s = sub.add_parser("score-local", help="patch log-likelihoods (and, with an operating point, decisions)")
    s.add_argument("--model", required=True, help="model.pt written by train-local")
    s.add_argument("--manifest", required=True)
    s.add_argument("--cache", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--split", nargs="*", help="only these splits (default: all)")
    s.add_argument("--operating-point",
                   help="operating_point.json from tune-local (a voxel-map point implies --map voxel)")
    s.add_argument("--map", choices=["patch", "voxel"], default="patch",
                   help="patch: the paper's Log P map; voxel: per-voxel coarse-latent map (docs/RESULTS.md)")
    s.add_argument("--part", choices=["top_latent", "all"], default="top_latent",
                   help="voxel map: which local log-likelihood terms (ct3dflow.flow.local)")
    s.add_argument("--stride", type=int, default=None,
                   help="grid stride (default: patch size − 10 for the patch map, 6 for the voxel map)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    s.set_defaults(fn=cmd_score_local)

    s = sub.add_parser("tune-local", help="choose σ, τ, v_min, T on the validation split (grid search)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--cache", required=True)
    s.add_argument("--results", required=True, help="results.parquet of score-local over the val split")
    s.add_argument("--out", required=True, help="operating_point.json to write")
    s.add_argument("--sigma", type=float, nargs="+",
                   help="σ grid in voxels (default 1 2 4 8; voxel map 1 2)")
    s.add_argument("--tau", type=float, nargs="+",
                   help="τ grid: healthy z of the patch map (default −4 … −0.5); for the voxel map |z| (2 … 6)")
    s.add_argument("--v-min", type=float, nargs="+", help="v_min grid in cm³ (default 0 0.5 2; voxel map 0 1 5)")
    s.set_defaults(fn=cmd_tune_local)

    s = sub.add_parser("evaluate", help="patient-level metrics on the test split (Table 1 form)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--cache", required=True)
    s.add_argument("--results", required=True)
    s.add_argument("--operating-point", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--name", default="CT-3DFlow")
    s.add_argument("--out", help="evaluation.json to write")
    s.set_defaults(fn=cmd_evaluate)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    np.seterr(all="ignore")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
