"""The one image decoder every job uses (train, tune, batch-infer, predict).

Inputs come from the wild: bytes may be empty, truncated, not an image, a format we
never meant to parse, or a tiny file declaring billions of pixels. `decode_image`
turns all of that into an error string instead of an exception, so one bad row
costs one row, not a Ray task.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imgcls_dist.errors import UserError
from imgcls_dist.storage import PathLike, StorageError, location

# Formats with well-exercised decoders. Everything else PIL can open (EPS shells out
# to Ghostscript, PSD/ICO/TGA/PPM...) is refused before its pixel data is touched.
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})

# PIL reports JPEGs carrying a multi-picture extension (many phone cameras) as "MPO";
# they are ordinary JPEGs to us, and refusing them would drop real photos.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# 40 MP is far above any classification input (and above most camera sensors),
# yet well below PIL's own bomb limit (~89 MP warning, ~179 MP error), so we reject
# from the header before allocating a buffer for the pixels.
DEFAULT_MAX_PIXELS = 40_000_000

_MAX_ERROR_LEN = 200


class DecodeResult(NamedTuple):
    """Exactly one of `array` (HxWxC uint8, C-contiguous) and `error` is set."""

    array: np.ndarray | None
    error: str | None


def decode_image(
    data: bytes | None,
    channels: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    min_size: int | None = None,
) -> DecodeResult:
    """Decode encoded image bytes to an HxWxC uint8 array (C=3 RGB, C=1 grayscale).

    Never raises: any failure comes back as `DecodeResult(None, "<one-line reason>")`.
    Transparency is composited onto `background`; EXIF orientation is applied;
    animated images yield their first frame.

    `min_size`: the side the caller resizes to next. A JPEG is then decoded by libjpeg at the
    smallest DCT scale (1/2, 1/4 or 1/8; PIL's `Image.draft`) whose image is still at least
    `min_size` in both dimensions, so the array may be smaller than the file's size but never
    smaller than `min_size` (unless the file itself is). Why: a 12 MP (4000x3000) JPEG decoded at
    1/8 (500x375) and resized to 224 px costs a fraction of the whole decode and the same resize;
    what is left is mostly entropy decoding, which no scale shortens, so the gain shrinks as files
    grow and progressive files gain less (docs/benchmarks.md, "Reduced-size JPEG decode"). Below
    twice `min_size` no scale applies and nothing changes. simplejpeg's scaled decode (libjpeg-turbo
    too) was barely faster at 12 MP, without EXIF orientation or a header pixel limit, so PIL stays.
    The format whitelist and `max_pixels` are checked on the file's own header size first. Other
    formats decode whole.
    """
    try:
        return _decode(data, channels, max_pixels, background, min_size)
    except Exception as exc:  # the contract is "never raises"; KeyboardInterrupt still does
        return DecodeResult(None, _one_line(f"decode failed: {type(exc).__name__}: {exc}"))


def read_image_file(path: PathLike) -> bytes:
    """The bytes of one image file (any filesystem); a failure is a UserError naming it."""
    try:
        return location(path).read_bytes()
    except StorageError as exc:
        raise UserError(f"{path}: cannot read file: {str(exc).rsplit(': ', 1)[-1]}") from None


def decode_file(path: PathLike) -> np.ndarray:
    """Read (any filesystem) and decode one whole RGB image; failures become a UserError naming it."""
    array, error = decode_image(read_image_file(path))
    if error is not None:
        raise UserError(f"{path}: {error}")
    return array


def is_jpeg(data: bytes | None) -> bool:
    """Whether `min_size` can change what decode_image returns for these bytes: JPEG (and MPO) files,
    recognised by their SOI marker as PIL's JpegImagePlugin recognises them."""
    return isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:3]) == b"\xff\xd8\xff"


