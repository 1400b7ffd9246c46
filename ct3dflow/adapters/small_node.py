"""Ray's housekeeping on a small single node: the demo's embedded cluster and the test suite's head.

On 2 cores every Ray process competes with the work for CPU, and four of Ray's defaults pay for a big
cluster that one node does not have (measured per job in docs/BENCHMARKS.md, ``bench/job_cpu.py``):

* every worker exports Prometheus metrics (nothing scrapes them here);
* the node publishes its stats every 5 s (30 s is plenty for the dashboard of one machine);
* the log monitor looks for new workers' log files every 0.1 s (0.5 s here);
* each Ray Train run starts a preemption-watcher actor (one node never drains);
* the raylet starts one idle worker per CPU when the first driver connects, which no job of ours then used
  (each costs ≈ 3 CPU-s to start on 2 cores; a job starts the workers it needs).

The platform's own head (``platform/ray-head.sh``) and clusters keep Ray's defaults.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SMALL_NODE_ENV = {
    "RAY_enable_metrics_collection": "false",
    "REPORTER_UPDATE_INTERVAL_MS": "30000",
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_prestart_worker_first_driver": "false",
}


def use_small_node_settings(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set :data:`SMALL_NODE_ENV` where the caller has not chosen a value; before Ray starts its processes
    (they inherit this environment)."""
    for k, v in SMALL_NODE_ENV.items():
        environ.setdefault(k, v)
