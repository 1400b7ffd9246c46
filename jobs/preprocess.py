"""`ray job submit --working-dir . -- python jobs/preprocess.py --config configs/demo.yaml`"""

from _common import init_ray, job_config

from ct3dflow.adapters.ray_jobs import preprocess_job

if __name__ == "__main__":
    cfg, _ = job_config("Preprocess a manifest into the study cache on Ray CPU workers.")
    init_ray()
    preprocess_job(cfg)
