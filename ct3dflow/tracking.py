"""Where the MLflow adapter lived before 0.2: ``ct3dflow.adapters.tracking`` now.

Models registered before the move store a "models from code" file that imports
``ct3dflow.tracking.PatchModelPyfunc``; this alias keeps them loadable. Nothing is imported (and MLflow is
not loaded) until a name is asked for.
"""


def __getattr__(name):
    from .adapters import tracking

    return getattr(tracking, name)
