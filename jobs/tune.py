"""`ray job submit --working-dir . -- python jobs/tune.py --config configs/demo.yaml [--model models:/NAME@champion]`

Scores the validation split once with the registered model (default: `mlflow.registered_model`'s
champion), searches its map kind's parameters with Ray Tune (σ, τ, v_min; for anatomy-density also the density
and blob weights; T from the validation ROC in every trial) and stores the
best operating point on the model version and in the `ct3dflow-comparison` MLflow experiment. The test
split is never read.
"""

from _common import init_ray, job_config

from ct3dflow.adapters.ray_jobs import tune_job


def _args(p):
    p.add_argument("--model", help="MLflow model URI (default models:/<mlflow.registered_model>@champion)")


if __name__ == "__main__":
    cfg, args = job_config("Choose the operating point on the validation split with Ray Tune.", _args)
    init_ray()
    tune_job(cfg, model_uri=args.model)
