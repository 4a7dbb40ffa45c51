"""The one architecture registry: name -> ModelSpec, get_model() with our head/stem, and the `models` table.

Every torchvision classification builder is reachable by its own name; the 14 in NAMED have hand-written,
measured specs, the rest get a generic spec derived from torchvision's weights metadata. Every timm model is
reachable as `timm/<timm name>` (family "timm"; models/timm_models.py), its spec from timm's pretrained config.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgcls_dist.errors import UserError
from imgcls_dist.models import timm_models
from imgcls_dist.models import weights as weights_mod
from imgcls_dist.models.checkpoint import load_model_file
from imgcls_dist.models.lenet import LeNet5
from imgcls_dist.table import format_table

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
LIST_HINT = "list all with `imgcls-dist models` or imgcls_dist.models.registry.list_models()"
TIMM_LIST_HINT = "list them with `imgcls-dist models 'timm/*'`"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    min_size: int  # smallest square input that forwards (measured on CPU, train mode, batch 2)
    default_size: int  # the resolution the DEFAULT weights were trained/evaluated at
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # torchvision enum member name behind DEFAULT; timm/*: timm's default pretrained tag (what DEFAULT loads);
    # None = no pretrained weights
    default_weights: str | None
    fixed_size: bool = False  # vit_*/maxvit_t, timm fixed_input_size: only default_size works

    def normalization(self, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) for in_channels. 1 channel: the RGB average, which matches the summed-kernel stem
        of get_model (a gray image replicated to RGB, normalized per channel, is then approximated)."""
        if in_channels == len(self.mean):
            return self.mean, self.std
        return (sum(self.mean) / len(self.mean),), (sum(self.std) / len(self.std),)


def _tv(name, family, min_size, weights, default_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return ModelSpec(name, family, min_size, default_size, mean, std, weights)


# min_size: measured by scanning sizes 1, 2, ... (batch 2, train and eval, on 'meta') until the forward
# passes; test_models forwards for real at exactly min_size and checks min_size-1 fails for some. They agree
# with torchvision's weights.meta["min_size"] where that is a real limit (alexnet 63, inception_v3 75,
# googlenet 15, vgg 32). default_weights = the member DEFAULT aliases in torchvision 0.29; default_size =
# that weights' eval crop (efficientnet_b1: 240).
# googlenet/inception_v3: we build them with transform_input=False (preprocessing is ours), and that
# flag only rescaled ImageNet-normalized input to (x-0.5)/0.5, what the Google-ported weights expect;
# so their spec normalizes with 0.5/0.5 directly, which is the identical input the weights saw.
NAMED: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("lenet5", "lenet", LeNet5.min_size, 32, HALF, HALF, None),
        _tv("alexnet", "alexnet", 63, "IMAGENET1K_V1"),
        _tv("vgg11_bn", "vgg", 32, "IMAGENET1K_V1"),
        _tv("vgg16", "vgg", 32, "IMAGENET1K_V1"),
        _tv("resnet18", "resnet", 1, "IMAGENET1K_V1"),
        _tv("resnet34", "resnet", 1, "IMAGENET1K_V1"),
        _tv("resnet50", "resnet", 1, "IMAGENET1K_V2"),
        _tv("googlenet", "googlenet", 15, "IMAGENET1K_V1", mean=HALF, std=HALF),
        _tv("inception_v3", "inception", 75, "IMAGENET1K_V1", default_size=299, mean=HALF, std=HALF),
        _tv("mobilenet_v2", "mobilenet_v2", 1, "IMAGENET1K_V2"),
        _tv("mobilenet_v3_small", "mobilenet_v3", 1, "IMAGENET1K_V1"),
        _tv("mobilenet_v3_large", "mobilenet_v3", 1, "IMAGENET1K_V2"),
        _tv("efficientnet_b0", "efficientnet", 1, "IMAGENET1K_V1"),
        _tv("efficientnet_b1", "efficientnet", 1, "IMAGENET1K_V2", default_size=240),
    )
}

