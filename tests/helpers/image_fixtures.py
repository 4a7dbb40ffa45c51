"""Generated image inputs, good and damaged, for any test that feeds images to a job.

Usage:
    fixtures = write_image_fixtures(tmp_path)      # writes one file per fixture
    for fx in fixtures:
        data = fx.path.read_bytes()                 # the raw bytes a job would see
        # fx.ok: decode_image(data) must succeed, with array shape fx.expected_shape
        # not fx.ok: it must fail with fx.error_contains in the error string

Files are regenerated on every call (deterministic: fixed seeds), so nothing binary
is checked in and a Pillow upgrade cannot leave stale fixtures behind.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ImageFixture:
    name: str
    path: Path
    ok: bool  # True: must decode; False: must be rejected with an error, never raise
    error_contains: str | None  # substring of decode_image's error when not ok
    expected_shape: tuple[int, int, int] | None  # (H, W, 3) for channels=3, when ok
    notes: str = ""  # what the file is and what decoding it should prove


# Sizes are (width, height) as PIL uses them; arrays come out (height, width, C).
W, H = 64, 48
# Large enough that a reduced-size decode (decode_image's min_size) takes every DCT scale down to 1/8
# for 224 px, the size of a 6 MP camera photo.
LARGE_W, LARGE_H = 3000, 2000
BACKGROUND = (255, 255, 255)


def write_image_fixtures(directory: str | Path) -> list[ImageFixture]:
    """Write every fixture file into `directory` (created if missing) and describe them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fixtures = []
    for name, filename, data, ok, error_contains, shape, notes in _specs():
        path = directory / filename
        path.write_bytes(data)
        fixtures.append(ImageFixture(name, path, ok, error_contains, shape, notes))
    return fixtures


def fixture_names(ok: bool | None = None) -> list[str]:
    """Names without writing files, for pytest.mark.parametrize at collection time."""
    return [spec[0] for spec in _specs() if ok is None or spec[3] == ok]


def good(fixtures: list[ImageFixture]) -> list[ImageFixture]:
    return [f for f in fixtures if f.ok]


def damaged(fixtures: list[ImageFixture]) -> list[ImageFixture]:
    return [f for f in fixtures if not f.ok]


def _specs():
    rgb = (H, W, 3)
    yield "rgb_png", "rgb.png", _save(_noise_rgb(), "PNG"), True, None, rgb, "plain RGB PNG"
    yield "jpeg", "photo.jpg", _save(_noise_rgb(), "JPEG", quality=90), True, None, rgb, "plain RGB JPEG"
    yield "gray_png", "gray.png", _save(_gradient_l(), "PNG"), True, None, rgb, "mode L"
    yield ("palette_transparent_png", "palette.png", _palette_png(), True, None, rgb,
           "mode P with tRNS: left third transparent, middle half-transparent red, right opaque blue")
    yield ("rgba_png", "rgba.png", _rgba_png(), True, None, rgb,
           "left third (0,0,0,0), middle (255,0,0,128), right opaque blue")
    yield ("cmyk_jpeg", "cmyk.jpg", _cmyk_jpeg(), True, None, rgb,
           "CMYK JPEG: top half cyan, bottom half magenta")
    yield ("gray16_png", "gray16.png", _gray16_png(), True, None, (4, 256, 3),
           "16-bit gray: column c holds round(c*65535/255), column 128 is 32768")
    yield ("exif_rotated_jpeg", "rotated.jpg", _exif_rotated_jpeg(), True, None, (W, H, 3),
           "stored WxH, EXIF orientation 6; stored left half red / right blue -> top red / bottom blue")
    yield "webp", "img.webp", _save(_noise_rgb(), "WEBP", lossless=True), True, None, rgb, "lossless WebP"
    yield ("animated_gif", "anim.gif", _animated_gif(), True, None, rgb,
           "3 frames red, green, blue; the first (red) is the one decoded")
    yield "bmp", "img.bmp", _save(_noise_rgb(), "BMP"), True, None, rgb, "plain BMP"
    yield "tiff", "img.tiff", _save(_noise_rgb(), "TIFF"), True, None, rgb, "plain TIFF"
    yield ("mpo_jpeg", "camera.jpg", _mpo(), True, None, rgb,
           "JPEG with multi-picture extension; PIL calls it MPO")
    large = (LARGE_H, LARGE_W, 3)
    yield ("large_jpeg", "large.jpg", _large_photo(progressive=False), True, None, large,
           "3000x2000 photo-like JPEG (a digit '3' under a colour cast and noise), baseline")
    yield ("large_progressive_jpeg", "large_progressive.jpg", _large_photo(progressive=True), True, None, large,
           "the same photo as a progressive JPEG")
    yield ("large_exif_rotated_jpeg", "large_rotated.jpg", _large_exif_rotated_jpeg(), True, None,
           (LARGE_W, LARGE_H, 3), "stored 3000x2000, EXIF orientation 6; stored left half red / right blue")
    yield ("large_cmyk_jpeg", "large_cmyk.jpg", _large_cmyk_jpeg(), True, None, large,
           "3000x2000 CMYK JPEG: top half cyan, bottom half magenta")

    yield ("truncated_jpeg", "truncated.jpg", _cut(_save(_noise_rgb(128, 96), "JPEG", quality=95)),
           False, "truncated or corrupt", None, "first half of a valid JPEG")
    yield ("truncated_large_jpeg", "truncated_large.jpg", _cut(_large_photo(progressive=False)),
           False, "truncated or corrupt", None, "first half of the large baseline JPEG")
    yield ("truncated_progressive_jpeg", "truncated_progressive.jpg", _cut(_large_photo(progressive=True)),
           False, "truncated or corrupt", None, "first half of the large progressive JPEG")
    yield ("truncated_png", "truncated.png", _cut(_save(_noise_rgb(128, 96), "PNG")),
           False, "truncated or corrupt", None, "first half of a valid PNG")
    yield ("random_bytes", "random.bin", random.Random(1234).randbytes(4096),
           False, "not an image", None, "4 KiB of seeded noise")
    yield "empty", "empty.jpg", b"", False, "empty bytes", None, "zero-byte file"
    yield ("bomb_png", "bomb.png", _png_header_only(100_000, 100_000), False, "too large", None,
           "tiny PNG declaring 100000x100000; PIL's own bomb error fires inside open()")
    yield ("oversize_png", "oversize.png", _png_header_only(10_000, 10_000), False, "too large", None,
           "tiny PNG declaring 10000x10000 (1e8 px): under PIL's hard limit, over ours")
    yield ("oversize_jpeg", "oversize.jpg", _jpeg_declaring(10_000, 10_000), False, "too large", None,
           "16x16 JPEG whose frame header declares 10000x10000: refused from the header, also at reduced size")
    yield ("bomb_jpeg", "bomb.jpg", _jpeg_declaring(60_000, 60_000), False, "too large", None,
           "16x16 JPEG whose frame header declares 60000x60000; PIL's own bomb error fires inside open()")
    yield ("ppm_not_allowed", "img.ppm", _save(_noise_rgb(), "PPM"), False, "not in whitelist", None,
           "valid PPM: PIL opens it, the whitelist refuses it")
    yield ("ico_not_allowed", "favicon.ico", _save(_noise_rgb(32, 32), "ICO"), False, "not in whitelist",
           None, "valid ICO")


