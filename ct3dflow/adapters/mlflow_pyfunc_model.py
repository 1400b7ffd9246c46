"""MLflow "models from code" entry: the registry stores this file, not a pickle of an object.

It is imported only by MLflow when a model is logged or loaded (``mlflow.models.set_model``).
"""

import mlflow

from ct3dflow.adapters.tracking import PatchModelPyfunc

mlflow.models.set_model(PatchModelPyfunc())
