"""Reduced-size JPEG decode (decode_image's min_size): the DCT scale it picks, every fixture at
reduced size (EXIF, CMYK, progressive, truncation, the pixel limit), and how far the model inputs and a
classifier's predictions move from a full decode."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.image_fixtures import LARGE_H, LARGE_W, write_image_fixtures
from benchmarks.decode_bench import agreement, full_input, mean_abs_diff, reduced_input
from imgcls_dist.data.builtin import digits_images
from imgcls_dist.data.decode import decode_image, is_jpeg
from imgcls_dist.data.synthetic import photo_jpeg
from imgcls_dist.errors import UserError
from imgcls_dist.predictor.prepare import prepare_file, prepare_image

LARGE = ("large_jpeg", "large_progressive_jpeg", "large_exif_rotated_jpeg", "large_cmyk_jpeg")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return {fx.name: fx for fx in write_image_fixtures(tmp_path_factory.mktemp("images"))}


def at_scale(shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    return (-(-shape[0] // scale), -(-shape[1] // scale), shape[2])  # libjpeg rounds a scaled side up


@pytest.mark.parametrize("min_size", [224, 32])
def test_every_fixture_at_reduced_size(fixtures, min_size):
    for fx in fixtures.values():
        data = fx.path.read_bytes()
        array, error = decode_image(data, min_size=min_size)
        if not fx.ok:  # damaged inputs, the oversize and bomb JPEGs included, are refused as without min_size
            assert array is None and fx.error_contains in error, (fx.name, error)
            continue
        assert error is None, (fx.name, error)
        assert array.dtype == np.uint8 and array.flags.c_contiguous and array.flags.writeable
        if fx.name in LARGE:  # 2000 // 224 = 8: the coarsest scale
            assert is_jpeg(data) and array.shape == at_scale(fx.expected_shape, 8), fx.name
        else:  # not a JPEG, or too small for any scale: exactly the full decode
            assert np.array_equal(array, decode_image(data).array), fx.name


@pytest.mark.parametrize("min_size, scale", [(250, 8), (251, 4), (500, 4), (501, 2), (1000, 2), (1001, 1)])
def test_the_smallest_scale_that_still_covers_min_size_in_both_dimensions(fixtures, min_size, scale):
    array = decode_image(fixtures["large_jpeg"].path.read_bytes(), min_size=min_size).array
    assert array.shape == at_scale((LARGE_H, LARGE_W, 3), scale)
    assert min(array.shape[:2]) >= min_size


def test_exif_orientation_cmyk_and_progressive_survive_reduced_decode(fixtures):
    rotated = decode_image(fixtures["large_exif_rotated_jpeg"].path.read_bytes(), min_size=224).array
    assert rotated.shape == (LARGE_W // 8, LARGE_H // 8, 3)  # portrait, as displayed
    assert (rotated[0, rotated.shape[1] // 2] > [230, -1, -1]).all() and rotated[0, :, 2].max() < 40  # top red
    assert (rotated[-1, rotated.shape[1] // 2] > [-1, -1, 230]).all() and rotated[-1, :, 0].max() < 40

    cmyk = fixtures["large_cmyk_jpeg"].path.read_bytes()
    reduced, full = decode_image(cmyk, min_size=224).array, decode_image(cmyk).array
    for (y, x), (fy, fx) in [((5, 5), (40, 40)), ((-5, -5), (-40, -40))]:
        assert np.abs(reduced[y, x].astype(int) - full[fy, fx]).max() <= 3
    assert reduced[5, 5, 0] < 30 and reduced[-5, -5, 1] < 30  # cyan above, magenta below

    baseline = decode_image(fixtures["large_jpeg"].path.read_bytes(), min_size=224).array
    progressive = decode_image(fixtures["large_progressive_jpeg"].path.read_bytes(), min_size=224).array
    # The same photo and quality: the same DCT coefficients, only stored in another order (identical decodes).
    assert np.abs(progressive.astype(int) - baseline).mean() < 0.5


def test_pixel_limit_applies_to_the_header_size_not_the_reduced_one(fixtures):
    data = fixtures["large_jpeg"].path.read_bytes()  # 6 MP stored, 94k px decoded at 1/8
    array, error = decode_image(data, max_pixels=5_000_000, min_size=32)
    assert array is None and "too large: 3000x2000" in error
    assert decode_image(data, max_pixels=6_000_000, min_size=32).error is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "224"])
def test_invalid_min_size_is_an_error_not_an_exception(fixtures, bad):
    array, error = decode_image(fixtures["jpeg"].path.read_bytes(), min_size=bad)
    assert array is None and "min_size must be a positive int" in error


def test_predict_reads_a_file_through_the_reduced_prepare(fixtures):
    fx = fixtures["large_jpeg"]
    keys = [(32, 1), (224, 3)]
    out = prepare_file(fx.path, keys)
    expected, _ = prepare_image(fx.path.read_bytes(), keys)
    assert all(np.array_equal(out[k], expected[k]) for k in keys)
    assert not np.array_equal(out[(224, 3)], full_input(fx.path.read_bytes(), 224))  # the reduced path ran
    with pytest.raises(UserError, match="truncated_large.jpg: truncated or corrupt"):
        prepare_file(fixtures["truncated_large_jpeg"].path, keys)


def test_model_inputs_move_little_on_large_photos(fixtures):
    digits, _, _ = digits_images(32)
    photos = [fixtures["large_jpeg"].path.read_bytes(), fixtures["large_progressive_jpeg"].path.read_bytes(),
              photo_jpeg(digits[7], LARGE_W, LARGE_H, seed=7, noise=6.0)]
    # Mean |difference| of uint8 values, with margin over what was measured (docs/benchmarks.md, "Reduced-size
    # JPEG decode"): 3000x2000 decodes to 375x250, which 224 px barely fits, the scale's worst case.
    assert mean_abs_diff(photos, 224) < 0.5
    assert mean_abs_diff(photos, 32) < 0.3
    assert all(not np.array_equal(full_input(b, 224), reduced_input(b, 224)) for b in photos)  # it did reduce


def test_classifier_top1_agreement_with_full_decode(digit_photo_classifier):
    # A LeNet-5 trained here on digit photos, over 1000 held-out digit photos sized so that their reduced
    # decodes span every scale and the whole [1x, 2x) range of short side / target (decode_bench.AGREEMENT_SIZES).
    # The threshold leaves margin below the agreement measured over several seeds and epoch counts; the rows
    # that flip are in photos that decode to little more than the target (docs/benchmarks.md, "Reduced-size
    # JPEG decode").
    predict, photos, labels = digit_photo_classifier
    r = agreement(predict, photos, labels)
    assert r["acc_full"] >= 0.85  # a classifier that is right most of the time: agreement means something
    assert r["agreement"] >= 0.995, r
