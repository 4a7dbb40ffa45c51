"""The file MLflow runs to load a registered model ("models from code": the logged model holds a copy of this
file, not a pickled object). Never imported by the package itself: `register` passes its path to MLflow."""

import mlflow.models

from imgcls_dist.register.pyfunc import EnsembleModel

mlflow.models.set_model(EnsembleModel())
