"""TTA views: shape, dtype and meaning of each view; defaults and errors of resolve_views."""

from __future__ import annotations

import pytest
import torch

from imgcls_dist.errors import UserError
from imgcls_dist.infer.tta import DEFAULT_VIEWS, VIEWS, apply_views, resolve_views


@pytest.fixture
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", list(VIEWS))
def test_every_view_keeps_shape_and_dtype(name, batch):
    out = VIEWS[name](batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    one = VIEWS[name](torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    assert one.shape == (1, 1, 16, 16)


def test_identity_hflip_vflip(batch):
    assert torch.equal(VIEWS["identity"](batch), batch)
    assert torch.equal(VIEWS["hflip"](batch)[..., 0], batch[..., -1])
    assert torch.equal(VIEWS["hflip"](VIEWS["hflip"](batch)), batch)
    assert torch.equal(VIEWS["vflip"](batch)[..., 0, :], batch[..., -1, :])


def test_shifts_move_content_and_replicate_edges(batch):
    right = VIEWS["shift_right"](batch)  # 2 px at 32
    assert torch.equal(right[..., 2:], batch[..., :-2])
    assert torch.equal(right[..., 0], batch[..., 0]) and torch.equal(right[..., 1], batch[..., 0])
    up = VIEWS["shift_up"](batch)
    assert torch.equal(up[..., :-2, :], batch[..., 2:, :])
    assert torch.equal(up[..., -1, :], batch[..., -1, :])
    left, down = VIEWS["shift_left"](batch), VIEWS["shift_down"](batch)
    assert torch.equal(left[..., :-2], batch[..., 2:]) and torch.equal(down[..., 2:, :], batch[..., :-2, :])


def test_zooms_scale_content():
    # A centered white square on black: zoom_in enlarges it, zoom_out shrinks it.
    x = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    x[..., 8:24, 8:24] = 255
    area = lambda t: int((t > 127).sum())  # noqa: E731
    assert area(VIEWS["zoom_in"](x)) > area(x) > area(VIEWS["zoom_out"](x))
    flat = torch.full((2, 3, 20, 20), 77, dtype=torch.uint8)
    assert torch.equal(VIEWS["zoom_in"](flat), flat) and torch.equal(VIEWS["zoom_out"](flat), flat)


def test_apply_views_is_view_major(batch):
    out = apply_views(batch, ["identity", "hflip"])
    assert out.shape == (6, 3, 32, 32)
    assert torch.equal(out[:3], batch) and torch.equal(out[3:], batch.flip(-1))


def test_defaults_follow_hflip_metadata():
    no_flip = resolve_views(None, hflip_ok=False)
    assert "hflip" not in no_flip and "vflip" not in no_flip
    assert no_flip[0] == "identity" and any(v.startswith("shift_") for v in no_flip) and "zoom_in" in no_flip
    assert resolve_views(None, hflip_ok=True) == DEFAULT_VIEWS[True] and "hflip" in DEFAULT_VIEWS[True]
    assert resolve_views("none", hflip_ok=True) == ["identity"]
    assert resolve_views("default", hflip_ok=False) == no_flip
    assert resolve_views("identity, shift_up,identity", hflip_ok=False) == ["identity", "shift_up"]


def test_explicit_hflip_on_no_flip_model_is_user_error():
    with pytest.raises(UserError, match="hflip=false"):
        resolve_views("identity,hflip", hflip_ok=False)
    assert resolve_views(["hflip"], hflip_ok=True) == ["hflip"]


def test_unknown_view_lists_valid_names():
    with pytest.raises(UserError, match="unknown view 'rotate90'.*shift_left"):
        resolve_views("identity,rotate90", hflip_ok=True)
