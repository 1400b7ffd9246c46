"""The ``ct3dflow`` command: phantoms → cache → model → scores → operating point → metrics, one machine.

The Ray jobs in ``jobs/`` run the same functions on a cluster; these subcommands need no Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CTInputError


def _progress(iterable, total=None, desc=None):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=None, file=sys.stderr)


# ------------------------------------------------------------------------------------------ phantoms
def cmd_phantoms(a) -> int:
    from .synthetic import make_archive

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
    summary = _read_table(Path(a.cache) / "summary.parquet",
                          f"fill the cache first: ct3dflow preprocess --manifest {a.manifest} --cache {a.cache}")
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
def cmd_score_local(a) -> int:
    import torch

    from .config import load_config
    from .detect import OperatingPoint, get_kind
    from .detect.batch import ScoringPlan, entries_of_rows, score_locally
    from .models import load_patch_scorer
    from .preprocess import PreprocessConfig

    torch.set_num_threads(a.threads)
    model = load_patch_scorer(a.model)
    op = OperatingPoint.load(a.operating_point) if a.operating_point else None
    if op is not None and a.map and a.map != op.map:
        raise SystemExit(f"{a.operating_point} is an operating point of the {op.map} map; tune one on {a.map} maps "
                         f"(score-local --map {a.map}, then tune-local) or leave out --map")
    kind = get_kind(op.map if op is not None else a.map)
    if kind.needs_flow and type(model).__name__ != "Glow3D":
        raise SystemExit(f"the {kind.name} map decomposes a flow's log-likelihood: {a.model} is a "
                         f"{type(model).__name__}, not a Glow3D; score it with --map patch")
    pre = load_config(a.config).preprocess_config() if a.config else PreprocessConfig()
    rows = _split_rows(a.manifest, a.split)
    scoring = {"stride": a.stride, "part": a.part, "batch_size": a.batch_size}
    plan = ScoringPlan.make(kind.name, scoring, int(model.config()["patch_size"]), op, str(a.model),
                            f"file-{Path(a.model).name}", pre.to_dict(), a.cache, a.out)
    bar = _progress(range(len(rows)), total=len(rows), desc=f"score ({kind.name} map)")
    res, _ = score_locally(entries_of_rows(rows), plan, model, a.device, on_row=lambda i, item: bar.update(1))
    bar.close()
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        print(res[["study_id", "status", "n_patches", "log_p_mean", "abnormal_volume_cm3", "predicted_abnormal",
                   "error"]].to_string(index=False))
    print(f"{kind.name} map, {plan.settings}; results: {Path(a.out) / 'results.parquet'}")
    return 0


# ------------------------------------------------------------------------------------- tune/evaluate
def _split_rows(manifest, splits):
    """The manifest's rows of ``splits`` (all rows where none are given); no row of them is an input mistake."""
    from .pipeline import manifest_rows

    rows = manifest_rows(manifest)
    if not splits:
        return rows
    out = [r for r in rows if r.get("split") in splits]
    if not out:
        have = sorted({str(r.get("split")) for r in rows if r.get("split")})
        raise CTInputError(f"no row of {manifest} has split {' or '.join(map(repr, splits))}; its splits: "
                           f"{', '.join(have) or 'none'}")
    return out


def _kind_of_results(results: pd.DataFrame):
    from .detect import get_kind

    kinds = sorted(set(results.loc[results["status"] == "ok", "map_kind"].dropna())) if "map_kind" in results else []
    if len(kinds) != 1:
        raise SystemExit(f"the results hold {kinds or 'no'} map scores: score the validation split with "
                         "`ct3dflow score-local` first (one map kind)")
    return get_kind(kinds[0])


def cmd_tune_local(a) -> int:
    from .detect.row import load_scored_studies
    from .detect.search import grid_search, threshold_rule

    results = _read_table(a.results, "give the results.parquet that score-local wrote for the val split")
    kind = _kind_of_results(results)
    studies = load_scored_studies(kind, _split_rows(a.manifest, ["val"]), results, a.cache)
    given = {k: v for k, v in {"sigma_vox": a.sigma, "tau_z": a.tau, "v_min_cm3": a.v_min,
                               "density_weight": a.density_weight, "blob_weight": a.blob_weight}.items() if v}
    for key in ("density_weight", "blob_weight"):
        if key in given and key not in kind.space:
            raise SystemExit(f"--{key.replace('_', '-')} is a setting of the anatomy-density map; these scores are "
                             f"the {kind.name} map's")
    rule = threshold_rule("specificity" if a.target_specificity else "best_f1", a.target_specificity)
    op, trials = grid_search(kind, studies, given, rule, folds=a.reference_folds)
    op.save(a.out)
    v = op.validation
    print(f"{len(trials)} trials on {len(studies)} validation studies ({v['n_abnormal']} abnormal); validation "
          f"AUROC {v['auroc']:.3f}, F1 {v['f1']:.3f}, sensitivity {v['sensitivity']:.3f}, specificity "
          f"{v['specificity']:.3f}: {op.describe()} → {a.out}")
    return 0


