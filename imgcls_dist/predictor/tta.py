"""Test-time augmentation views: uint8 NCHW in, uint8 NCHW of the same shape out, on any device.

`VIEWS` by name; `training_views` and `default_views` give the views a model saw in training (from its model
file's config), `resolve_views` checks what the user asks for. Design: docs/design.md, "TTA views".
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from imgcls_dist.data.presets import policy_max_shift, scaled
from imgcls_dist.errors import UserError
from imgcls_dist.predictor.options import VIEW_NAMES

# ~3% of the side (1 px at 32, 7 px at 224): the "standard" preset's affine translate at strength 0.5,
# so a model trained that way has seen every shifted view.
SHIFT_FRACTION = 0.03125
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


VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {name: globals()[name] for name in VIEW_NAMES}
# Views that mirror the image: only valid where a mirrored input keeps its class.
MIRRORING = frozenset({"hflip", "vflip"})

_SHIFTS = ["shift_left", "shift_right", "shift_up", "shift_down"]
# For a model file without a training config: only the classic mirror view where mirroring is allowed.
FALLBACK_VIEWS = {True: ["identity", "hflip"], False: ["identity"]}
_EPS = 1e-6


def training_views(meta: dict[str, Any]) -> list[str]:
    """The views inside the augmentation a model was trained with (read from its model file's config)."""
    hflip_ok = bool(meta.get("hflip", True))
    aug = (meta.get("config") or {}).get("augment")
    try:
        a = scaled(aug["preset"], float(aug.get("strength", 1.0)))
        # the policy presets translate in ops of their own, whatever the strength (it scales their crop and flip)
        policy_shift = policy_max_shift(aug)
    except (TypeError, KeyError, ValueError, AttributeError):
        return list(FALLBACK_VIEWS[hflip_ok])
    views = ["identity"]
    # meta["hflip"] is what training resolved (augment.hflip, else the dataset's flag)
    if hflip_ok and a.flip_p > 0:
        views.append("hflip")
    affine = a.affine_p > 0
    if max(a.shift if affine else 0.0, policy_shift) >= SHIFT_FRACTION - _EPS:
        views += _SHIFTS
    # zoom_in = a centered crop of ZOOM_IN_KEEP of the side: inside RandomResizedCrop's area range, or an
    # affine zoom by 1 / ZOOM_IN_KEEP.
    if (a.crop_p > 0 and 1 - a.crop_area <= ZOOM_IN_KEEP**2 + _EPS) or (affine and 1 + a.scale >= 1 / ZOOM_IN_KEEP - _EPS):
        views.append("zoom_in")
    if affine and 1 - a.scale <= 1 / (1 + 2 * ZOOM_OUT_PAD) + _EPS:
        views.append("zoom_out")
    return views


def default_views(metas: Sequence[dict[str, Any]]) -> list[str]:
    """The views every member saw in training, in `training_views` order."""
    sets = [training_views(m) for m in metas] or [list(FALLBACK_VIEWS[True])]
    return [v for v in sets[0] if all(v in s for s in sets[1:])]


def resolve_views(names: str | Iterable[str] | None, hflip_ok: bool, default: Sequence[str] | None = None) -> list[str]:
    """View names to run, in order, without duplicates.

    None or "default": `default` (the members' `default_views`), or FALLBACK_VIEWS[hflip_ok] without it.
    "none": identity only. A string is a comma-separated list. Asking for hflip/vflip on a model whose
    metadata says mirrored images change class (digits) is a UserError, as is an unknown name.
    """
    fallback = list(default) if default is not None else list(FALLBACK_VIEWS[bool(hflip_ok)])
    if names is None:
        return fallback
    if isinstance(names, str):
        key = names.strip().lower()
        if key in ("", "default"):
            return fallback
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
