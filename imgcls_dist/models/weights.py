"""Where initial weights come from: torchvision's hub cache (by weights name) or a checkpoint file (by path).

Knows nothing about architectures: registry.get_model passes in the head/stem names it needs.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union
from urllib.parse import urlparse

import torch
from torch import nn

from imgcls_dist.errors import UserError
from imgcls_dist.models.checkpoint import read_tensors_file, resolve_model_path
from imgcls_dist.storage import Location, is_uri, location

log = logging.getLogger(__name__)

_CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / accelerate.prepare, torch.compile


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)  # kept fresh: the head is sized for our classes
    adapted: list[str] = field(default_factory=list)  # RGB stem kernels summed into a 1-channel stem
    ignored: list[str] = field(default_factory=list)  # e.g. googlenet/inception aux-classifier keys

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors, head kept fresh ({len(self.skipped_head)}), "
            f"stem adapted ({len(self.adapted)}), ignored {len(self.ignored)}"
        )


@dataclass
class CheckpointWeights:
    """A checkpoint file read once: its tensors and, for our model files, the classes they were trained on."""

    source: str
    state_dict: dict[str, torch.Tensor]
    arch: str | None = None
    classes: list[str] | None = None


Weights = Union[str, os.PathLike, CheckpointWeights, None]


def classify(weights: Weights) -> tuple[str, object]:
    """('scratch', None) | ('checkpoint', CheckpointWeights) | ('path', Location) | ('torchvision', name)."""
    if isinstance(weights, CheckpointWeights):
        return "checkpoint", weights
    if weights is None or str(weights).strip().lower() in ("", "none", "scratch"):
        return "scratch", None
    s = str(weights).strip()
    if is_uri(s) or isinstance(weights, os.PathLike) or os.sep in s or s.endswith(_CKPT_SUFFIXES) or Path(s).exists():
        loc = location(s)
        if not loc.exists():
            raise UserError(f"weights checkpoint {s} does not exist")
        return "path", loc
    return "torchvision", s


def read_checkpoint(path: str | os.PathLike | Location) -> CheckpointWeights:
    """Our model file (file or directory) or a raw state_dict (.safetensors too), on any filesystem, read with
    weights_only=True."""
    loc = location(path)
    if loc.is_dir():
        loc = resolve_model_path(loc)
    obj = _read_safetensors(loc) if loc.suffix == ".safetensors" else read_tensors_file(loc)
    arch = classes = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        arch, classes = obj.get("arch"), obj.get("classes")
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{loc}: not a model file or state_dict (expected a dict of tensors)")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return CheckpointWeights(loc.uri, obj, arch, list(classes) if classes is not None else None)


def _read_safetensors(loc: Location) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(loc.read_bytes())
    except SafetensorError as e:
        raise UserError(f"{loc}: cannot load safetensors file ({_first_line(e)})") from None


def initial_weights(weights: Weights) -> Weights:
    """A checkpoint path becomes its CheckpointWeights (read once, for get_model and for its class list);
    scratch and torchvision names pass through."""
    kind, source = classify(weights)
    return read_checkpoint(source) if kind == "path" else weights


def gray_stem_kernel(rgb: torch.Tensor) -> torch.Tensor:
    """A 3-channel conv kernel -> the 1-channel kernel that computes the same output on a gray image
    replicated to RGB: conv(x, W) = sum_c W_c * x when every channel holds x."""
    return rgb.sum(1, keepdim=True)


# ----------------------------------------------------------------------------------------------- torchvision


def torchvision_models():
    """`torchvision.models`, imported on first use: importing torchvision costs seconds per process
    (`torchvision.ops` imports `torch._dynamo`; docs/benchmarks.md, "Process start-up"), which a process that
    only builds LeNet-5 (a predictor actor, `predict`) or no model at all would pay for nothing."""
    import torchvision.models

    return torchvision.models


def cache_file(weights) -> Path:
    """Where torch.hub keeps (and first looks for) this weights file: <TORCH_HOME>/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def resolve_torchvision_weights(arch: str, name: str):
    """'DEFAULT' | 'IMAGENET1K_V1' | 'ResNet18_Weights.IMAGENET1K_V1' -> the enum member for `arch`."""
    enum = torchvision_models().get_model_weights(arch)
    members = list(enum.__members__)  # includes the DEFAULT alias
    member = name.split(".", 1)[1] if "." in name else name
    if "." in name and name.split(".", 1)[0] != enum.__name__:
        valid = f"{enum.__name__}.{{{','.join(members)}}}"
        raise UserError(f"weights {name} are not for {arch} (its weights are {valid})")
    key = next((m for m in members if m.lower() == member.lower()), None)
    if key is None:
        raise UserError(f"unknown weights '{name}' for {arch}; valid: {', '.join(members)} or a checkpoint path")
    return enum[key]