def cmd_evaluate(a) -> int:
    from .detect import OperatingPoint, get_kind
    from .detect.evaluate import evaluate
    from .detect.outputs import write_json
    from .detect.row import load_scored_studies
    from .metrics import table1

    op = OperatingPoint.load(a.operating_point)
    kind = get_kind(op.map)
    results = _read_table(a.results, f"give the results.parquet that score-local wrote for the {a.split} split")
    studies = load_scored_studies(kind, _split_rows(a.manifest, [a.split]), results, a.cache)
    ev = evaluate(kind, op, studies)
    if a.out:
        write_json(ev, a.out)
    print(table1([(a.name, ev["metrics"], ev["ci"])]))
    m = ev["metrics"]
    print(f"{op.describe()}\nsensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f} "
          f"(tp {m['tp']}, fp {m['fp']}, tn {m['tn']}, fn {m['fn']}); abnormal volume of the normal studies: median "
          f"{ev['normal_volume_cm3']['median']:.1f} cm³, max {ev['normal_volume_cm3']['max']:.1f} cm³")
    for kind_name, k in ev["per_kind"].items():
        print(f"  {kind_name:14s} n={k['n']:2d}  AUROC {k['auroc']:.3f}  sensitivity {k['sensitivity']:.3f}  "
              f"median volume {k['median_abnormal_volume_cm3']:.1f} cm3")
    return 0


# ---------------------------------------------------------------------------------------------------


def _study_args(s) -> None:
    """The manifest and the preprocessed-study cache, which every per-study command reads."""
    s.add_argument("--manifest", required=True)
    s.add_argument("--cache", required=True)


def build_parser() -> argparse.ArgumentParser:
    from .detect import MAP_KINDS
    from .detect.search import DEFAULT_REFERENCE_FOLDS

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
    _study_args(s)
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.set_defaults(fn=cmd_train_local)

    s = sub.add_parser("score-local", help="score studies with a map kind (and, with an operating point, decide)")
    s.add_argument("--model", required=True, help="model.pt written by train-local")
    _study_args(s)
    s.add_argument("--out", required=True, help="results folder (results.parquet, parts/, maps/)")
    s.add_argument("--config", help="job configuration whose `preprocess` section the cache was made with")
    s.add_argument("--split", nargs="*", help="only these splits (default: all)")
    s.add_argument("--operating-point", help="operating_point.json from tune-local (it names its map kind)")
    s.add_argument("--map", choices=sorted(MAP_KINDS), default=None,
                   help="anatomy-density (default): the per-voxel coarse-latent map, the lung's aerated density, "
                        "its bright blobs and its bite, each against a reference per band of depth and position in "
                        "the lung, "
                        "beyond the paper; anatomy: that voxel map alone; voxel: the voxel map against depth bands "
                        "only; patch: the paper's Log P map")
    s.add_argument("--part", choices=["top_latent", "all"], default=None,
                   help="voxel map: which local log-likelihood terms (ct3dflow.flow.local)")
    s.add_argument("--stride", type=int, default=None,
                   help="grid stride (default: patch size − 10 for the patch map, 12 for the voxel kinds)")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    s.set_defaults(fn=cmd_score_local)

    s = sub.add_parser("tune-local", help="choose the operating point on the validation split (grid search)")
    _study_args(s)
    s.add_argument("--results", required=True, help="results.parquet of score-local over the val split")
    s.add_argument("--out", required=True, help="operating_point.json to write")
    s.add_argument("--sigma", type=float, nargs="+", help="σ grid in voxels (default: the map kind's)")
    s.add_argument("--tau", type=float, nargs="+",
                   help="τ grid: |z| for the voxel kinds (default 2 … 6); healthy sd of the patch map (−4 … −0.5)")
    s.add_argument("--v-min", type=float, nargs="+", help="v_min grid in cm³")
    s.add_argument("--density-weight", type=float, nargs="+",
                   help="anatomy-density map: grid of the density's weight (0: the flow's map alone)")
    s.add_argument("--blob-weight", type=float, nargs="+",
                   help="anatomy-density map: grid of the solid-lesion channel's weight, the larger of the "
                        "bright-blob response and the lung's bite (0: without them)")
    s.add_argument("--target-specificity", type=float, default=None,
                   help="choose T as the lowest with at least this validation specificity (default: best F1)")
    s.add_argument("--reference-folds", type=int, default=DEFAULT_REFERENCE_FOLDS,
                   help="cross-fit the healthy reference over this many folds of the validation normals, so no "
                        "normal is judged by a reference fitted on it (default %(default)s; 1: in-sample)")
    s.set_defaults(fn=cmd_tune_local)

    s = sub.add_parser("evaluate", help="patient-level metrics on the test split (Table 1 form)")
    _study_args(s)
    s.add_argument("--results", required=True)
    s.add_argument("--operating-point", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--name", default="CT-3DFlow")
    s.add_argument("--out", help="evaluation.json to write")
    s.set_defaults(fn=cmd_evaluate)
    return p


def _read_table(path, what: str) -> pd.DataFrame:
    """A Parquet file the chain wrote before (``what``: which, and the command that writes it)."""
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise CTInputError(f"{path} not found: {what}") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors name the bytes, not the file
        raise CTInputError(f"{path} is not a Parquet table ({type(exc).__name__}: {exc}): {what}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    np.seterr(all="ignore")
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as exc:  # CTInputError is a ValueError
        if os.environ.get("CT3DFLOW_DEBUG"):
            raise
        print(f"ct3dflow {args.cmd}: error: {exc}\n(CT3DFLOW_DEBUG=1 shows where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
