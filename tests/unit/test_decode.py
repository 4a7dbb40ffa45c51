"""decode_image: every fixture, the colour/shape semantics that matter, and the never-raises contract."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from helpers.image_fixtures import W, H, fixture_names, write_image_fixtures
from imgcls_dist.data import decode as decode_mod
from imgcls_dist.data.decode import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, DecodeResult, decode_file, decode_image
from imgcls_dist.errors import UserError

WHITE = (255, 255, 255)
LEFT, MIDDLE, RIGHT = 2, W // 2, W - 3  # one column inside each third


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return {fx.name: fx for fx in write_image_fixtures(tmp_path_factory.mktemp("images"))}


def decode_ok(data: bytes, **kwargs) -> np.ndarray:
    array, error = decode_image(data, **kwargs)
    assert error is None, error
    return array


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


# --- every fixture -------------------------------------------------------------------------


@pytest.mark.parametrize("name", fixture_names(ok=True))
def test_good_fixture_decodes(fixtures, name):
    fx = fixtures[name]
    result = decode_image(fx.path.read_bytes())
    assert isinstance(result, DecodeResult) and result.error is None, result.error
    array = result.array
    assert array.shape == fx.expected_shape
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous and array.flags.writeable

    gray = decode_ok(fx.path.read_bytes(), channels=1)
    assert gray.shape == fx.expected_shape[:2] + (1,)
    assert gray.dtype == np.uint8 and gray.flags.c_contiguous


@pytest.mark.parametrize("name", fixture_names(ok=False))
@pytest.mark.parametrize("channels", [3, 1])
def test_damaged_fixture_is_rejected_not_raised(fixtures, name, channels):
    fx = fixtures[name]
    array, error = decode_image(fx.path.read_bytes(), channels=channels)
    assert array is None
    assert fx.error_contains in error
    assert "\n" not in error and len(error) <= 200


def test_fixture_set_covers_what_batch_tests_rely_on():
    assert {"truncated_jpeg", "random_bytes", "empty", "bomb_png", "ppm_not_allowed"} <= set(
        fixture_names(ok=False)
    )
    assert fixture_names() == fixture_names(ok=True) + fixture_names(ok=False)


# --- colour semantics ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rgba_png", "palette_transparent_png"])
def test_alpha_is_composited_onto_background(fixtures, name):
    array = decode_ok(fixtures[name].path.read_bytes())
    # Fully transparent pixels are stored as black: white proves compositing, not alpha-dropping.
    assert tuple(array[0, LEFT]) == WHITE
    r, g, b = (int(v) for v in array[0, MIDDLE])  # red at alpha 128 over white
    assert r == 255 and 120 <= g <= 135 and 120 <= b <= 135
    assert tuple(array[0, RIGHT]) == (0, 0, 255)


def test_background_colour_is_configurable(fixtures):
    array = decode_ok(fixtures["rgba_png"].path.read_bytes(), background=(0, 128, 0))
    assert tuple(array[0, LEFT]) == (0, 128, 0)


def test_16bit_is_scaled_not_clipped(fixtures):
    row = decode_ok(fixtures["gray16_png"].path.read_bytes())[0, :, 0].astype(int)
    assert row[255] == 255  # 65535
    assert abs(row[128] - 128) <= 1  # 32768; clipping would give 255
    assert row[0] == 0
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 32768, 65535], [0, 128, 255]),  # "I" holding 16-bit data: same scale as I;16
        ([-1000, 0, 1000], [0, 128, 255]),  # signed: no nominal range, stretch min..max
    ],
)
def test_32bit_int_mode(values, expected):
    img = Image.fromarray(np.array([values], dtype=np.int32))
    assert img.mode == "I"
    row = decode_ok(encode(img, "TIFF"))[0, :, 0]
    np.testing.assert_allclose(row, expected, atol=1)


def test_16bit_big_endian_tiff():
    img = Image.fromarray(np.array([[0, 32768, 65535]], dtype=">u2"))
    assert img.mode == "I;16B"
    np.testing.assert_allclose(decode_ok(encode(img, "TIFF"))[0, :, 0], [0, 128, 255], atol=1)


@pytest.mark.parametrize(
    "values, expected",
    [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 500.0, 1000.0], [0, 128, 255]), ([np.nan, 0.0, 1.0], [0, 0, 255])],
)
def test_float_mode(values, expected):
    img = Image.fromarray(np.array([values], dtype=np.float32))
    assert img.mode == "F"
    np.testing.assert_allclose(decode_ok(encode(img, "TIFF"))[0, :, 0], expected, atol=1)


def test_one_bit_and_la_modes():
    bits = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    assert decode_ok(encode(bits), channels=1)[0, :, 0].tolist() == [0, 255]
    la = Image.new("LA", (2, 1), (0, 0))  # transparent black
    assert tuple(decode_ok(encode(la))[0, 0]) == WHITE


def test_exif_orientation_is_applied(fixtures):
    array = decode_ok(fixtures["exif_rotated_jpeg"].path.read_bytes())
    assert array.shape == (W, H, 3)  # stored W x H, displayed H x W
    # Stored left half red, right half blue; rotated 90 degrees clockwise -> top red, bottom blue.
    assert array[2, H // 2, 0] > 200 and array[2, H // 2, 2] < 50
    assert array[-3, H // 2, 2] > 200 and array[-3, H // 2, 0] < 50


def test_cmyk_becomes_plausible_rgb(fixtures):
    array = decode_ok(fixtures["cmyk_jpeg"].path.read_bytes()).astype(int)
    assert array.shape[2] == 3
    cyan, magenta = array[2, 2], array[-3, 2]
    assert cyan[0] < 40 and cyan[1] > 215 and cyan[2] > 215
    assert magenta[0] > 215 and magenta[1] < 40 and magenta[2] > 215


def test_animated_gif_yields_first_frame(fixtures):
    assert tuple(decode_ok(fixtures["animated_gif"].path.read_bytes())[H // 2, W // 2]) == (255, 0, 0)


def test_grayscale_channels(fixtures):
    data = fixtures["gray_png"].path.read_bytes()
    rgb, gray = decode_ok(data), decode_ok(data, channels=1)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert np.array_equal(gray[..., 0], rgb[..., 0])


# --- limits and the whitelist --------------------------------------------------------------


def test_pixel_limit_is_checked_before_full_decode(fixtures, monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
    for name in ("oversize_png", "bomb_png"):
        array, error = decode_image(fixtures[name].path.read_bytes())
        assert array is None and error.startswith("too large")
    assert loads == []  # rejected from the header: pixel data was never decoded


def test_small_max_pixels_rejects_normal_image(fixtures):
    data = fixtures["rgb_png"].path.read_bytes()
    array, error = decode_image(data, max_pixels=100)
    assert array is None and error == f"too large: {W}x{H} = {W * H} pixels > limit 100"
    assert decode_image(data, max_pixels=W * H).error is None  # the limit itself is allowed


def test_default_limit_sits_below_pils_bomb_warning():
    assert DEFAULT_MAX_PIXELS < Image.MAX_IMAGE_PIXELS


def test_pil_bomb_warning_is_suppressed(fixtures):
    # 1e8 px: above PIL's warning threshold, below its hard error, above our limit.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "too large" in decode_image(fixtures["oversize_png"].path.read_bytes()).error
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_whitelist():
    assert ALLOWED_FORMATS == {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}
    array, error = decode_image(encode(Image.new("RGB", (4, 4)), "TGA"))
    assert array is None and error == "format TGA not in whitelist"


def test_refuses_when_truncated_loading_was_enabled_globally(fixtures, monkeypatch):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nobody in our import chain flipped it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    array, error = decode_image(fixtures["truncated_jpeg"].path.read_bytes())
    assert array is None and "LOAD_TRUNCATED_IMAGES" in error


# --- the never-raises contract -------------------------------------------------------------


@pytest.mark.parametrize(
    "data, error",
    [
        (None, "no image bytes (None)"),
        (b"", "empty bytes"),
        ("not bytes", "expected bytes, got str"),
        (12, "expected bytes, got int"),
    ],
)
def test_bad_argument_types(data, error):
    assert decode_image(data) == (None, error)


def test_bytes_like_inputs_accepted(fixtures):
    data = fixtures["rgb_png"].path.read_bytes()
    assert decode_image(bytearray(data)).error is None
    assert decode_image(memoryview(data)).error is None


def test_bad_channels_is_an_error_not_an_exception(fixtures):
    array, error = decode_image(fixtures["rgb_png"].path.read_bytes(), channels=4)
    assert array is None and "channels" in error


def test_unexpected_internal_failure_becomes_error(fixtures, monkeypatch):
    def boom(*args):
        raise MemoryError("simulated")

    monkeypatch.setattr(decode_mod, "_to_array", boom)
    array, error = decode_image(fixtures["rgb_png"].path.read_bytes())
    assert array is None and error == "decode failed: MemoryError: simulated"


@pytest.mark.parametrize("name", ["jpeg", "rgb_png", "gray16_png", "animated_gif", "webp", "tiff"])
def test_corrupted_bytes_never_raise(fixtures, name):
    data = fixtures[name].path.read_bytes()
    rng = random.Random(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            mutant = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                mutant[rng.randrange(len(mutant))] = rng.randrange(256)
            if rng.random() < 0.3:
                mutant = mutant[: rng.randint(1, len(mutant))]
            array, error = decode_image(bytes(mutant))  # must not raise
            assert (array is None) != (error is None)
            if array is not None:
                assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    # PIL's per-file metadata complaints stay inside decode; batch jobs would log them per row.
    assert [str(w.message) for w in caught] == []


# --- decode_file (predict) -----------------------------------------------------------------


def test_decode_file_returns_rgb_array(fixtures):
    assert decode_file(fixtures["jpeg"].path).shape == (H, W, 3)


@pytest.mark.parametrize("name", ["truncated_jpeg", "random_bytes", "ppm_not_allowed"])
def test_decode_file_raises_user_error_naming_path(fixtures, name):
    path = fixtures[name].path
    with pytest.raises(UserError) as excinfo:
        decode_file(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ") and fixtures[name].error_contains in message


def test_decode_file_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(UserError, match="nope.jpg: cannot read file"):
        decode_file(path)
