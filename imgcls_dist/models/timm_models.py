"""timm architectures, reached as `timm/<timm model name>`: names, pretrained configs, building and loading
weights through timm's own loader, classifier/stem names and timm's layer grouping.

timm is imported on first use only: importing it costs seconds per process, which commands and workers that
never build a timm model would pay for nothing. The registry is the one entry point; this module knows timm.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from imgcls_dist.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "timm/"
_HEAD_TYPES = (nn.Linear, nn.Conv2d)


@functools.cache
def timm_lib():
    import timm

    return timm


def arch_of(name: str) -> str:
    """'timm/resnet18' -> 'resnet18'."""
    return name[len(PREFIX) :]


@functools.cache
def arch_names() -> tuple[str, ...]:
    return tuple(timm_lib().list_models())


def pretrained_cfg(arch: str):
    """timm's config of the default pretrained tag (input size, mean/std, classifier and stem names, where the
    weights live); an architecture without weights gets its 'untrained' config."""
    return timm_lib().models.get_pretrained_cfg(arch)


def default_tag(arch: str) -> str | None:
    """The tag `timm.create_model(arch, pretrained=True)` loads; None when timm has no weights for arch."""
    return pretrained_cfg(arch).tag if timm_lib().models.is_model_pretrained(arch) else None


def resolve_tag(arch: str, name: str) -> str:
    """'DEFAULT' | '<tag>' | '<arch>.<tag>' -> a tag timm has weights for."""
    cfgs = timm_lib().models.get_arch_pretrained_cfgs(arch)  # keyed '<arch>.<tag>'
    tags = [k.partition(".")[2] for k, c in cfgs.items() if c.has_weights]
    if name.upper() == "DEFAULT" and tags:
        return default_tag(arch)
    tag = name[len(arch) + 1 :] if name.startswith(f"{arch}.") else name
    if tag in tags:
        return tag
    valid = f"DEFAULT, {', '.join(tags)}" if tags else "none"
    raise UserError(f"unknown weights '{name}' for {PREFIX}{arch}; pretrained tags: {valid}, or a weights file path")


def create(arch: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    return timm_lib().create_model(arch, num_classes=num_classes, in_chans=in_channels, **kwargs)


# ---------------------------------------------------------------------------------------- layer names


def _resolve_head(model: nn.Module, path: str) -> str:
    # Should a config name a head block rather than its layer (none of timm 1.0's model families does), the
    # block's last Linear/Conv is the layer get_model sizes.
    if isinstance(model.get_submodule(path), _HEAD_TYPES):
        return path
    inner = [f"{path}.{n}" for n, m in model.get_submodule(path).named_modules() if n and isinstance(m, _HEAD_TYPES)]
    return inner[-1] if inner else path


def classifier_names(model: nn.Module) -> list[str]:
    """The classifier layers timm's config names (two for distilled/dual-branch models), as Linear/Conv paths."""
    names = model.pretrained_cfg.get("classifier")
    names = [names] if isinstance(names, str) else list(names or ())
    return [_resolve_head(model, n) for n in names]


def first_conv(model: nn.Module) -> str | None:
    """The input conv timm's config names (the first of several for multi-stem models), if it is a Conv2d."""
    names = model.pretrained_cfg.get("first_conv")
    name = names if isinstance(names, str) or not names else names[0]
    try:
        return name if name and isinstance(model.get_submodule(name), nn.Conv2d) else None
    except AttributeError:
        return None


def reset_head(model: nn.Module, num_classes: int) -> None:
    """timm's own reset_classifier (it knows each model's pooling/head layout), placed like the old head."""
    ref = next(model.parameters())
    model.reset_classifier(num_classes)
    for name in classifier_names(model):
        model.get_submodule(name).to(device=ref.device, dtype=ref.dtype)


# ------------------------------------------------------------------------------------------- weights


def _hf_filenames(cfg) -> tuple[str, ...]:
    # timm's load_state_dict_from_hf prefers model.safetensors over pytorch_model.bin (timm/models/_hub.py).
    return (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def weights_location(arch: str, tag: str) -> tuple[Path | None, str]:
    """(the cached weights file or None, where timm looks for it and where it comes from)."""
    cfg = timm_lib().models.get_pretrained_cfg(f"{arch}.{tag}")
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in _hf_filenames(cfg):
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit), hit
        where = f"the Hugging Face cache {hf_cache_dir()} (repo {repo}, file {_hf_filenames(cfg)[0]})"
        return None, where
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
    return (path if path.is_file() else None), f"{path} (from {cfg.url})"


