"""Shared argument handling for the thin job entrypoints (not a package: jobs/ is a script folder)."""

import argparse
import os
import sys

# `ray job submit --working-dir .` runs from a copy of the repository: make its ct3dflow importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ct3dflow.config import load_config, parse_overrides  # noqa: E402


def job_config(description: str, extra=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="job configuration (YAML), e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.iterations=200 (repeatable)")
    if extra:
        extra(p)
    args = p.parse_args()
    cfg = load_config(args.config, parse_overrides(args.set))
    print(cfg.to_yaml(), flush=True)
    return cfg, args


def init_ray():
    import ray

    from ct3dflow.adapters.ray_data import configure_data_context

    ray.init(log_to_driver=True)
    configure_data_context()  # every dataset of the job, the train job's patch stream in its split coordinator too
    return ray