def _decode(data, channels, max_pixels, background, min_size) -> DecodeResult:
    if data is None:
        return DecodeResult(None, "no image bytes (None)")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return DecodeResult(None, f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        return DecodeResult(None, "empty bytes")
    if channels not in (1, 3):
        return DecodeResult(None, f"channels must be 1 or 3, got {channels!r}")
    if min_size is not None and (isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1):
        return DecodeResult(None, f"min_size must be a positive int or None, got {min_size!r}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some library flipped PIL's global; decoding now would silently turn truncated
        # files into half-grey images. Refuse loudly rather than mutate the global back.
        return DecodeResult(None, "refusing to decode: PIL ImageFile.LOAD_TRUNCATED_IMAGES is True")

    # (catch_warnings swaps process-global filters, so concurrent threads can briefly
    # see each other's; harmless here, the worst case is one stray or one lost warning.)
    with warnings.catch_warnings():
        # Our own max_pixels is the limit; PIL's bomb warning would only be log noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Likewise PIL's per-file complaints about odd metadata ("Tag data larger than
        # file"): the outcome is reported through DecodeResult, once per row.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        try:
            img = Image.open(io.BytesIO(data))  # lazy: parses the header only
        except UnidentifiedImageError:
            return DecodeResult(None, "not an image (unrecognized format)")
        except Image.DecompressionBombError as exc:
            # PIL's hard limit fires inside open(), before we can read the size.
            reason = str(exc).split(", could be")[0]  # drop PIL's "...DOS attack" tail
            return DecodeResult(None, _one_line(f"too large: {reason} (our limit {max_pixels})"))
        except Exception as exc:
            return DecodeResult(None, _one_line(f"truncated or corrupt: {exc}"))

        with img:
            fmt = _FORMAT_ALIASES.get(img.format, img.format)
            if fmt not in ALLOWED_FORMATS:
                return DecodeResult(None, f"format {img.format} not in whitelist")
            width, height = img.size
            if width <= 0 or height <= 0:
                return DecodeResult(None, f"invalid size {width}x{height}")
            if width * height > max_pixels:
                return DecodeResult(
                    None,
                    f"too large: {width}x{height} = {width * height} pixels > limit {max_pixels}",
                )
            if min_size is not None and fmt == "JPEG":
                _draft(img, min_size)
            try:
                img.load()  # force the full decode so truncation fails here, not later
            except Exception as exc:
                return DecodeResult(None, _one_line(f"truncated or corrupt: {exc}"))
            _apply_exif_orientation(img)
            array = _to_array(img, channels, background)
    return DecodeResult(array, None)


def _draft(img: Image.Image, min_size: int) -> None:
    # A square request: EXIF rotation (applied after decoding) swaps width and height, and both
    # must stay >= min_size either way. mode=None keeps libjpeg's colour output as a full decode
    # gives it (draft("L") would convert inside libjpeg, unlike decode_image(channels=1)).
    # Pillow picks the scale as the largest of 8, 4, 2, 1 not above min(W // s, H // s) for the
    # requested (s, s): JpegImagePlugin.JpegImageFile.draft (Pillow 13.0).
    img.draft(None, (min_size, min_size))


def _apply_exif_orientation(img: Image.Image) -> None:
    try:
        # In place: the common no-orientation case then costs no extra copy.
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        # Garbled EXIF is common in real photos and the pixels are fine; an unrotated
        # image is a better answer than dropping the row.
        pass


def _to_array(img: Image.Image, channels: int, background: tuple[int, int, int]) -> np.ndarray:
    img = _to_8bit(img, background)  # now "L" or "RGB"
    mode = "RGB" if channels == 3 else "L"
    if img.mode != mode:
        # Only when needed: convert to the same mode is a copy (a 48 MB one for a 12 MP RGB photo).
        img = img.convert(mode)
    array = np.array(img, dtype=np.uint8)  # a copy: writable, owns its memory
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array)


def _to_8bit(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        return _composite(img.convert("RGBA"), background)
    if mode.startswith("I;16") or mode == "I":
        return _scale_int(img)
    if mode == "F":
        return _scale_float(img)
    # "1", "CMYK", "YCbCr", "RGBX", ...: PIL's own conversion is the right one.
    return img.convert("RGB")


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    # Dropping alpha would expose whatever RGB sits under transparent pixels (often black).
    base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _scale_int(img: Image.Image) -> Image.Image:
    values = np.asarray(img).astype(np.int64)
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if lo >= 0 and hi <= 65535:
        # 16-bit data (PNG/TIFF): map the nominal 0..65535 range, so 65535 -> 255 and
        # 32768 -> 128. Clipping instead would turn almost every pixel white.
        scaled = (values + 128) // 257
    else:
        # Signed or wider ints have no nominal range; stretch what is there.
        scaled = _stretch(values.astype(np.float64))
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8 -> "L"


def _scale_float(img: Image.Image) -> Image.Image:
    values = np.asarray(img).astype(np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    if not finite.any() or (values.min() >= 0.0 and values.max() <= 1.0):
        scaled = np.rint(values * 255.0)  # the usual convention for float images
    else:
        scaled = _stretch(values)
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8 -> "L"


def _stretch(values: np.ndarray) -> np.ndarray:
    lo, hi = values.min(), values.max()
    if hi <= lo:
        return np.zeros_like(values)
    return np.rint((values - lo) * (255.0 / (hi - lo)))


def _one_line(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_ERROR_LEN else message[: _MAX_ERROR_LEN - 3] + "..."
