import copy
import pickle

import albumentations as A
import numpy as np
import pytest
import torch

from imgcls_dist.data import augment as aug
from imgcls_dist.data.presets import POLICY_PRESETS
from imgcls_dist.data.schema import hflip_allowed
from imgcls_dist.data.seeds import derive_seed
from imgcls_dist.errors import UserError


def _image(h, w, c, seed=0):
    """Smooth but textured image, so geometric ops visibly change pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 127 + 60 * np.sin(xx / max(w, 1) * 7) * np.cos(yy / max(h, 1) * 5)
    img = base[:, :, None] + rng.normal(0, 25, (h, w, c))
    return np.clip(img, 0, 255).astype(np.uint8)


def _red_left_blue_right(size=48):
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2, 0] = 255
    img[:, size // 2 :, 2] = 255
    return img


def _looks_flipped(out):
    """Per row, is blue left of red? Robust to rotation (<=30 deg), crops, jitter and holes."""
    r, b = out[:, :, 0].astype(int), out[:, :, 2].astype(int)
    xs = np.arange(out.shape[1])
    votes = []
    for red, blue in zip(r - b > 30, b - r > 30):
        if red.sum() >= 2 and blue.sum() >= 2:
            votes.append(np.sign(xs[red].mean() - xs[blue].mean()))
    return bool(votes) and np.mean(votes) > 0


POLICIES = list(POLICY_PRESETS)


@pytest.mark.parametrize("preset", [p for p in aug.PRESETS if p not in POLICY_PRESETS])  # a policy runs at any strength
@pytest.mark.parametrize("shape,size", [((40, 30, 3), 32), ((8, 8, 1), 32), ((100, 60, 3), 24), ((50, 70, 1), 24)])
def test_strength_zero_is_eval_resize(preset, shape, size):
    img = _image(*shape)
    expected = aug.apply(aug.build_eval_transform(size), img)
    t = aug.build_train_transform(preset, 0.0, size, seed=1)
    for _ in range(5):
        np.testing.assert_array_equal(aug.apply(t, img), expected)


@pytest.mark.parametrize("preset", aug.PRESETS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("src,size", [((8, 8), 32), ((50, 70), 24)])
def test_output_shape_and_dtype(preset, channels, strength, src, size):
    t = aug.build_train_transform(preset, strength, size, seed=0)
    img = _image(*src, channels)
    for _ in range(3):
        out = aug.apply(t, img)
        assert out.shape == (size, size, channels)
        assert out.dtype == np.uint8 and out.flags.c_contiguous


@pytest.mark.parametrize("preset", ["strong", *POLICIES])
def test_apply_accepts_2d_grayscale(preset):
    t = aug.build_train_transform(preset, 1.0, 16, seed=0)
    for _ in range(5):
        assert aug.apply(t, _image(10, 12, 1)[:, :, 0]).shape == (16, 16, 1)


def test_hflip_false_never_flips_and_true_sometimes_does():
    img = _red_left_blue_right()
    no_flip = aug.build_train_transform("strong", 1.0, 32, hflip=False, seed=0)
    assert not any(_looks_flipped(aug.apply(no_flip, img)) for _ in range(300))
    with_flip = aug.build_train_transform("strong", 1.0, 32, hflip=True, seed=0)
    flipped = sum(_looks_flipped(aug.apply(with_flip, img)) for _ in range(300))
    assert 60 < flipped < 240  # p = 0.5 at strength 1


def test_deviation_grows_with_strength():
    img = _image(48, 40, 3)
    ref = aug.apply(aug.build_eval_transform(32), img).astype(np.float32)

    def mean_dev(strength):
        t = aug.build_train_transform("standard", strength, 32, seed=0)
        return np.mean([np.abs(aug.apply(t, img).astype(np.float32) - ref).mean() for _ in range(150)])

    d0, d05, d1 = mean_dev(0.0), mean_dev(0.5), mean_dev(1.0)
    assert d0 == 0.0 < d05 < d1


def test_reseed_reproduces_and_different_seeds_differ():
    img = _image(40, 40, 3)
    t = aug.build_train_transform("strong", 1.0, 32)

    def stream(seed):
        aug.reseed(t, seed)
        return np.stack([aug.apply(t, img) for _ in range(4)])

    a = stream(123)
    np.testing.assert_array_equal(a, stream(123))
    assert not np.array_equal(a, stream(124))
    # the constructor's seed= means the same as reseeding
    seeded = aug.build_train_transform("strong", 1.0, 32, seed=123)
    np.testing.assert_array_equal(a, np.stack([aug.apply(seeded, img) for _ in range(4)]))


def test_forked_copies_repeat_unless_reseeded_per_worker():
    # DataLoader workers are copies of one transform: same stream until reseeded
    img = _image(40, 40, 3)
    t = aug.build_train_transform("standard", 1.0, 32, seed=7)
    w0, w1 = copy.deepcopy(t), copy.deepcopy(t)
    np.testing.assert_array_equal(aug.apply(w0, img), aug.apply(w1, img))
    aug.reseed(w0, derive_seed(7, 0, 0, 0))
    aug.reseed(w1, derive_seed(7, 0, 0, 1))
    assert not np.array_equal(aug.apply(w0, img), aug.apply(w1, img))


def test_derive_seed_has_no_trivial_collisions():
    seeds = {derive_seed(0, e, r, w) for e in range(4) for r in range(4) for w in range(4)}
    assert len(seeds) == 64


def test_reseed_keeps_ops_independent():
    # albumentations' own set_random_seed gives every op the same seed, so two p=0.5 ops
    # would always agree; with our shared generator they agree only about half the time
    import albumentations as A

    img = _image(8, 8, 3)
    t = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    agree = 0
    for seed in range(200):
        aug.reseed(t, seed)
        out = aug.apply(t, img)
        agree += np.array_equal(out, img) or np.array_equal(out, img[::-1, ::-1])
    assert 60 < agree < 140


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_batch_mix_targets_and_images(mixup, cutmix):
    torch.manual_seed(0)
    mix = aug.build_batch_mix(mixup, cutmix, prob=1.0, num_classes=5)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 5
    for _ in range(5):
        out, targets = mix(images.clone(), labels)
        assert out.shape == images.shape and targets.shape == (8, 5) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert not torch.equal(out, images)


def test_batch_mix_unapplied_still_returns_one_hot():
    torch.manual_seed(0)
    mix = aug.build_batch_mix(1.0, 1.0, prob=0.5, num_classes=4)
    images, labels = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    unmixed = 0
    for _ in range(30):
        out, targets = mix(images, labels)
        assert targets.shape == (6, 4)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        if torch.equal(out, images):
            unmixed += 1
            torch.testing.assert_close(targets, torch.nn.functional.one_hot(labels, 4).float())
    assert 0 < unmixed < 30


def test_batch_mix_disabled_returns_none():
    assert aug.build_batch_mix(0.0, 0.0, 1.0, 10) is None
    assert aug.build_batch_mix(0.2, 1.0, 0.0, 10) is None


def test_invalid_preset_and_strength():
    with pytest.raises(UserError, match=r"augment\.preset.*none, light, standard, strong"):
        aug.build_train_transform("heavy", 0.5, 32)
    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(UserError, match=r"augment\.strength.*\[0, 1\]"):
            aug.build_train_transform("standard", bad, 32)
    with pytest.raises(UserError, match="augment.preset"):
        aug.build_torchvision_train_transform("heavy", 0.5, 32)


def test_hflip_allowed():
    assert hflip_allowed({}) is True
    assert hflip_allowed({"name": "digits", "hflip": False}) is False
    with pytest.raises(UserError, match="hflip"):
        hflip_allowed({"hflip": "false"})


@pytest.mark.parametrize("preset", aug.PRESETS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_torchvision_equivalent_shape_and_dtype(preset, channels, strength):
    t = aug.build_torchvision_train_transform(preset, strength, 24, hflip=True)
    x = torch.from_numpy(_image(50, 70, channels)).permute(2, 0, 1)
    for _ in range(3):
        out = t(x)
        assert out.shape == (channels, 24, 24) and out.dtype == torch.uint8


@pytest.mark.parametrize("preset", ["none", *POLICIES])
@pytest.mark.parametrize("channels", [1, 3])
def test_random_erasing_replaces_one_rectangle_of_the_area_share_asked(preset, channels):
    size = 32
    img = np.full((size, size, channels), 200, np.uint8)
    # Erasing is the last op, so the same seed without it gives the image it erased in (the policies change
    # even a flat image: solarize, posterize, a translation's black border)
    erased = aug.build_train_transform(preset, 0.5, size, erasing_p=1.0, erasing_scale=(0.1, 0.2))
    plain = aug.build_train_transform(preset, 0.5, size)
    for seed in range(10):
        aug.reseed(erased, seed)
        aug.reseed(plain, seed)
        out = aug.apply(erased, img)
        assert out.shape == (size, size, channels) and out.dtype == np.uint8
        changed = np.argwhere((out != aug.apply(plain, img)).any(axis=2))
        rows, cols = changed[:, 0], changed[:, 1]
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # bounding box of the noise
        assert 0.05 * size * size <= box <= 0.25 * size * size  # ~the area share (noise may equal the image at edges)
    if preset == "none":
        off = aug.build_train_transform("none", 0.0, size, seed=0, erasing_p=0.0)
        np.testing.assert_array_equal(aug.apply(off, img), img)


def test_erasing_scale_is_checked():
    from imgcls_dist.config import build_config

    with pytest.raises(UserError, match=r"augment.erasing_scale: Value error, needs 0 < low <= high < 1"):
        build_config({"augment": {"erasing_p": 0.5, "erasing_scale": [0.5, 0.2]}})


@pytest.mark.parametrize("preset", POLICIES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("src,size", [((8, 8), 32), ((50, 70), 24), ((224, 224), 224)])
def test_policy_presets_keep_size_channels_and_dtype(preset, channels, src, size):
    img = _image(*src, channels)
    for seed in range(6):
        out = aug.apply(aug.build_train_transform(preset, 0.5, size, seed=seed), img)
        assert out.shape == (size, size, channels)
        assert out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable


@pytest.mark.parametrize("preset", POLICIES)
@pytest.mark.parametrize("channels", [1, 3])
def test_policy_presets_replay_a_seed_and_differ_across_seeds(preset, channels):
    images = [_image(40, 40, channels, seed=i) for i in range(8)]

    def batch(seed):
        t = aug.build_train_transform(preset, 0.5, 32, seed=seed)
        return np.stack([aug.apply(t, img) for img in images])

    a = batch(3)
    np.testing.assert_array_equal(a, batch(3))
    assert not np.array_equal(a, batch(4))
    # per image, as the DataLoader reseeds each sample: most of a batch differs between two seeds
    assert sum(not np.array_equal(x, y) for x, y in zip(a, batch(4))) >= 6


@pytest.mark.parametrize("preset", POLICIES)
def test_policy_leaves_the_callers_torch_rng_alone(preset):
    t = aug.build_train_transform(preset, 1.0, 32, seed=0)
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    aug.apply(t, _image(40, 40, 3))
    torch.testing.assert_close(torch.rand(4), expected)


@pytest.mark.parametrize("preset", POLICIES)
def test_policy_pipeline_has_no_mirroring_op_without_hflip(preset):
    def op_types(hflip, strength):
        return [type(op).__name__ for op in aug.build_train_transform(preset, strength, 32, hflip=hflip).transforms]

    assert op_types(False, 1.0) == ["Resize", "RandomResizedCrop", "TorchvisionPolicy"]
    assert op_types(True, 1.0) == ["Resize", "RandomResizedCrop", "HorizontalFlip", "TorchvisionPolicy"]
    assert op_types(True, 0.0) == ["Resize", "TorchvisionPolicy"]  # strength scales the light base only
    policy = aug.build_train_transform(preset, 1.0, 32, hflip=False).transforms[-1].policy
    spaces = [policy._AUGMENTATION_SPACE, getattr(policy, "_PARTIAL_AUGMENTATION_SPACE", {})]
    names = {name for space in spaces for name in space}
    assert "TranslateX" in names  # the op names torchvision uses: none of them mirrors
    assert not any(word in name.lower() for name in names for word in ("flip", "mirror"))


@pytest.mark.parametrize("preset", POLICIES)
@pytest.mark.parametrize("channels", [1, 3])
def test_policy_pipeline_pickles_and_replays(preset, channels):
    # DataLoader worker processes receive the pipeline pickled
    t = aug.build_train_transform(preset, 0.5, 32, seed=0, erasing_p=0.5)
    copy_ = pickle.loads(pickle.dumps(t))
    img = _image(40, 40, channels)
    for seed in (5, 6):
        aug.reseed(t, seed)
        aug.reseed(copy_, seed)
        np.testing.assert_array_equal(aug.apply(copy_, img), aug.apply(t, img))


def test_policy_arguments_reach_torchvision():
    t = aug.build_train_transform("randaugment", 0.5, 32, randaugment_n=3, randaugment_m=14)
    policy = t.transforms[-1].policy
    assert (policy.num_ops, policy.magnitude) == (3, 14)
    assert aug.build_train_transform("augmix", 0.5, 32, augmix_severity=7).transforms[-1].policy.severity == 7
    tv = aug.build_torchvision_train_transform("augmix", 0.5, 32, augmix_severity=7)
    assert tv.transforms[-1].severity == 7


def test_torchvision_policy_op_in_any_compose():
    # the wrapper alone, outside build_train_transform: 2-D gray in, same shape out
    op = aug.TorchvisionPolicy(aug.torchvision_policy("trivialaugment", 2, 9, 3), pil=True)
    t = A.Compose([op])
    aug.reseed(t, 0)
    out = t(image=_image(20, 20, 1)[:, :, 0])["image"]
    assert out.shape == (20, 20) and out.dtype == np.uint8


def test_policy_config_keys():
    from imgcls_dist.config import build_config

    cfg = build_config({"augment": {"preset": "randaugment", "randaugment_n": 1, "randaugment_m": 30}})
    assert (cfg.augment.randaugment_n, cfg.augment.randaugment_m, cfg.augment.augmix_severity) == (1, 30, 3)
    assert build_config({"augment": {"preset": "augmix", "augmix_severity": 10}}).augment.augmix_severity == 10
    assert build_config({"augment": {"preset": "trivialaugment"}}).augment.preset == "trivialaugment"
    for key, bad in (("randaugment_n", 0), ("randaugment_m", -1), ("randaugment_m", 31), ("augmix_severity", 0),
                     ("augmix_severity", 11)):
        with pytest.raises(UserError, match=f"augment.{key}"):
            build_config({"augment": {key: bad}})


def test_a_config_section_reaches_the_transform_whole():
    from imgcls_dist.config import AugmentConfig
    from imgcls_dist.data.augment import TorchvisionPolicy, train_transform_for

    aug = AugmentConfig(preset="randaugment", randaugment_n=3, randaugment_m=5, erasing_p=1.0,
                        erasing_scale=(0.1, 0.2))
    ops = list(train_transform_for(aug, 32, hflip=False, seed=0).transforms)
    policy = next(op for op in ops if isinstance(op, TorchvisionPolicy)).policy
    assert (policy.num_ops, policy.magnitude) == (3, 5)
    erasing = next(op for op in ops if isinstance(op, A.Erasing))
    assert erasing.p == 1.0 and tuple(erasing.scale) == (0.1, 0.2)
