"""`python -m benchmarks.gpu_bench`: the GPU check, without Ray.

Needs torch, torchvision and this package's decode/predictor modules (tools/gpu_check.sh runs it on a machine
with a CUDA GPU). In this order, each row printed and written to the JSON as it is measured: (1) the batch predictor's
path for resnet50 — uint8 on host -> device -> normalize on device -> 1 or 4 TTA views in one batched
forward, also with 4 micro-batches per call (copies overlapping compute) and torch.compile (`infer --compile`)
on CUDA — vs the pure forward on a ready float batch; (2) 12 MP photo JPEGs to 224-px inputs, the CPU path on
every core vs `infer --decode device` (nvJPEG); (3) training-step images/s for resnet50 and efficientnet_b0 at
224px, batch 256, bf16 autocast + channels_last vs fp32, and with torch.compile on CUDA (what `train.compile`
turns on). `--max-seconds`: no new section starts after it.
Context: NVIDIA publishes ~2,500 img/s per A100 for AMP ResNet-50 training; a ResNet-50 forward is
~4.1 GMACs (~8 GFLOP) at 224px.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def train_step_rate(arch: str, device: torch.device, batch: int, size: int, amp: bool, warmup: int, iters: int,
                    compile: bool = False) -> float:
    model = torchvision.models.get_model(arch, num_classes=1000).to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    if compile:  # what train.compile does through accelerate's dynamo plugin (inductor)
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    dtype = torch.bfloat16 if amp else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / _timed(step, device, warmup, iters)


def predictor_rates(device: torch.device, batch: int, size: int, warmup: int, iters: int,
                    compile: bool = False) -> dict[str, float]:
    """The real `EnsemblePredictor` (one resnet50 model file, written here with random weights) vs the
    pure forward on a ready, normalized device batch at the same dtype/layout. A call of 4 micro-batches is
    what GPU actors get in the batch job (`batch.pipeline.MICRO_BATCHES_PER_GPU_CALL`): its H2D copies overlap
    the forwards before it (`predictor.device_feed`)."""
    import tempfile

    from imgcls_dist.predictor.predictor import EnsemblePredictor
    from imgcls_dist.models.checkpoint import save_model_file
    from imgcls_dist.models.preprocess import normalize

    model = torchvision.models.resnet50(num_classes=1000)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model_file(tmp, model=model, arch="resnet50", classes=[str(i) for i in range(1000)],
                               in_channels=3, image_size=size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        one = EnsemblePredictor([path], views=["identity"], device=device, batch_size=batch)
        four = EnsemblePredictor([path], views=["identity", "shift_left", "shift_right", "zoom_in"],
                                 device=device, batch_size=batch)
        compiled = EnsemblePredictor([path], views=["identity"], device=device, batch_size=batch,
                                     compile=True) if compile else None
    net = one.members[0].model
    amp = one.amp_dtype is not None
    host = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    # What the Ray Data decode stage hands over: an NHWC numpy batch (not pinned).
    host_nhwc = host.permute(0, 2, 3, 1).contiguous().numpy()
    if device.type == "cuda":
        host = host.pin_memory()
    ready = normalize(host.to(device), IMAGENET_MEAN, IMAGENET_STD, channels_last=one.channels_last)
    key = (size, 3)

    @torch.inference_mode()
    def pure() -> None:
        with torch.autocast(device.type, dtype=one.amp_dtype or torch.float32, enabled=amp):
            net(ready).float().softmax(1).cpu()

    out = {"forward only": batch / _timed(pure, device, warmup, iters)}
    out["predictor 1 view(s)"] = batch / _timed(lambda: one.predict_uint8({key: host}), device, warmup, iters)
    out["predictor 4 view(s)"] = batch / _timed(lambda: four.predict_uint8({key: host}), device, warmup, iters)
    out["predictor 1 view(s), NHWC numpy input"] = batch / _timed(
        lambda: one.predict_uint8({key: host_nhwc}), device, warmup, iters)
    calls = np.concatenate([host_nhwc] * 4)
    out["predictor 1 view(s), NHWC numpy input, 4 micro-batches per call"] = 4 * batch / _timed(
        lambda: one.predict_uint8({key: calls}), device, warmup, iters)
    if compiled is not None:  # the warm-up calls pay for the compile
        out["predictor 1 view(s) torch.compile"] = batch / _timed(
            lambda: compiled.predict_uint8({key: host}), device, max(warmup, 2), iters)
    return out


def decode_rates(device: torch.device, size: int, photo_size: tuple[int, int], photos: int, iters: int) -> dict:
    """JPEG bytes -> `size`-px model inputs, img/s: the CPU path on every core (threads: PIL and cv2 release
    the GIL) vs `infer --decode device` (nvJPEG on CUDA), over `photos` generated photo JPEGs."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from imgcls_dist.data.builtin import digits_images
    from imgcls_dist.data.synthetic import photo_jpeg
    from imgcls_dist.predictor.device_decode import prepare_on_device
    from imgcls_dist.predictor.prepare import prepare_encoded

    digits = digits_images(32)[0]
    keys = [(size, 3)]
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        # Made on every core too (0.5 s per 12 MP photo on one), so the run does not wait on one core for them.
        data = list(pool.map(lambda i: photo_jpeg(digits[i % len(digits)], *photo_size, seed=i), range(photos)))

        def cpu() -> None:
            list(pool.map(lambda b: prepare_encoded([b], keys), data))

        cpu_rate = photos / _timed(cpu, torch.device("cpu"), 1, iters)
    dev_rate = photos / _timed(lambda: prepare_on_device(data, keys, device), device, 1, iters)
    mp = f"{photo_size[0] * photo_size[1] / 1e6:.2g}"
    return {f"decode {mp}MP JPEG -> {size}px, CPU path on {threads} threads img/s": cpu_rate,
            f"decode {mp}MP JPEG -> {size}px, device path img/s": dev_rate,
            f"decode {mp}MP JPEG ratio device/CPU": dev_rate / cpu_rate}


