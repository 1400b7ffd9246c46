"""`ray job submit --working-dir . -- python jobs/screen.py --config configs/screen.yaml --archive PATH`

Screens an archive (a folder tree of DICOM series / image files, or a manifest) with the champion model
(or ``--model models:/NAME/3`` or ``--model path/to/model.pt``); see docs/SCREENING.md. Re-running skips
the studies already scored by the same model on the same input, so a stopped job resumes.
"""

from _common import init_ray, job_config

from ct3dflow.adapters.ray_screen import screen_job


def _args(p):
    p.add_argument("--archive", required=True, help="archive folder or manifest (.parquet/.csv)")
    p.add_argument("--model", default=None,
                   help="models:/NAME@champion (default: the config's registered model), models:/NAME/VERSION, "
                        "or a Glow3D .pt file")
    p.add_argument("--run-name", default=None, help="MLflow run name (nightly-screen.sh: the submission id)")


if __name__ == "__main__":
    cfg, args = job_config("Screen an archive: one result row, Log P map and preview per study.", _args)
    init_ray()
    screen_job(cfg, args.archive, model=args.model, run_name=args.run_name)
