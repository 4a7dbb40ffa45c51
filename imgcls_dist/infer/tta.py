"""Test-time augmentation views: uint8 NCHW in, uint8 NCHW of the same shape out, on any device.

Views run on the already-resized batch (after the transfer to the device, before normalize), so one
batched forward per model covers every view. Shifts and zoom-out extend the image by repeating its edge
pixels rather than padding with black: scans and photos rarely have black borders, and for the
dark-on-white digits a black border would be a new stroke.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from imgcls_dist.errors import UserError

# ~6% of the side (2 px at 32, 14 px at 224), the same magnitude as the "standard" training affine's
# translate, so the shifted views stay inside what the model saw during training.
SHIFT_FRACTION = 0.0625
ZOOM_IN_KEEP = 0.9  # center crop keeping 90% of the side, resized back
ZOOM_OUT_PAD = 0.05  # 5% edge-replicated border per side, resized back


def _shift_pixels(side: int) -> int:
    return max(1, round(side * SHIFT_FRACTION))


def _edge_index(n: int, offset: int, device: torch.device) -> torch.Tensor:
    # Output position i reads input position i - offset, clamped: clamping the index is edge padding,
    # and works on uint8 (F.pad's replicate mode has no uint8 kernel).
    return (torch.arange(n, device=device) - offset).clamp_(0, n - 1)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if dy:
        x = x.index_select(-2, _edge_index(h, dy, x.device))
    if dx:
        x = x.index_select(-1, _edge_index(w, dx, x.device))
    return x


def _resize_uint8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    y = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def vflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-2)


def shift_up(x: torch.Tensor) -> torch.Tensor:
    return _shift(x, -_shift_pixels(x.shape[-2]), 0)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    return _shift(x, _shift_pixels(x.shape[-2]), 0)


def shift_left(x: torch.Tensor) -> torch.Tensor:
    return _shift(x, 0, -_shift_pixels(x.shape[-1]))


def shift_right(x: torch.Tensor) -> torch.Tensor:
    return _shift(x, 0, _shift_pixels(x.shape[-1]))


def zoom_in(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * ZOOM_IN_KEEP)), max(1, round(w * ZOOM_IN_KEEP))
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize_uint8(x[..., top : top + ch, left : left + cw], h, w)


def zoom_out(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = max(1, round(h * ZOOM_OUT_PAD)), max(1, round(w * ZOOM_OUT_PAD))
    rows = (torch.arange(h + 2 * ph, device=x.device) - ph).clamp_(0, h - 1)
    cols = (torch.arange(w + 2 * pw, device=x.device) - pw).clamp_(0, w - 1)
    padded = x.index_select(-2, rows).index_select(-1, cols)
    return _resize_uint8(padded, h, w)


VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    f.__name__: f
    for f in (identity, hflip, vflip, shift_up, shift_down, shift_left, shift_right, zoom_in, zoom_out)
}
# Views that mirror the image: only valid where a mirrored input keeps its class.
MIRRORING = frozenset({"hflip", "vflip"})

_SHIFTS = ["shift_left", "shift_right", "shift_up", "shift_down"]
# vflip is never a default: upside-down is a different picture for almost every dataset.
DEFAULT_VIEWS = {
    True: ["identity", "hflip", *_SHIFTS],
    False: ["identity", *_SHIFTS, "zoom_in"],
}


def resolve_views(names: str | Iterable[str] | None, hflip_ok: bool) -> list[str]:
    """View names to run, in order, without duplicates.

    None or "default": the default set for the model (no flips when `hflip_ok` is False).
    "none": identity only. A string is a comma-separated list. Asking for hflip/vflip on a model whose
    metadata says mirrored images change class (digits) is a UserError, as is an unknown name.
    """
    if names is None:
        return list(DEFAULT_VIEWS[bool(hflip_ok)])
    if isinstance(names, str):
        key = names.strip().lower()
        if key in ("", "default"):
            return list(DEFAULT_VIEWS[bool(hflip_ok)])
        if key == "none":
            return ["identity"]
        names = key.split(",")
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in VIEWS:
            raise UserError(f"--tta: unknown view {raw!r}; valid views: {', '.join(VIEWS)} (or 'none', 'default')")
        if name in MIRRORING and not hflip_ok:
            raise UserError(
                f"--tta: view {name!r} mirrors the image, but the model metadata says hflip=false "
                "(mirrored inputs change class, e.g. digits); drop it from --tta"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise UserError("--tta: no views given")
    return out


def apply_views(x: torch.Tensor, views: list[str]) -> torch.Tensor:
    """[N,C,H,W] -> [V*N,C,H,W], view-major: rows v*N..(v+1)*N-1 hold view v of every image."""
    if len(views) == 1:
        return VIEWS[views[0]](x)
    return torch.cat([VIEWS[v](x) for v in views], dim=0)
