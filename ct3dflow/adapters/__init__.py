"""The platform's adapters: Ray (Data, Train, Tune, the jobs, the screening, the demo) and MLflow.

They wire the science core (``ct3dflow`` without this subpackage, which imports neither Ray nor MLflow) to
a cluster and a tracking server; none of them re-implements a step of the method.
"""
