"""Transfer learning: the network as ordered stages (stem -> head), freezing strategies, optimizer groups."""

from __future__ import annotations

import fnmatch
from typing import get_args

from torch import nn

from imgcls_dist.config import Transfer
from imgcls_dist.errors import UserError
from imgcls_dist.models import timm_models
from imgcls_dist.models.registry import get_spec, head_name

STRATEGIES = get_args(Transfer)
_CONTAINERS = (nn.Sequential, nn.ModuleList)  # exact types: Conv2dNormActivation etc. subclass Sequential
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
# Not 1-D but conventionally exempt from weight decay (timm's no_weight_decay(): cls token, position
# embeddings, swin's relative-position tables and v2 logit scale).
_NO_DECAY_NAMES = ("class_token", "pos_embedding", "relative_position_bias_table", "logit_scale")


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _children(model: nn.Module, path: str = "", skip: str = "") -> list[str]:
    """Qualified names of the direct children of `path` that hold parameters, except `skip`."""
    parent = model.get_submodule(path) if path else model
    pre = f"{path}." if path else ""
    return [pre + n for n, c in parent.named_children() if _has_params(c) and pre + n != skip]


def _split_after_pool(model: nn.Module, path: str) -> list[list[str]]:
    """vgg/alexnet/squeezenet `features`: one stage per block, a block ending at each MaxPool."""
    groups, cur = [], []
    for n, c in model.get_submodule(path).named_children():
        if _has_params(c):
            cur.append(f"{path}.{n}")
        if isinstance(c, nn.MaxPool2d) and cur:
            groups, cur = groups + [cur], []
    return groups + ([cur] if cur else [])


def _generic(model: nn.Module, head: str) -> list[list[str]]:
    """Top-level children in order; containers (and the head's ancestors, and top-level modules that hold a
    container, e.g. vit's encoder) are opened so each block is a stage. A norm-only unit joins the
    previous stage (mnasnet's conv/bn pairs, vit's final ln)."""
    stages: list[list[str]] = []

    def walk(module: nn.Module, prefix: str, top: bool) -> None:
        direct = [prefix + n for n, _ in module.named_parameters(recurse=False)]
        if direct:  # vit: class_token, encoder.pos_embedding
            stages.append(direct)
        for n, child in module.named_children():
            path = prefix + n
            if path == head or not _has_params(child):
                continue
            holds_container = top and any(type(g) in _CONTAINERS for g in child.children())
            if head.startswith(path + ".") or type(child) in _CONTAINERS or holds_container:
                walk(child, path + ".", False)
            elif isinstance(child, _NORMS) and stages:
                stages[-1].append(path)
            else:
                stages.append([path])

    walk(model, "", True)
    return stages


def _backbone(model: nn.Module, family: str, head: str) -> list[list[str]]:
    """Module paths per backbone stage, stem first; the head is not included."""
    if family == "resnet":
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    if family == "regnet":
        return [["stem"]] + [[p] for p in _children(model, "trunk_output")]
    if family == "timm":  # timm's own grouping; _generic for the few models without a group_matcher
        heads = timm_models.classifier_names(model)
        groups = timm_models.backbone_groups(model, heads) or _generic(model, head)
        return [g for g in ([u for u in units if u not in heads] for units in groups) if g]  # 2nd head (pit)
    if family in ("lenet", "shufflenet", "googlenet", "inception"):
        return [[p] for p in _children(model, skip=head)]
    is_seq = isinstance(getattr(model, "classifier", None), nn.Sequential)
    body = _children(model, "classifier", skip=head) if is_seq else []
    tail = [body] if body else []  # vgg fc6/fc7, alexnet fc6/fc7, mobilenet_v3 pre-logits, convnext norm
    if family in ("alexnet", "vgg", "squeezenet"):
        return _split_after_pool(model, "features") + tail
    if family in ("mobilenet_v2", "mobilenet_v3", "efficientnet", "convnext"):
        return [[p] for p in _children(model, "features")] + tail
    if family == "densenet":  # [conv0, norm0], [denseblock_i, transition_i]..., [denseblock4, norm5]
        groups: list[list[str]] = [[]]
        for p in _children(model, "features"):
            if p.startswith("features.denseblock"):
                groups.append([])
            groups[-1].append(p)
        return groups
    return _generic(model, head)


def stages(model: nn.Module, name: str) -> list[list[tuple[str, nn.Parameter]]]:
    """All parameters grouped stem -> head; the last stage is exactly the classifier head."""
    family = get_spec(name).family
    head = head_name(model, family)
    heads = timm_models.classifier_names(model) if family == "timm" else [head]
    layout = _backbone(model, family, head) + [heads]
    out: list[list[tuple[str, nn.Parameter]]] = [[] for _ in layout]
    for pname, p in model.named_parameters():
        idx = next(
            (i for i, units in enumerate(layout) if any(pname == u or pname.startswith(u + ".") for u in units)), None
        )
        if idx is None:
            raise RuntimeError(f"{name}: parameter {pname} is in no stage (layout for family {family} is stale)")
        out[idx].append((pname, p))
    return [s for s in out if s]


def apply_transfer(model: nn.Module, name: str, strategy: str) -> None:
    """Set requires_grad per strategy (backbone = all stages but the head):
    full: everything; feature_extraction: head only; freeze_early: first half (floor) of the backbone
    frozen; freeze_most: only the last backbone stage + head train.

    BatchNorm choice: frozen stages also keep their running stats (freeze_bn_stats puts their BN in eval);
    otherwise a "frozen" backbone still drifts as running mean/var re-estimate on the new data, which is
    noisy at small per-device batches. model.train() undoes this, so the training loop must call
    freeze_bn_stats(model) after every model.train(); it is also applied here once.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown transfer strategy '{strategy}'; valid: {', '.join(STRATEGIES)}")
    groups = stages(model, name)
    n = len(groups) - 1  # backbone stages; every family has >= 4, so the four strategies differ
    n_frozen = {"full": 0, "feature_extraction": n, "freeze_early": n // 2, "freeze_most": n - 1}[strategy]
    for i, group in enumerate(groups):
        for _, p in group:
            p.requires_grad_(i >= n_frozen)
    freeze_bn_stats(model)


def freeze_bn_stats(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode (running stats stay pretrained)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def param_groups(
    model: nn.Module, name: str, lr: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict]:
    """Optimizer groups over trainable params: lr * layer_decay**k for the stage k steps below the head,
    weight decay 0 for 1-D params (norm weights, biases), _NO_DECAY_NAMES and what a timm model's
    no_weight_decay() names."""
    groups = stages(model, name)
    exempt_names = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
    head_idx = len(groups) - 1
    out = []
    for i, group in enumerate(groups):
        stage_lr = lr * layer_decay ** (head_idx - i)
        label = "head" if i == head_idx else f"stage{i}"
        decay, no_decay = [], []
        for pname, p in group:
            if p.requires_grad:
                exempt = p.ndim <= 1 or pname.rsplit(".", 1)[-1] in _NO_DECAY_NAMES or _matches(pname, exempt_names)
                (no_decay if exempt else decay).append(p)
        for params, wd, kind in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                out.append({"params": params, "lr": stage_lr, "weight_decay": wd, "name": f"{label}/{kind}"})
    return out


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in patterns)  # timm's names may be patterns (xcit: pos_embed.*)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
