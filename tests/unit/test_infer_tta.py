"""TTA views: shape, dtype and meaning of each view; defaults and errors of resolve_views."""

from __future__ import annotations

import pytest
import torch

from imgcls_dist.errors import UserError
from imgcls_dist.data.presets import POLICY_BASE, POLICY_PRESETS, SPECS
from imgcls_dist.predictor.tta import FALLBACK_VIEWS, SHIFT_FRACTION, VIEWS, apply_views, default_views, resolve_views, training_views


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


@pytest.mark.parametrize("side", [32, 64])
def test_shifts_move_content_and_replicate_edges(side):
    batch = torch.randint(0, 256, (3, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    k = round(side * SHIFT_FRACTION)  # 1 px at 32, 2 px at 64
    right = VIEWS["shift_right"](batch)
    assert torch.equal(right[..., k:], batch[..., :-k])
    assert all(torch.equal(right[..., i], batch[..., 0]) for i in range(k))
    up = VIEWS["shift_up"](batch)
    assert torch.equal(up[..., :-k, :], batch[..., k:, :])
    assert torch.equal(up[..., -1, :], batch[..., -1, :])
    left, down = VIEWS["shift_left"](batch), VIEWS["shift_down"](batch)
    assert torch.equal(left[..., :-k], batch[..., k:]) and torch.equal(down[..., k:, :], batch[..., :-k, :])


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
    assert resolve_views(None, hflip_ok=False) == FALLBACK_VIEWS[False] == ["identity"]
    assert resolve_views(None, hflip_ok=True) == FALLBACK_VIEWS[True] and "hflip" in FALLBACK_VIEWS[True]
    assert resolve_views("none", hflip_ok=True) == ["identity"]
    given = ["identity", "shift_left", "zoom_in"]
    assert resolve_views("default", hflip_ok=False, default=given) == given
    assert resolve_views(None, hflip_ok=False, default=given) == given
    assert resolve_views("identity, shift_up,identity", hflip_ok=False) == ["identity", "shift_up"]


def _meta(preset: str | None, strength: float = 1.0, hflip: bool = True) -> dict:
    cfg = {} if preset is None else {"augment": {"preset": preset, "strength": strength, "hflip": None}}
    return {"hflip": hflip, "config": cfg}


@pytest.mark.parametrize("preset, strength, hflip, expected", [
    # light has crops of <= 15% area and no affine: no shift, and a 0.9-side crop (81% area) is outside it
    ("light", 0.5, True, ["identity", "hflip"]),
    ("light", 1.0, False, ["identity"]),
    ("none", 1.0, True, ["identity"]),
    # standard at 0.5: translate 3.1% (= the shift view), crops down to 75% area (zoom_in), scale +-5% (no zoom_out)
    ("standard", 0.5, False, ["identity", "shift_left", "shift_right", "shift_up", "shift_down", "zoom_in"]),
    ("standard", 0.4, False, ["identity", "zoom_in"]),  # translate 2.5% < one shift
    ("standard", 1.0, True, ["identity", "hflip", "shift_left", "shift_right", "shift_up", "shift_down", "zoom_in",
                             "zoom_out"]),
    ("strong", 1.0, False, ["identity", "shift_left", "shift_right", "shift_up", "shift_down", "zoom_in", "zoom_out"]),
])
def test_training_views_stay_inside_the_training_augmentation(preset, strength, hflip, expected):
    assert training_views(_meta(preset, strength, hflip)) == expected
    spec = SPECS[preset]
    if any(v.startswith("shift_") for v in expected):
        assert spec.shift * strength >= SHIFT_FRACTION - 1e-9


_SHIFTS = ["shift_left", "shift_right", "shift_up", "shift_down"]


@pytest.mark.parametrize("preset", list(POLICY_PRESETS))
def test_training_views_of_policy_presets(preset):
    # the light crop (>= 85% of the area: no zoom_in) and flip, scaled by strength; the policy's translations
    # reach a shift view at any strength
    light = SPECS[POLICY_BASE]
    assert (SPECS[preset].crop_area, SPECS[preset].flip_p) == (light.crop_area, light.flip_p)
    assert SPECS[preset].affine_p == SPECS[preset].color_p == 0
    assert training_views(_meta(preset, 0.5, True)) == ["identity", "hflip", *_SHIFTS]
    assert training_views(_meta(preset, 1.0, False)) == ["identity", *_SHIFTS]
    assert training_views(_meta(preset, 0.0, True)) == ["identity", *_SHIFTS]


@pytest.mark.parametrize("key, value, shifts", [
    ("randaugment_m", 2, False), ("randaugment_m", 3, True), ("augmix_severity", 1, False), ("augmix_severity", 2, True),
])
def test_policy_shift_views_follow_the_policy_magnitude(key, value, shifts):
    meta = _meta(key.split("_")[0], 1.0, False)
    meta["config"]["augment"][key] = value
    assert training_views(meta) == ["identity", *(_SHIFTS if shifts else [])]


@pytest.mark.parametrize("side", [32, 224, 1024])
def test_policy_translation_table_matches_torchvision(side):
    # policy_max_shift restates torchvision's magnitude tables; the pixels it translates by are int()-truncated
    from torchvision.transforms import v2 as T

    def max_pixels(space, bins, index):
        return int(space["TranslateX"][0](bins, side, side)[index])

    shift_px = max(1, round(side * SHIFT_FRACTION))  # the shift view's pixels (tta._shift_pixels)
    for m in (2, 3, 9):
        covers = max_pixels(T.RandAugment._AUGMENTATION_SPACE, 31, m) >= shift_px
        assert covers == ("shift_left" in training_views({"hflip": False, "config": {"augment": {
            "preset": "randaugment", "strength": 1.0, "randaugment_m": m}}}))
    for severity in (1, 2, 3):
        covers = max_pixels(T.AugMix._AUGMENTATION_SPACE, 10, severity - 1) >= shift_px
        assert covers == ("shift_left" in training_views({"hflip": False, "config": {"augment": {
            "preset": "augmix", "strength": 1.0, "augmix_severity": severity}}}))
    assert max_pixels(T.TrivialAugmentWide._AUGMENTATION_SPACE, 31, -1) >= shift_px


def test_training_views_without_config_fall_back():
    assert training_views({"hflip": False}) == ["identity"]
    assert training_views(_meta(None)) == FALLBACK_VIEWS[True]
    assert training_views({"config": {"augment": {"preset": "bogus"}}}) == FALLBACK_VIEWS[True]


def test_ensemble_default_is_what_every_member_saw():
    strong, light = _meta("standard", 1.0, hflip=False), _meta("standard", 0.5, hflip=False)
    assert default_views([strong, light]) == training_views(light)
    assert default_views([strong, _meta("light", 0.5, hflip=False)]) == ["identity"]


def test_explicit_hflip_on_no_flip_model_is_user_error():
    with pytest.raises(UserError, match="hflip=false"):
        resolve_views("identity,hflip", hflip_ok=False)
    assert resolve_views(["hflip"], hflip_ok=True) == ["hflip"]


def test_unknown_view_lists_valid_names():
    with pytest.raises(UserError, match="unknown view 'rotate90'.*shift_left"):
        resolve_views("identity,rotate90", hflip_ok=True)
