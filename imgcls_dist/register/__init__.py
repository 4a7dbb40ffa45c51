"""`imgcls-dist register`: a model file or an ensemble as a new version of an MLflow registered model, which
`infer`, `predict` and `serve` then take as `models:/NAME/VERSION` (docs/design.md, "Registered models")."""