class Table:
    """The bench's rows, printed and written to `out` as each one is measured, so a run cut short (by
    `max_seconds`, a time limit or an interrupt) still leaves every row it finished."""

    def __init__(self, out: str | Path, head: dict, max_seconds: float | None):
        self.out, self.head, self.rows, self.skipped = Path(out), head, [], []
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        print(f"bench gpu on {head['device']}, batch {head['batch']}, {head['size']}px, torch {head['torch']}",
              flush=True)

    def time_left(self, section: str) -> bool:
        """False (and the section recorded as skipped) once `max_seconds` have passed."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.skipped.append(section)
            print(f"skipped (max_seconds reached): {section}", flush=True)
            self._save()
            return False
        return True

    def add(self, measure: str, value: float) -> None:
        self.rows.append({"measure": measure, "value": value})
        print(f"{measure}  {value:.3f}" if value < 10 else f"{measure}  {value:.0f}", flush=True)
        self._save()

    def result(self) -> dict:
        return {**self.head, "rows": self.rows, **({"skipped": self.skipped} if self.skipped else {})}

    def _save(self) -> None:
        self.out.write_text(json.dumps(self.result(), indent=2))


def run(device: str | None = None, batch: int = 256, size: int = 224, warmup: int = 5, iters: int = 20,
        out: str | Path = "gpu_bench.json", archs: tuple[str, ...] = ("resnet50", "efficientnet_b0"),
        compile: bool | None = None, photo_size: tuple[int, int] = (4000, 3000), photos: int = 32,
        max_seconds: float | None = None) -> dict:
    """`compile` None: compiled steps are measured on CUDA only (inductor's CPU compile of a resnet50 takes
    minutes and is not what train.compile is for). Sections run in the order of what is least often measured
    (the predictor, device decode, then training, whose rows docs/benchmarks.md already holds); after
    `max_seconds` no new section starts."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile = dev.type == "cuda" if compile is None else compile
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    table = Table(out, {"device": name, "batch": batch, "size": size, "torch": torch.__version__,
                        "torchvision": torchvision.__version__}, max_seconds)
    pr = predictor_rates(dev, batch, size, warmup, iters, compile)
    for k, v in pr.items():
        table.add(f"infer resnet50 {k} img/s", v)
    for k in (k for k in pr if k.startswith("predictor")):
        # images/s counts input images; 4 views do 4x the forward work, so ideal is 1.0 and 0.25.
        table.add(f"infer resnet50 {k} / forward only", pr[k] / pr["forward only"])
    if table.time_left("decode"):
        dr = decode_rates(dev, size, photo_size, photos, max(1, iters // 4))
        for k, v in dr.items():
            table.add(k, v)
        dev_key = next(k for k in dr if "device path" in k)
        # >= 1: the device decodes photos faster than the model consumes them, so decode is off the critical path.
        table.add("decode device path / infer resnet50 forward only", dr[dev_key] / pr["forward only"])
    for arch in archs:
        if not table.time_left(f"train {arch}"):
            continue
        fp32 = train_step_rate(arch, dev, batch, size, amp=False, warmup=warmup, iters=iters)
        bf16 = train_step_rate(arch, dev, batch, size, amp=True, warmup=warmup, iters=iters)
        table.add(f"train {arch} fp32 img/s", fp32)
        table.add(f"train {arch} bf16+channels_last img/s", bf16)
        table.add(f"train {arch} ratio bf16/fp32", bf16 / fp32)
        if compile and table.time_left(f"train {arch} torch.compile"):  # warm-up covers the compile
            compiled = train_step_rate(arch, dev, batch, size, amp=True, warmup=max(warmup, 3), iters=iters,
                                       compile=True)
            table.add(f"train {arch} bf16+channels_last+torch.compile img/s", compiled)
            table.add(f"train {arch} ratio compiled/eager", compiled / bf16)
    return table.result()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="start no new section after this many seconds (the rows so far are already written)")
    a = ap.parse_args(argv)
    run(a.device, a.batch, a.size, a.warmup, a.iters, a.out, max_seconds=a.max_seconds)


if __name__ == "__main__":
    main()
