"""Experiment tracking and the model registry, through MLflow (`run.tracking: mlflow`, `imgcls-dist register`,
`models:/NAME/VERSION` wherever a model path is accepted). MLflow is an optional extra: nothing here is imported
unless a user asks for it. Where the server is and who the user is come from MLflow's own environment variables
(`MLFLOW_TRACKING_URI`, `MLFLOW_TRACKING_TOKEN`/`_USERNAME`/`_PASSWORD`, `MLFLOW_EXPERIMENT_NAME`): nothing is
configured twice. The run's own files stay the source of truth; the tracking server gets copies.
"""