@lru_cache(maxsize=None)  # slow to make, and several tests write the fixture set more than once
def _large_photo(progressive: bool) -> bytes:
    from imgcls_dist.data.builtin import digits_images
    from imgcls_dist.data.synthetic import photo_jpeg

    images, _, _ = digits_images(32)
    return photo_jpeg(images[3], LARGE_W, LARGE_H, seed=3, progressive=progressive)


@lru_cache(maxsize=None)
def _large_exif_rotated_jpeg() -> bytes:
    return _exif_rotated_jpeg(LARGE_W, LARGE_H)


@lru_cache(maxsize=None)
def _large_cmyk_jpeg() -> bytes:
    img = Image.new("CMYK", (LARGE_W, LARGE_H), (255, 0, 0, 0))  # cyan
    img.paste((0, 255, 0, 0), (0, LARGE_H // 2, LARGE_W, LARGE_H))  # magenta
    return _save(img, "JPEG", quality=95)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A 16x16 baseline JPEG whose SOF0 frame header is patched to declare width x height (PIL reads the
    size from there, so the pixel limit must fire before any scan data is decoded)."""
    data = bytearray(_save(_noise_rgb(16, 16), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _save(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _noise_rgb(w: int = W, h: int = H) -> Image.Image:
    # Noise, so compressed data is large and a cut lands inside pixel data.
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _gradient_l() -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1)))


def _thirds(w: int = W) -> tuple[slice, slice, slice]:
    return slice(0, w // 3), slice(w // 3, 2 * w // 3), slice(2 * w // 3, w)


def _palette_png() -> bytes:
    index = np.zeros((H, W), dtype=np.uint8)
    left, middle, right = _thirds()
    index[:, middle], index[:, right] = 1, 2
    img = Image.fromarray(index).convert("P")
    # Entry 0 is black so that dropping transparency (instead of compositing) shows.
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    return _save(img, "PNG", transparency=bytes([0, 128, 255]))


def _rgba_png() -> bytes:
    px = np.zeros((H, W, 4), dtype=np.uint8)  # transparent black
    left, middle, right = _thirds()
    px[:, middle] = (255, 0, 0, 128)
    px[:, right] = (0, 0, 255, 255)
    return _save(Image.fromarray(px), "PNG")


def _cmyk_jpeg() -> bytes:
    img = Image.new("CMYK", (W, H), (255, 0, 0, 0))  # cyan
    img.paste((0, 255, 0, 0), (0, H // 2, W, H))  # magenta
    return _save(img, "JPEG", quality=95)


def _gray16_png() -> bytes:
    row = np.rint(np.linspace(0, 65535, 256)).astype(np.uint16)
    row[128] = 32768
    return _save(Image.fromarray(np.tile(row, (4, 1))), "PNG")  # uint16 -> mode I;16


def _exif_rotated_jpeg(w: int = W, h: int = H) -> bytes:
    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 0, 255), (w // 2, 0, w, h))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (W, H), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _mpo() -> bytes:
    return _save(_noise_rgb(), "MPO", save_all=True, append_images=[_noise_rgb()])


def _png_header_only(width: int, height: int) -> bytes:
    """A structurally valid PNG declaring width x height RGB but holding a few bytes of data.

    Built by hand because PIL would have to allocate the full image to save it.
    """

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * 1024)  # a sliver of the first row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
