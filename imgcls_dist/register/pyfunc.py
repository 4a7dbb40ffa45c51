"""The registered model's MLflow side: the pyfunc flavor around our EnsemblePredictor, so that
`mlflow.pyfunc.load_model("models:/NAME/VERSION")` (and `mlflow models serve`) classifies images too.

Input: a DataFrame with a binary `image` column of encoded image files (JPEG, PNG, ...). Output: one float
column per class, named by the class (the ensembled probabilities, in class order), and `error` (null, or why
the row's image could not be decoded; its probabilities are then NaN). Imported only where MLflow is installed.
"""

from __future__ import annotations

import base64

import mlflow.pyfunc
import numpy as np
import pandas as pd

from imgcls_dist.predictor.prepare import prepare_encoded
from imgcls_dist.tracking.registry import MODEL_ARTIFACT

IMAGE_COLUMN = "image"
ERROR_COLUMN = "error"


def signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("float", c) for c in classes] + [ColSpec("string", ERROR_COLUMN, required=False)]
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), outputs=Schema(outputs))


def _bytes(value) -> bytes | None:
    # Base64 text, as JSON carries bytes (MLflow's scoring server decodes it itself; a direct caller may not).
    return base64.b64decode(value) if isinstance(value, str) else value


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """Loads the predictor from the model's files (artifacts/model: model.pt, or ensemble.json and members/)
    with the defaults `predict` uses: the manifest's views, weights and temperatures, precision and backend
    chosen for the machine it runs on."""

    def load_context(self, context) -> None:
        from imgcls_dist.predictor.predict import load_predictor

        self.predictor = load_predictor(context.artifacts[MODEL_ARTIFACT])

    # pd.DataFrame: a hint MLflow derives no signature from, so the explicit one (binary `image`) is what it checks.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        arrays, errors = prepare_encoded([_bytes(v) for v in model_input[IMAGE_COLUMN]], self.predictor.input_keys)
        probs = self.predictor.predict_uint8(arrays)
        probs[np.array([e is not None for e in errors], dtype=bool)] = np.nan
        out = pd.DataFrame(probs, columns=self.predictor.classes)
        out[ERROR_COLUMN] = errors
        return out