# Generic specs: name prefix -> family (head/stage layout known), first match wins; else "other".
_FAMILY_PREFIXES = (
    ("resnet", "resnet"), ("resnext", "resnet"), ("wide_resnet", "resnet"), ("vgg", "vgg"),
    ("efficientnet", "efficientnet"), ("mobilenet_v2", "mobilenet_v2"), ("mobilenet_v3", "mobilenet_v3"),
    ("densenet", "densenet"), ("regnet", "regnet"), ("convnext", "convnext"), ("shufflenet", "shufflenet"),
    ("squeezenet", "squeezenet"),
)  # fmt: skip
# Measured minimum sizes of the generic models (same scan as NAMED); unlisted prefixes forward at 1x1.
# (torchvision's weights.meta["min_size"] is not always a real limit: swin says 224, efficientnet_v2 33.)
_MEASURED_MIN = {"vgg": 32, "densenet": 29, "convnext": 32, "squeezenet1_0": 21, "squeezenet1_1": 17, "swin": 4}
_FIXED_SIZE = ("vit_", "maxvit_")


def _family_of(name: str) -> str:
    return next((fam for prefix, fam in _FAMILY_PREFIXES if name.startswith(prefix)), "other")


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    tv = weights_mod.torchvision_models()
    return tuple(tv.list_models(module=tv))


@functools.cache
def _generic_spec(name: str) -> ModelSpec:
    default = weights_mod.torchvision_models().get_model_weights(name).DEFAULT
    kw = getattr(default.transforms, "keywords", {})
    size = int(kw.get("crop_size", 224))
    fixed = name.startswith(_FIXED_SIZE)
    min_size = size if fixed else next((v for k, v in _MEASURED_MIN.items() if name.startswith(k)), 1)
    mean, std = tuple(kw.get("mean", IMAGENET_MEAN)), tuple(kw.get("std", IMAGENET_STD))
    return ModelSpec(name, _family_of(name), min_size, size, mean, std, default.name, fixed)


# timm models forward at 32px (their usual total stride) unless their config fixes the input size; not measured
# per model like the torchvision ones.
_TIMM_MIN_SIZE = 32


@functools.cache
def _timm_spec(name: str) -> ModelSpec:
    arch = timm_models.arch_of(name)
    cfg = timm_models.pretrained_cfg(arch)
    size = int((cfg.input_size or (3, 224, 224))[-1])
    mean, std = tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD)
    fixed = bool(cfg.fixed_input_size)
    min_size = size if fixed else _TIMM_MIN_SIZE
    return ModelSpec(name, "timm", min_size, size, mean, std, timm_models.default_tag(arch), fixed)


def get_spec(name: str) -> ModelSpec:
    key = str(name).strip().lower()
    if key in NAMED:
        return NAMED[key]
    if key.startswith(timm_models.PREFIX):
        return _get_timm_spec(name, key)
    if key in _torchvision_names():
        return _generic_spec(key)
    close = difflib.get_close_matches(key, list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown model '{name}'; {hint}({LIST_HINT})")


def _get_timm_spec(name: str, key: str) -> ModelSpec:
    if timm_models.arch_of(key) in timm_models.arch_names():
        return _timm_spec(key)
    close = difflib.get_close_matches(key, list_models(timm_models.PREFIX + "*"), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown timm model '{name}'; {hint}({TIMM_LIST_HINT})")


def list_models(pattern: str | None = None) -> list[str]:
    """Named architectures first (in NAMED order), then the other torchvision ones, sorted; fnmatch filter.
    A pattern starting with 'timm/' lists timm's models instead, as timm/<name>."""
    if pattern is not None and pattern.lower().startswith(timm_models.PREFIX):
        names = [timm_models.PREFIX + n for n in timm_models.arch_names()]
        return [n for n in names if fnmatch.fnmatch(n, pattern.lower())]
    names = list(NAMED) + sorted(n for n in _torchvision_names() if n not in NAMED)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern.lower())]


# ---------------------------------------------------------------------------------------------------- heads


def head_name(model: nn.Module, family: str) -> str:
    """Qualified name of the classifier layer that get_model sizes to num_classes."""
    if family == "timm":  # distilled/dual-branch models have two; transfer.stages takes them all
        return timm_models.classifier_names(model)[0]
    if family == "lenet":
        return "fc3"
    if family in ("resnet", "regnet", "shufflenet", "googlenet", "inception"):
        return "fc"
    if family == "densenet":
        return "classifier"
    if family == "squeezenet":  # classifier = Dropout, Conv2d(512, classes, 1), ReLU, AvgPool
        return "classifier.1"
    if family in ("alexnet", "vgg", "mobilenet_v2", "mobilenet_v3", "efficientnet", "convnext"):
        return f"classifier.{len(model.classifier) - 1}"
    # other (vit: heads.head, swin: head, maxvit: classifier.5, mnasnet: classifier.1): the head is the
    # last Linear registered; verified for every torchvision 0.29 model in tests.
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def head_out(model: nn.Module, family: str) -> int:
    head = model.get_submodule(head_name(model, family))
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def replace_head(model: nn.Module, family: str, num_classes: int) -> None:
    if family == "timm":
        timm_models.reset_head(model, num_classes)
        return
    path = head_name(model, family)
    old = model.get_submodule(path)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:  # squeezenet's 1x1 conv classifier
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, bias=old.bias is not None)
    _set_module(model, path, new.to(device=old.weight.device, dtype=old.weight.dtype))
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