def _check_tensors_only(path: Path) -> None:
    # torch.hub loads cache files with weights_only=False (torch 2.14 hub.load_state_dict_from_url default);
    # a weights_only pass first means a planted/tampered cache file can't run code. mmap: no second copy
    # (legacy non-zip files can't be mmapped: read them whole).
    for mmap in (True, False):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            return
        except pickle.UnpicklingError as e:
            reason = _first_line(e)
            raise UserError(f"{path}: cached weights hold non-tensor objects, refusing to load ({reason})") from None
        except Exception:  # noqa: BLE001 - not mmappable, or corrupt: torchvision's own load reports that
            continue


def build_pretrained(arch: str, weights, build: Callable[[object], nn.Module]) -> nn.Module:
    """build(weights) through torchvision (its download + TORCH_HOME cache), with one-line errors."""
    path = cache_file(weights)
    if path.is_file():
        _check_tensors_only(path)
    try:
        model = build(weights)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # URLError is an OSError
        if path.is_file():
            reason = _first_line(e)
            raise UserError(f"{path}: cached {weights!r} cannot be loaded ({reason}); delete to re-download") from None
        raise UserError(
            f"cannot download {weights!r} for {arch} ({_first_line(e)}); offline? place {weights.url} at {path}"
        ) from None
    log.info("%s: loaded %r from %s", arch, weights, path)
    return model


# ------------------------------------------------------------------------------------------------- checkpoint


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_checkpoint(
    model: nn.Module, weights: CheckpointWeights | str | os.PathLike | Location, *, arch: str, head: str, stem: str,
    ignore_unexpected=()
) -> LoadReport:
    """Load a checkpoint into a freshly built model, tolerating exactly: head shape/absence (fresh head kept),
    a 3->1 channel stem (kernels summed), `ignore_unexpected` prefixes, missing BN num_batches_tracked."""
    if not isinstance(weights, CheckpointWeights):
        weights = read_checkpoint(weights)
    ckpt, ckpt_arch, path = weights.state_dict, weights.arch, weights.source
    target = model.state_dict()
    report, to_load, problems = LoadReport(str(path)), {}, []
    in_head = lambda k: k == head or k.startswith(head + ".")  # noqa: E731
    for k, v in ckpt.items():
        if k not in target:
            if k.startswith(tuple(ignore_unexpected)):
                report.ignored.append(k)
            else:
                problems.append(f"unexpected {k}")
        elif v.shape == target[k].shape:
            to_load[k] = v
        elif in_head(k):
            report.skipped_head.append(k)
        elif k == f"{stem}.weight" and v.dim() == 4 and v.shape[1] == 3 and target[k].shape[1] == 1 and (
            v.shape[0] == target[k].shape[0] and v.shape[2:] == target[k].shape[2:]
        ):
            to_load[k] = gray_stem_kernel(v)
            report.adapted.append(k)
        else:
            problems.append(f"shape {k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
    for k in target:
        if k not in ckpt and not in_head(k) and not k.endswith("num_batches_tracked"):
            problems.append(f"missing {k}")
    if problems:
        saved = f" (saved for {ckpt_arch})" if ckpt_arch and ckpt_arch != arch else ""
        raise UserError(
            f"{path}: checkpoint{saved} does not fit {arch}: {len(problems)} bad keys, e.g. {'; '.join(problems[:3])}"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    log.info("%s", report.summary())
    return report