def pretrained(arch: str, tag: str, num_classes: int, in_channels: int) -> nn.Module:
    """timm's pretrained model (its Hugging Face cache, downloading when online), one-line errors."""
    cached, where = weights_location(arch, tag)
    cfg = timm_lib().models.get_pretrained_cfg(f"{arch}.{tag}")
    try:
        model = _load_strict(f"{arch}.{tag}", {}, cfg.num_classes, num_classes, in_channels)
    except Exception as e:  # noqa: BLE001 - hub, network, unpickling and shape errors alike: the user's to fix
        reason = _reason(e)
        if cached is not None:
            raise UserError(f"{cached}: cached {PREFIX}{arch}.{tag} weights cannot be loaded ({reason})") from None
        raise UserError(
            f"cannot load {PREFIX}{arch} weights '{tag}' ({reason}); timm looks for them in {where}: fill that "
            "cache where the Hub is reachable, or give a local weights file: model.weights: /path/to/model.safetensors"
        ) from None
    log.info("%s%s: loaded pretrained '%s' from %s", PREFIX, arch, tag, where)
    return model


def from_state_dict(arch: str, state_dict: dict, source: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build arch and load a timm-format state_dict (a timm/Hugging Face weights file) through timm's loader:
    its per-model filter (original-format checkpoints, position-embedding resizing) and stem adaptation.

    The tensors come as pretrained_cfg's `state_dict` rather than its `file`: they are already read once
    (weights.read_checkpoint, any filesystem, weights_only), and `file` must be a local path timm reads again."""
    names = pretrained_cfg(arch).classifier
    heads = [h for h in ([names] if isinstance(names, str) else names or ()) if f"{h}.weight" in state_dict]
    head_classes = state_dict[f"{heads[0]}.weight"].shape[0] if heads else 0
    # source/label_offset: the default tag's values describe its hub file, not this one
    overlay = dict(state_dict=state_dict, num_classes=head_classes, label_offset=0, source=None)
    try:
        model = _load_strict(arch, overlay, head_classes, num_classes, in_channels)
    except Exception as e:  # noqa: BLE001 - missing/unexpected keys, shapes: the file does not fit arch
        reason = _reason(e)
        raise UserError(f"{source}: weights file does not fit {PREFIX}{arch} ({reason})") from None
    log.info("%s%s: loaded %s through timm", PREFIX, arch, source)
    return model


def _reason(e: BaseException) -> str:
    # torch's load_state_dict error starts with a bare "Error(s) in loading state_dict for X:" line
    text = " ".join(line.strip() for line in str(e).strip().splitlines())
    return f"{type(e).__name__}: {text[:300]}"


def _load_strict(name: str, overlay: dict, head_classes: int, num_classes: int, in_channels: int) -> nn.Module:
    # Built with the file's own head size, so timm loads strictly (it turns strict off whenever the head size
    # differs, which would also pass a file with missing or extra backbone keys); then our head replaces it.
    model = create(name, head_classes, in_channels, pretrained=True, pretrained_cfg_overlay=overlay)
    if "state_dict" in overlay:  # the build keeps a deep copy of the tensors in pretrained_cfg (asdict)
        model.pretrained_cfg["state_dict"] = None
    if head_classes != num_classes:
        reset_head(model, num_classes)
    return model


# -------------------------------------------------------------------------------------------- stages


def backbone_groups(model: nn.Module, heads: list[str]) -> list[list[str]] | None:
    """Parameter names per backbone stage, stem first, by timm's own coarse grouping (the one its layer-decay
    optimizer groups use); None when the model has no group_matcher."""
    if not hasattr(model, "group_matcher"):
        return None
    layer_of = timm_lib().models.group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    in_head = lambda n: any(n.startswith(h + ".") for h in heads)  # noqa: E731
    groups: dict[int, list[str]] = {}
    for name, _ in model.named_parameters():
        if not in_head(name):
            groups.setdefault(layer_of[name], []).append(name)
    return [groups[k] for k in sorted(groups)]