# ----------------------------------------------------------------------------------------------------- stem


def stem_name(model: nn.Module) -> str:
    """The input conv: the first Conv2d registered (true for every torchvision classifier and LeNet5); a timm
    model's is the one its pretrained_cfg names (first_conv)."""
    named = timm_models.first_conv(model) if hasattr(model, "pretrained_cfg") else None
    return named or next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def adapt_stem(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Swap the 3-channel input conv for a 1-channel one."""
    path = stem_name(model)
    old = model.get_submodule(path)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
        old.groups, bias=old.bias is not None, padding_mode=old.padding_mode,
    )  # fmt: skip
    with torch.no_grad():
        # Pretrained: the summed kernel makes the 1-channel net compute what the RGB net computes on a gray image.
        # Scratch: one input slice keeps the family's own init distribution (e.g. resnet's fan_out normal).
        new.weight.copy_(weights_mod.gray_stem_kernel(old.weight) if pretrained else old.weight[:, :1])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _set_module(model, path, new.to(device=old.weight.device, dtype=old.weight.dtype))


# ----------------------------------------------------------------------------------------------------- build

# Aux classifiers: disabled (get_model returns a plain Tensor in train mode too); their keys in torchvision
# state_dicts are ignored when such a file is loaded as a checkpoint.
AUX_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception": ("AuxLogits.",)}


def _strip_aux(model: nn.Module, family: str) -> None:
    # torchvision forces aux_logits=True to load pretrained weights, and inception_v3 keeps them afterwards
    # (its builder's default is aux_logits=True); same attributes torchvision itself clears.
    if family == "googlenet":
        model.aux_logits, model.aux1, model.aux2 = False, None, None
    elif family == "inception":
        model.aux_logits, model.AuxLogits = False, None


def _build(spec: ModelSpec, num_classes: int | None, weights=None) -> nn.Module:
    """The bare 3-channel network: scratch with num_classes outputs, or torchvision's pretrained one."""
    if spec.family == "lenet":
        return LeNet5(num_classes=num_classes or 10, in_channels=3)
    if spec.family == "timm":
        return timm_models.create(timm_models.arch_of(spec.name), num_classes)
    kwargs: dict = {}
    if spec.family in ("googlenet", "inception"):
        kwargs["transform_input"] = False
        if weights is None:  # with weights torchvision insists on its own aux/init values
            kwargs.update(aux_logits=False, init_weights=True)
    if weights is None:
        kwargs["num_classes"] = num_classes
        if spec.name.startswith("vit_"):  # vit_h_14's DEFAULT weights are 518px; keep scratch == spec
            kwargs["image_size"] = spec.default_size
    model = weights_mod.torchvision_models().get_model(spec.name, weights=weights, **kwargs)
    _strip_aux(model, spec.family)
    return model


def get_model(name: str, num_classes: int, in_channels: int = 3, weights: weights_mod.Weights = None) -> nn.Module:
    """Build `name` with a num_classes head and an in_channels stem.

    weights: None/"none" (scratch), a torchvision weights name ("DEFAULT", "IMAGENET1K_V1",
    "ResNet18_Weights.IMAGENET1K_V1"; timm/*: "DEFAULT" or a timm pretrained tag), a checkpoint path on any
    filesystem (our model file or a raw state_dict; timm/*: also a .safetensors file), or a checkpoint already
    read (`weights.initial_weights`).
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    if in_channels not in (1, 3):
        raise UserError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
    kind, source = weights_mod.classify(weights)
    if spec.family == "timm":
        return _get_timm_model(spec, num_classes, in_channels, kind, source)
    if kind == "torchvision":
        if spec.default_weights is None:
            raise UserError(f"{spec.name} has no pretrained weights; use weights=None or a checkpoint path")
        w = weights_mod.resolve_torchvision_weights(spec.name, source)
        model = weights_mod.build_pretrained(spec.name, w, lambda wt: _build(spec, None, wt))
        if head_out(model, spec.family) != num_classes:  # same size (1000 classes) keeps the pretrained head
            replace_head(model, spec.family, num_classes)
        adapt_stem(model, in_channels, pretrained=True)
        return model
    if spec.family == "lenet":
        model = LeNet5(num_classes=num_classes, in_channels=in_channels)
    else:
        model = _build(spec, num_classes)
        adapt_stem(model, in_channels, pretrained=False)
    if kind in ("path", "checkpoint"):
        weights_mod.load_checkpoint(
            model, source, arch=spec.name, head=head_name(model, spec.family), stem=stem_name(model),
            ignore_unexpected=AUX_PREFIXES.get(spec.family, ()),
        )  # fmt: skip
    return model


def _get_timm_model(spec: ModelSpec, num_classes: int, in_channels: int, kind: str, source) -> nn.Module:
    """timm sizes the head and the in_channels stem itself (in_chans; pretrained RGB stems summed for 1 channel).
    A weights file that is not our model file is timm's or Hugging Face's and loads through timm's loader."""
    arch = timm_models.arch_of(spec.name)
    if kind == "torchvision":  # a pretrained name: DEFAULT or a timm tag
        if spec.default_weights is None:
            raise UserError(f"{spec.name} has no pretrained weights; use weights=None or a weights file path")
        return timm_models.pretrained(arch, timm_models.resolve_tag(arch, source), num_classes, in_channels)
    ckpt = weights_mod.read_checkpoint(source) if kind == "path" else source
    if ckpt is not None and ckpt.arch is None:
        return timm_models.from_state_dict(arch, ckpt.state_dict, ckpt.source, num_classes, in_channels)
    model = timm_models.create(arch, num_classes, in_channels)
    if ckpt is not None:  # our model file
        weights_mod.load_checkpoint(model, ckpt, arch=spec.name, head=head_name(model, "timm"), stem=stem_name(model))
    return model


def build_model_from_file(path) -> tuple[nn.Module, dict]:
    """Rebuild the network of a model file (any filesystem) and load its weights: (model in eval mode, metadata)."""
    payload = load_model_file(path)
    model = get_model(payload["arch"], num_classes=payload["num_classes"], in_channels=payload["in_channels"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:  # missing, unexpected or misshapen weights: torch's message spans lines
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"{payload['path']}: weights do not fit {payload['arch']} ({reason})") from None
    model.eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}


# ----------------------------------------------------------------------------------------------------- table


@functools.cache
def param_count(name: str) -> int:
    """Parameters of the ImageNet-sized (1000-class, RGB) model, built without allocating storage."""
    from accelerate import init_empty_weights  # params on 'meta'; regnet's builder does real tensor math

    spec = get_spec(name)
    num_classes = 10 if spec.family == "lenet" else 1000
    try:
        with init_empty_weights():
            model = _build(spec, num_classes)
    except (NotImplementedError, RuntimeError):
        if spec.family != "timm":
            raise
        model = _build(spec, num_classes)  # a few timm builders compute with their parameters (swinv2, vitamin)
    return sum(p.numel() for p in model.parameters())


def weights_cached(name: str) -> bool | None:
    """Whether the DEFAULT weights file is in the torch hub cache, for timm/* where timm looks for it (mostly
    the Hugging Face cache); None: the model has no weights."""
    spec = get_spec(name)
    if spec.default_weights is None:
        return None
    if spec.family == "timm":
        return timm_models.weights_location(timm_models.arch_of(spec.name), spec.default_weights)[0] is not None
    w = weights_mod.torchvision_models().get_model_weights(spec.name)[spec.default_weights]
    return weights_mod.cache_file(w).is_file()


def models_table(pattern: str | None = None, named_only: bool = False) -> str:
    names = [n for n in list_models(pattern) if not named_only or n in NAMED]
    if not names:
        timm_pattern = pattern is not None and pattern.lower().startswith(timm_models.PREFIX)
        return f"no model matches '{pattern}' ({TIMM_LIST_HINT if timm_pattern else LIST_HINT})"
    header = ("name", "family", "params", "min size", "default weights", "cached?")
    rows = []
    for n in names:
        s = get_spec(n)
        cached = {None: "-", True: "yes", False: "no"}[weights_cached(n)]
        size = f"={s.min_size}" if s.fixed_size else str(s.min_size)
        rows.append((n, s.family, f"{param_count(n) / 1e6:.1f}M", size, s.default_weights or "-", cached))
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if names[0].startswith(timm_models.PREFIX):
        cache = f"{timm_models.hf_cache_dir()}, else {cache}"
    return format_table(header, rows) + f"\n(cache: {cache})"
