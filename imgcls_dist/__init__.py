"""imgcls-dist: distributed image classification (train, tune, batch-infer) on Ray."""

__version__ = "0.1.0"
