"""Online inference with Ray Serve: `imgcls_dist.serve:app` is the application builder (`serve run`,
configs/serve.yaml); `imgcls-dist serve` runs it on a local Ray."""

from imgcls_dist.serve.app import app, build_app

__all__ = ["app", "build_app"]
