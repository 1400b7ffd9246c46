"""`ray job submit --working-dir . -- python jobs/screen.py --config configs/screen.yaml --archive PATH`

Screens an archive (a folder tree of DICOM series / image files, a manifest, or a PACS over DICOMweb) with the
champion model
(or ``--model models:/NAME/3`` or ``--model path/to/model.pt``); see docs/SCREENING.md. Re-running skips
the studies already scored by the same model on the same input, so a stopped job resumes.
"""

from _common import init_ray, job_config


def _args(p):
    p.add_argument("--archive", default=None,
                   help="archive folder, manifest (.parquet/.csv), or a PACS: dicomweb+http://HOST:PORT/dicom-web "
                        "(credentials from source.credentials_file or the environment, docs/PACS.md); default: "
                        "the config's source.url")
    p.add_argument("--model", default=None,
                   help="models:/NAME@champion (default: the config's registered model), models:/NAME/VERSION, "
                        "runs:/…, or a saved model .pt file (a Glow3D, or the AE with a patch-map operating point)")
    p.add_argument("--run-name", default=None, help="MLflow run name (nightly-screen.sh: the submission id)")


if __name__ == "__main__":
    cfg, args = job_config("Screen an archive: one result row, map and preview per study.", _args)
    if not args.archive and not (cfg.source or {}).get("url"):
        raise SystemExit("give --archive (a folder, a manifest or dicomweb+http://…) or the config's source.url")
    from ct3dflow.adapters.dicomweb import PacsError, preflight

    try:  # an unreachable or unauthorised PACS: a clear message and a non-zero exit, before Ray or any write
        preflight(cfg, args.archive)
        # imported after the check, so a PACS that cannot be used fails in a second, not after torch and Ray load
        from ct3dflow.adapters.ray_screen import screen_job

        init_ray()
        screen_job(cfg, args.archive, model=args.model, run_name=args.run_name)
    except PacsError as exc:
        raise SystemExit(f"[ct3dflow] the screening did not start: {exc}") from None
