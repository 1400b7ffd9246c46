"""CT-3DFlow: unsupervised pathology detection in chest CT with a 3D GLOW normalizing flow."""
import os

# torch's OpenMP threads otherwise spin while they wait for work. Where processes share cores (a Ray Train
# worker beside Ray Data tasks, scoring actors, a test session beside its Ray jobs) the spinning threads hold
# the cores the others need: two detection-model trainings on 2 cores ran 6.6× slower per step than with
# passive waiting (bench/omp_wait.py, docs/BENCHMARKS.md). libgomp reads this when torch loads, so it must
# be set before `import torch`; a value the user exported wins. Ray workers inherit it from the driver
# (`ray.init`) or from platform/env.sh (`ray start`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
