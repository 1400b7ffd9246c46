"""`ray job submit --working-dir . -- python jobs/evaluate.py --config configs/demo.yaml [--model URI ...] [--force]`

The test split, once per model version, with the operating point the tune job stored: AUROC, F1,
accuracy, sensitivity, specificity with bootstrap 95 % CIs, ROC and confusion-matrix pictures, the
per-pathology breakdown and Table 1, logged to the `ct3dflow-comparison` MLflow experiment. A second
evaluation of the same model version is refused unless `--force`. Several `--model` URIs are evaluated in
turn in this one job (each with its own operating point and map kind); one that is refused does not stop
the others.
"""

from _common import init_ray, job_config

from ct3dflow.adapters.ray_jobs import evaluate_models


def _args(p):
    p.add_argument("--model", nargs="+", help="MLflow model URI(s), each evaluated in turn (default "
                   "models:/<mlflow.registered_model>@champion)")
    p.add_argument("--force", action="store_true", help="evaluate a model version on the test split again")


if __name__ == "__main__":
    cfg, args = job_config("Evaluate a tuned model on the test split (once per model version).", _args)
    init_ray()
    evaluate_models(cfg, args.model or [None], force=args.force)
