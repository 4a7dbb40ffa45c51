"""Decoding on the predictor's device (`infer --decode device`): JPEG rows by torchvision's decoder
(nvJPEG on CUDA; its CPU decoder here) and a resize written to match the eval transform, every other row and
every failure through the CPU path. On CPU this runs everything but nvJPEG itself; the CUDA test runs that."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from helpers.image_fixtures import write_image_fixtures
from imgcls_dist.data.augment import apply
from imgcls_dist.data.decode import decode_image
from imgcls_dist.errors import UserError
from imgcls_dist.predictor import device_decode
from imgcls_dist.predictor.device_decode import (
    ORIENTATION, _area_weights, device_row, orient, pixel_chunks, prepare_on_device, resize_like_eval,
)
from imgcls_dist.predictor.decode_mode import resolve_decode
from imgcls_dist.predictor.prepare import eval_transform, prepare_encoded, to_channels

KEYS = [(224, 3), (32, 1), (24, 3)]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_image_fixtures(tmp_path_factory.mktemp("images"))


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).cpu().numpy()


def test_every_fixture_gets_the_cpu_paths_error_or_nearly_its_pixels(fixtures):
    datas = [fx.path.read_bytes() for fx in fixtures]
    dev, dev_errors = prepare_on_device(datas, KEYS, "cpu")
    cpu, cpu_errors = prepare_encoded(datas, KEYS)
    assert dev_errors == cpu_errors  # damaged, oversize, bomb, non-whitelisted: the CPU path's own reason
    assert sum(e is not None for e in cpu_errors) >= 8
    on_device = [fx.name for fx, d in zip(fixtures, datas) if device_row(d) is not None]
    assert {"jpeg", "large_jpeg", "large_progressive_jpeg", "large_exif_rotated_jpeg"} <= set(on_device)
    assert "large_cmyk_jpeg" not in on_device and "oversize_jpeg" not in on_device and "bomb_jpeg" not in on_device
    for i, (fx, data) in enumerate(zip(fixtures, datas)):
        for k in KEYS:
            got, want = hwc(dev[k][i]).astype(np.int16), cpu[k][i]
            assert got.shape == want.shape, (fx.name, k)
            if cpu_errors[i] is not None or device_row(data) is None:
                assert np.array_equal(got, want), (fx.name, k)  # the CPU path itself, or zeros for a failed row
            else:  # the device decodes whole: it equals a full decode + the eval transform, up to IDCT rounding
                full = apply(eval_transform(k[0]), to_channels(decode_image(data).array, k[1]))
                assert np.abs(got - full).mean() < 0.5, (fx.name, k, np.abs(got - full).mean())
                if fx.name.startswith("large"):  # and photos barely move from the CPU path's reduced decode
                    assert np.abs(got - want).mean() < 0.5, (fx.name, k, np.abs(got - want).mean())


def test_exif_orientation_is_applied_on_the_device_path(fixtures):
    fx = next(f for f in fixtures if f.name == "large_exif_rotated_jpeg")
    assert device_row(fx.path.read_bytes()) == (6, 3000 * 2000)
    dev, _ = prepare_on_device([fx.path.read_bytes()], [(64, 3)], "cpu")
    img = hwc(dev[(64, 3)][0]).astype(int)
    assert img[0, 32, 0] > 230 and img[0, 32, 2] < 40  # red on top, as displayed (tests/helpers/image_fixtures.py)
    assert img[-1, 32, 2] > 230 and img[-1, 32, 0] < 40


def test_orient_shows_every_exif_orientation_as_pil_does():
    # torchvision's CUDA decoder ignores apply_exif_orientation, so the device path orients the tensor itself.
    stored = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # H != W: a wrong axis shows
    for o in range(0, 10):  # 0 and 9: not orientations, left as stored by both
        img = Image.fromarray(stored)
        exif = Image.Exif()
        exif[ORIENTATION] = o
        img.info["exif"] = exif.tobytes()
        want = np.asarray(ImageOps.exif_transpose(img))
        got = orient(torch.from_numpy(stored).permute(2, 0, 1), o).permute(1, 2, 0).numpy()
        assert np.array_equal(got, want), o


def test_every_exif_orientation_decodes_on_the_device_path_as_on_the_cpu_path():
    # Quadrants of far-apart colours: any wrong flip or rotation moves the mean difference by ~100 grey levels.
    quad = np.zeros((240, 320, 3), np.uint8)
    quad[:120, :160], quad[:120, 160:], quad[120:, :160], quad[120:, 160:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    datas = []
    for o in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION] = o
        buf = io.BytesIO()
        Image.fromarray(quad).save(buf, "JPEG", quality=95, exif=exif.tobytes())
        datas.append(buf.getvalue())
    assert [device_row(d).orientation for d in datas] == list(range(1, 9))
    dev, dev_errors = prepare_on_device(datas, [(64, 3)], "cpu")
    cpu, cpu_errors = prepare_encoded(datas, [(64, 3)])
    assert not any(dev_errors) and not any(cpu_errors)
    for o, got, want in zip(range(1, 9), dev[(64, 3)], cpu[(64, 3)]):
        assert np.abs(hwc(got).astype(int) - want).mean() < 2.0, o


def test_rows_are_decoded_in_chunks_of_bounded_pixels(fixtures, monkeypatch):
    assert pixel_chunks([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]] and pixel_chunks([], 10) == []
    datas = [fx.path.read_bytes() for fx in fixtures]
    whole, whole_errors = prepare_on_device(datas, KEYS, "cpu")
    calls = []
    real = device_decode._decode_all
    monkeypatch.setattr(device_decode, "_decode_all", lambda d, dev: calls.append(len(d)) or real(d, dev))
    monkeypatch.setattr(device_decode, "DECODE_CHUNK_PIXELS", 3000 * 2000)  # one large fixture photo per call
    chunked, chunked_errors = prepare_on_device(datas, KEYS, "cpu")
    assert chunked_errors == whole_errors and all(torch.equal(chunked[k], whole[k]) for k in KEYS)
    on_device = sum(device_row(d) is not None for d in datas)
    assert sum(calls) == on_device and 1 < len(calls) < on_device  # large photos alone, small ones together


def test_area_resize_equals_a_box_average():
    w = _area_weights(7, 3, torch.device("cpu"))
    assert torch.allclose(w.sum(1), torch.ones(3)) and torch.allclose(w.sum(0) * 7 / 3, torch.ones(7))
    x = torch.arange(4 * 6, dtype=torch.uint8).view(1, 4, 6).expand(3, 4, 6).contiguous()
    out = resize_like_eval(x, 2, 3)  # an integer factor: plain 2x3 block means
    expect = x.float().view(3, 2, 2, 2, 3).mean(dim=(2, 4)).round().to(torch.uint8)
    assert torch.equal(out, expect)
    assert resize_like_eval(x[:, :2, :2], 4, 1).shape == (1, 4, 4)  # enlarging: bilinear, one luma channel


def test_classifier_top1_agreement_device_vs_cpu_decode(digit_photo_classifier):
    # The lenet5 and 1000 held-out digit photos of the reduced-decode test (tests/conftest.py); the measured
    # agreement: docs/benchmarks.md, "Decoding on the predictor's device".
    predict, photos, labels = digit_photo_classifier
    cpu, cpu_err = prepare_encoded(photos, [(32, 3)])
    dev, dev_err = prepare_on_device(photos, [(32, 3)], "cpu")
    assert not any(cpu_err) and not any(dev_err)
    a = predict(list(cpu[(32, 3)]))
    b = predict([hwc(t) for t in dev[(32, 3)]])
    assert (a == labels).mean() >= 0.85
    assert (a == b).mean() >= 0.995, (a == b).mean()


def test_decode_mode_resolution():
    assert resolve_decode("auto", 1.0) == "device" and resolve_decode("auto", 0.0) == "cpu"
    assert resolve_decode("cpu", 1.0) == "cpu" and resolve_decode("device", 0.0) == "device"
    with pytest.raises(UserError, match="--decode: must be one of auto, cpu, device, got 'gpu'"):
        resolve_decode("gpu", 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG); the CPU decoder is tested above")
def test_nvjpeg_matches_the_cpu_decoder(fixtures):
    datas = [fx.path.read_bytes() for fx in fixtures]
    gpu, gpu_errors = prepare_on_device(datas, KEYS, "cuda")
    cpu, cpu_errors = prepare_on_device(datas, KEYS, "cpu")
    assert gpu_errors == cpu_errors and all(t.device.type == "cuda" for t in gpu.values())
    for k in KEYS:
        assert (gpu[k].cpu().to(torch.int16) - cpu[k].to(torch.int16)).abs().float().mean() < 1.0, k
