"""timm architectures in the registry (`timm/<name>`): real timm on CPU, no network (weight files are made here,
the Hugging Face cache is an empty or hand-filled temporary one in offline mode)."""

from __future__ import annotations

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from imgcls_dist.errors import UserError
from imgcls_dist.models.checkpoint import save_model_file
from imgcls_dist.models.registry import (
    build_model_from_file, get_model, get_spec, head_name, head_out, list_models, models_table, stem_name,
    weights_cached,
)  # fmt: skip
from imgcls_dist.models.transfer import apply_transfer, count_trainable, param_groups, stages
from imgcls_dist.models.weights import initial_weights

NAMES = ["timm/resnet10t", "timm/convnext_atto", "timm/vit_tiny_patch16_224"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: nothing is downloaded and no host is asked."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # huggingface_hub turned both variables into constants when timm imported it; those are what it reads
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf" / "hub"


def head_params(model, name) -> int:
    return sum(p.numel() for n, p in stages(model, name)[-1])


# ------------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize("name", NAMES)
def test_spec_from_timm_pretrained_cfg(name):
    cfg = timm.models.get_pretrained_cfg(name.removeprefix("timm/"))
    spec = get_spec(name)
    assert (spec.name, spec.family) == (name, "timm")
    assert spec.default_size == cfg.input_size[-1] and spec.mean == cfg.mean and spec.std == cfg.std
    assert spec.default_weights == cfg.tag and timm.models.is_model_pretrained(name.removeprefix("timm/"))
    assert spec.fixed_size == cfg.fixed_input_size
    assert spec.min_size == (spec.default_size if spec.fixed_size else 32)


def test_spec_values():
    assert get_spec("TIMM/ResNet10t").default_size == 176  # its weights' training resolution
    vit = get_spec("timm/vit_tiny_patch16_224")
    assert vit.fixed_size and vit.min_size == 224 and vit.mean == (0.5, 0.5, 0.5)
    assert get_spec("timm/convnext_atto_rms").default_weights is None  # timm has no weights for it
    with pytest.raises(UserError, match="no pretrained weights"):
        get_model("timm/convnext_atto_rms", 3, weights="DEFAULT")


def test_unknown_timm_name_suggests():
    with pytest.raises(UserError, match="timm/resnet18") as e:
        get_spec("timm/resnet19")
    assert "imgcls-dist models 'timm/*'" in str(e.value)


def test_list_models():
    res = list_models("timm/resnet1*")
    assert "timm/resnet18" in res and all(n.startswith("timm/resnet1") for n in res)
    assert not any(n.startswith("timm/") for n in list_models() + list_models("resnet*"))


def test_models_table(hf_cache):
    lines = models_table("timm/resnet18*").splitlines()
    row = next(line.split() for line in lines if line.startswith("timm/resnet18 "))
    assert row == ["timm/resnet18", "timm", "11.7M", "32", "a1_in1k", "no"]
    assert str(hf_cache) in lines[-1]


# ------------------------------------------------------------------------------------------------ build


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("name", NAMES)
def test_forward_at_min_size(name, in_channels):
    spec = get_spec(name)
    model = get_model(name, num_classes=7, in_channels=in_channels)
    assert head_out(model, "timm") == 7
    assert model.get_submodule(stem_name(model)).in_channels == in_channels
    out = model.train()(torch.randn(2, in_channels, spec.min_size, spec.min_size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


# -------------------------------------------------------------------------------------- weights files


@pytest.mark.parametrize("arch, fmt", [("resnet10t", "safetensors"), ("convnext_atto", "pth")])
def test_weights_file_through_timm_loader(tmp_path, arch, fmt):
    """A hub-style file (1000-class head): backbone loaded as saved, head new; 1 channel: summed stem."""
    sd = timm.create_model(arch).state_dict()
    path = tmp_path / f"model.{fmt}"
    save_file(sd, path) if fmt == "safetensors" else torch.save(sd, path)
    name = f"timm/{arch}"
    scratch = get_model(name, 5)
    head = head_name(scratch, "timm")
    stem = f"{stem_name(scratch)}.weight"
    for weights in (str(path), initial_weights(str(path))):  # as a path and as train's already-read checkpoint
        model = get_model(name, 5, weights=weights)
        got = model.state_dict()
        assert got[f"{head}.weight"].shape == (5, sd[f"{head}.weight"].shape[1])
        for k, v in sd.items():
            if not k.startswith(head + "."):
                assert torch.equal(got[k], v), k
        assert not torch.equal(scratch.state_dict()[stem], sd[stem])
        assert model.pretrained_cfg.get("state_dict") is None  # timm's copy of the tensors is not kept
    gray = get_model(name, 5, in_channels=1, weights=path)
    assert torch.allclose(gray.state_dict()[stem], sd[stem].sum(1, keepdim=True))
    same = get_model(name, 1000, weights=path)  # the file's own head size: its head is kept
    assert torch.equal(same.state_dict()[f"{head}.weight"], sd[f"{head}.weight"])


def test_weights_file_that_does_not_fit(tmp_path):
    sd = timm.create_model("resnet10t", num_classes=3).state_dict()
    sd.pop("layer2.0.conv1.weight")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="layer2.0.conv1.weight") as e:  # timm alone would load it non-strictly
        get_model("timm/resnet10t", 5, weights=str(tmp_path / "bad.pth"))
    assert "bad.pth" in str(e.value) and "\n" not in str(e.value)


def test_model_file_roundtrip_and_transfer(tmp_path):
    model = get_model("timm/convnext_atto", 4).eval()
    save_model_file(
        tmp_path / "run", model=model, arch="timm/convnext_atto", classes=list("abcd"), in_channels=3,
        image_size=64, mean=[0.5] * 3, std=[0.5] * 3,
    )  # fmt: skip
    rebuilt, meta = build_model_from_file(tmp_path / "run")
    x = torch.randn(2, 3, 64, 64)
    assert meta["arch"] == "timm/convnext_atto" and torch.equal(rebuilt(x), model(x))
    gray = get_model("timm/convnext_atto", 6, in_channels=1, weights=tmp_path / "run")  # generic checkpoint path
    assert torch.allclose(gray.stem[0].weight, model.stem[0].weight.sum(1, keepdim=True))
    assert gray.head.fc.out_features == 6 and torch.equal(gray.stages[3].blocks[1].mlp.fc1.weight,
                                                          model.stages[3].blocks[1].mlp.fc1.weight)


# ------------------------------------------------------------------------------------ pretrained names


def _fill_hf_cache(cache, repo: str, sd: dict) -> None:
    """The layout huggingface_hub reads offline: refs/main -> snapshots/<commit>/<file>."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(sd, folder / "snapshots" / commit / "model.safetensors")


def test_pretrained_not_cached_names_local_alternative(hf_cache):
    assert weights_cached("timm/resnet10t") is False
    with pytest.raises(UserError) as e:
        get_model("timm/resnet10t", 5, weights="DEFAULT")
    msg = str(e.value)
    assert str(hf_cache) in msg and "timm/resnet10t.c3_in1k" in msg and "model.weights: /path/to/" in msg
    with pytest.raises(UserError, match="c3_in1k"):  # the tags timm has
        get_model("timm/resnet10t", 5, weights="IMAGENET1K_V1")


def test_pretrained_from_offline_cache(hf_cache):
    sd = timm.create_model("resnet10t").state_dict()
    _fill_hf_cache(hf_cache, "timm/resnet10t.c3_in1k", sd)
    assert weights_cached("timm/resnet10t") is True
    for weights in ("DEFAULT", "c3_in1k", "resnet10t.c3_in1k"):
        model = get_model("timm/resnet10t", 5, in_channels=1, weights=weights)
        assert torch.equal(model.layer3[0].conv2.weight, sd["layer3.0.conv2.weight"])
        assert torch.allclose(model.conv1[0].weight, sd["conv1.0.weight"].sum(1, keepdim=True))
        assert model.fc.out_features == 5


# --------------------------------------------------------------------------------------------- transfer


@pytest.mark.parametrize("name", NAMES + ["timm/deit_tiny_distilled_patch16_224"])
def test_stages_and_strategies(name):
    model = get_model(name, 7)
    groups = [[n for n, _ in s] for s in stages(model, name)]
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for s in groups for n in s) == sorted(names)  # every parameter in exactly one stage
    heads = {f"{h}.{p}" for h in ([head_name(model, "timm")] + (["head_dist"] if "distilled" in name else []))
             for p in ("weight", "bias")}
    assert set(groups[-1]) == heads and f"{stem_name(model)}.weight" in groups[0]  # stem -> head
    counts = []
    for strategy in ("full", "freeze_early", "freeze_most", "feature_extraction"):
        apply_transfer(model, name, strategy)
        counts.append(count_trainable(model))
    assert counts[0] > counts[1] > counts[2] > counts[3] == head_params(model, name)


def test_param_groups_layer_decay_and_no_decay():
    name = "timm/vit_tiny_patch16_224"
    model = get_model(name, 7)
    groups = param_groups(model, name, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    assert list(lrs)[-1] == "head" and lrs["head"] == 1.0 and len(lrs) == len(stages(model, name))
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay  # timm's no_weight_decay()
