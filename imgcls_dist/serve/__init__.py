"""Online inference with Ray Serve: `imgcls_dist.serve:app` is the application builder (`serve run`,
configs/serve.yaml); `imgcls-dist serve` runs it on a local Ray."""

__all__ = ["app", "build_app"]


def __getattr__(name: str):
    # Loaded on first use (PEP 562): the CLI reads serve's settings to build its help, and that must not
    # import Ray Serve and torch for every command.
    if name in __all__:
        from imgcls_dist.serve import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
