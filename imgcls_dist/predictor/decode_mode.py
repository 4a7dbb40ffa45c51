"""`--decode` (infer) and `decode` (serve): where JPEG rows are decoded. Its own module, free of torch and
Ray, because the job's driver, the Serve settings and the device-decode code all read the one rule."""

from __future__ import annotations

from imgcls_dist.errors import UserError

DECODE_MODES = ("auto", "cpu", "device")


def resolve_decode(mode: str, gpus_per_actor: float) -> str:
    """"auto" decodes on the predictor's device when it has GPUs (nvJPEG outruns CPU decode tasks there,
    predictor/device_decode.py), else on CPUs (the job's decode tasks, a CPU replica's own thread)."""
    if mode not in DECODE_MODES:
        raise UserError(f"--decode: must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "device" if gpus_per_actor > 0 else "cpu"
    return mode
