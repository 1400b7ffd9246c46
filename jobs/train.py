"""`ray job submit --working-dir . -- python jobs/train.py --config configs/paper.yaml`

Submitting it again with the same `name` resumes from the last checkpoint and continues the MLflow run.
"""

from _common import init_ray, job_config

from ct3dflow.adapters.ray_jobs import train_job

if __name__ == "__main__":
    cfg, _ = job_config("Train the 3D GLOW with Ray Train; log and register it in MLflow.")
    init_ray()
    train_job(cfg)
