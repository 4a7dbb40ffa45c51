"""Model files and ensembles as standalone inference files (ONNX), for runtimes without PyTorch."""
