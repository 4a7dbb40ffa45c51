"""Registry, weights loading and transfer strategies. CPU only, no network: pretrained files are faked."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from accelerate import init_empty_weights
from torch import nn

from imgcls_dist.errors import UserError
from imgcls_dist.models import registry, transfer
from imgcls_dist.models.checkpoint import save_model_file
from imgcls_dist.models.registry import NAMED, build_model_from_file, get_model, get_spec, head_name, list_models, models_table, stem_name
from imgcls_dist.models.transfer import apply_transfer, count_trainable, param_groups, stages
from imgcls_dist.models.weights import cache_file, load_checkpoint

NAMES = list(NAMED)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; any download attempt fails like an offline machine would."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *a, **k):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch"


def meta_model(name: str, in_channels: int = 3, num_classes: int = 7) -> nn.Module:
    """Parameters on 'meta': structure, counts and requires_grad without allocating (vgg16 is 138M)."""
    with init_empty_weights():  # buffers too would put regnet's width arithmetic on meta (fails .tolist())
        return get_model(name, num_classes, in_channels).to("meta")


def head_params(model: nn.Module, name: str) -> int:
    return sum(p.numel() for p in model.get_submodule(head_name(model, get_spec(name).family)).parameters())


# ------------------------------------------------------------------------------------------- forward/backward


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_at_min_size(name, in_channels):
    spec = get_spec(name)
    model = get_model(name, num_classes=7, in_channels=in_channels)
    assert registry.head_out(model, spec.family) == 7
    assert model.get_submodule(stem_name(model)).in_channels == in_channels
    x = torch.randn(2, in_channels, spec.min_size, spec.min_size)

    model.train()  # batch 2: BatchNorm needs more than one value per channel
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)  # googlenet/inception: no aux tuple
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 6])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_min_size_is_tight():
    """One below min_size fails (spot check of the measured values on the cheap ones)."""
    for name in ("lenet5", "alexnet", "googlenet", "vgg11_bn"):
        spec = get_spec(name)
        model = meta_model(name).eval()
        model(torch.zeros(2, 3, spec.min_size, spec.min_size, device="meta"))
        with pytest.raises(RuntimeError):
            model(torch.zeros(2, 3, spec.min_size - 1, spec.min_size - 1, device="meta"))


def test_inception_input_transform_disabled():
    for name in ("googlenet", "inception_v3"):
        assert meta_model(name).transform_input is False
        assert get_spec(name).mean == (0.5, 0.5, 0.5)  # what transform_input used to produce


# --------------------------------------------------------------------------------------------------- transfer


@pytest.mark.parametrize("name", NAMES)
def test_strategies_strictly_ordered(name):
    model = meta_model(name)
    counts = {}
    for strategy in transfer.STRATEGIES:
        apply_transfer(model, name, strategy)
        counts[strategy] = count_trainable(model)
    assert counts["full"] == sum(p.numel() for p in model.parameters())
    assert counts["full"] > counts["freeze_early"] > counts["freeze_most"] > counts["feature_extraction"]
    assert counts["feature_extraction"] == head_params(model, name)
    head = head_name(model, get_spec(name).family)
    assert {n for n, _ in stages(model, name)[-1]} == {f"{head}.weight", f"{head}.bias"}


@pytest.mark.parametrize("name", NAMES)
def test_param_groups(name):
    model = meta_model(name)
    groups = param_groups(model, name, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    assert {"params", "lr", "weight_decay", "name"} <= set(groups[0])
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each trainable param exactly once
    stage_lr = {}
    for g in groups:
        stage_lr.setdefault(g["name"].split("/")[0], g["lr"])
        assert all(p.ndim > 1 for p in g["params"]) or g["weight_decay"] == 0.0
    lrs = list(stage_lr.values())  # stem -> head
    assert lrs[-1] == 1.0 and list(stage_lr)[-1] == "head"
    assert all(a < b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-2] == 0.5 and lrs[0] == 0.5 ** (len(lrs) - 1)

    apply_transfer(model, name, "feature_extraction")
    groups = param_groups(model, name, lr=1.0, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["head/decay", "head/no_decay"]


def test_transfer_unknown_strategy():
    with pytest.raises(UserError, match="feature_extraction"):
        apply_transfer(meta_model("resnet18"), "resnet18", "freeze_some")


def test_freeze_bn_stats_keeps_frozen_bn_in_eval():
    model = get_model("resnet18", 7)
    apply_transfer(model, "resnet18", "freeze_early")  # stem + layer1 frozen
    model.train()
    transfer.freeze_bn_stats(model)
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training and model.layer4[1].bn2.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32) + 3)
    assert torch.equal(model.bn1.running_mean, before)


def test_vit_generic_stages_and_no_decay_tokens():
    model = meta_model("vit_b_16")
    names = [[n for n, _ in s] for s in stages(model, "vit_b_16")]
    assert names[0] == ["class_token"] and names[-1] == ["heads.head.weight", "heads.head.bias"]
    assert sum(any(".encoder_layer_" in n for n in s) for s in names) == 12  # one stage per block
    groups = param_groups(model, "vit_b_16", 1e-3, 0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.class_token) in no_decay and id(model.encoder.pos_embedding) in no_decay


# --------------------------------------------------------------------------------------------------- registry


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match="resnet18") as e:
        get_model("resnet19", 3)
    assert "imgcls-dist models" in str(e.value) and "\n" not in str(e.value)


def test_list_models():
    names = list_models()
    assert names[: len(NAMED)] == NAMES
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    res = list_models("resnet*")
    assert res[:3] == ["resnet18", "resnet34", "resnet50"] and {"resnet101", "resnet152"} <= set(res)
    assert list_models("efficientnet_b?") == [f"efficientnet_b{i}" for i in range(8)]
    assert list_models("nope*") == []


def test_specs_match_torchvision():
    for name, spec in NAMED.items():
        if spec.default_weights is not None:
            assert torchvision.models.get_model_weights(name).DEFAULT.name == spec.default_weights
    assert get_spec("ResNet101").family == "resnet" and get_spec("wide_resnet50_2").family == "resnet"
    assert get_spec("vit_b_16").fixed_size and get_spec("vit_b_16").min_size == 224
    assert get_spec("efficientnet_v2_l").mean == (0.5, 0.5, 0.5)  # from its weights' transforms


@pytest.mark.parametrize("name, size", [("shufflenet_v2_x0_5", 32), ("squeezenet1_1", 17), ("mnasnet0_5", 32)])
def test_generic_models_build(name, size):
    model = get_model(name, 5, in_channels=1)
    assert registry.head_out(model, get_spec(name).family) == 5
    assert model(torch.randn(2, 1, size, size)).shape == (2, 5)
    apply_transfer(model, name, "feature_extraction")
    assert count_trainable(model) == head_params(model, name)


def test_models_table(torch_home):
    table = models_table("resnet1*")
    lines = table.splitlines()
    assert lines[0].split() == ["name", "family", "params", "min", "size", "default", "weights", "cached?"]
    row = next(line.split() for line in lines if line.startswith("resnet18 "))
    assert row == ["resnet18", "resnet", "11.7M", "1", "IMAGENET1K_V1", "no"]
    assert models_table("vgg16").splitlines()[2].split()[:3] == ["vgg16", "vgg", "138.4M"]
    assert models_table("lenet*").splitlines()[2].split() == ["lenet5", "lenet", "0.1M", "16", "-", "-"]
    assert [line.split()[0] for line in models_table(named_only=True).splitlines()[2:-1]] == NAMES


# ------------------------------------------------------------------------------------ torchvision weights path


def _seed_cache(arch: str, weights_name: str, **build_kw) -> tuple[Path, dict]:
    """Write a random state_dict where torch.hub looks first for `weights` (no download then, and hub checks
    hashes only while downloading: torch/hub.py load_state_dict_from_url)."""
    w = torchvision.models.get_model_weights(arch)[weights_name]
    sd = torchvision.models.get_model(arch, **build_kw).state_dict()
    path = cache_file(w)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path, sd


def test_torchvision_weights_from_offline_cache(torch_home):
    path, sd = _seed_cache("resnet18", "IMAGENET1K_V1")
    assert path == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert registry.weights_cached("resnet18") is True
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1", "imagenet1k_v1"):
        model = get_model("resnet18", 10, weights=name)
        assert torch.equal(model.layer3[1].conv2.weight, sd["layer3.1.conv2.weight"])
        assert model.fc.out_features == 10
    gray = get_model("resnet18", 10, in_channels=1, weights="DEFAULT")
    assert torch.allclose(gray.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    same = get_model("resnet18", 1000, weights="DEFAULT")  # 1000 classes: the pretrained head is kept
    assert torch.equal(same.fc.weight, sd["fc.weight"])


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_pretrained_inception_family_returns_tensor(torch_home, arch):
    _seed_cache(arch, "IMAGENET1K_V1", aux_logits=True, init_weights=False)  # torchvision's files have aux
    model = get_model(arch, 4, weights="DEFAULT").train()
    assert model.transform_input is False and model.aux_logits is False
    size = get_spec(arch).min_size
    out = model(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)


def test_torchvision_weights_errors(torch_home):
    with pytest.raises(UserError, match="resnet18-f37072fd.pth") as e:  # not cached, offline
        get_model("resnet18", 3, weights="IMAGENET1K_V1")
    assert str(torch_home / "hub" / "checkpoints") in str(e.value)
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        get_model("resnet18", 3, weights="IMAGENET9K")
    with pytest.raises(UserError, match="not for resnet18"):
        get_model("resnet18", 3, weights="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(UserError, match="no pretrained weights"):
        get_model("lenet5", 3, weights="DEFAULT")


class Payload:  # module-level so torch.save can pickle it; weights_only loading must refuse it
    pass


def test_tampered_cache_is_refused(torch_home):
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache_file(w).parent.mkdir(parents=True)
    torch.save({"conv1.weight": Payload()}, cache_file(w))
    with pytest.raises(UserError, match="non-tensor"):
        get_model("resnet18", 3, weights="DEFAULT")


# ------------------------------------------------------------------------------------------ checkpoint path


def test_model_file_with_other_num_classes(tmp_path):
    src = get_model("resnet18", 5)
    path = save_model_file(
        tmp_path / "run", model=src, arch="resnet18", classes=list("abcde"), in_channels=3,
        image_size=32, mean=[0.5] * 3, std=[0.5] * 3,
    )  # fmt: skip
    torch.manual_seed(1)
    model = get_model("resnet18", 7, weights=str(path))
    torch.manual_seed(1)
    fresh = get_model("resnet18", 7)
    assert torch.equal(model.fc.weight, fresh.fc.weight)  # head: kept fresh
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.state_dict()[k], v), k
    same = get_model("resnet18", 5, weights=tmp_path / "run")  # a checkpoint directory; same classes
    assert torch.equal(same.fc.weight, src.fc.weight)


def test_raw_state_dict_and_report(tmp_path):
    src = get_model("mobilenet_v3_small", 9)
    path = tmp_path / "raw.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)  # DDP-wrapped keys
    model = get_model("mobilenet_v3_small", 3)
    report = load_checkpoint(model, path, arch="mobilenet_v3_small", head="classifier.3", stem=stem_name(model))
    assert sorted(report.skipped_head) == ["classifier.3.bias", "classifier.3.weight"]
    assert "features.0.0.weight" in report.loaded and not report.adapted
    assert torch.equal(model.features[5].block[0][0].weight, src.features[5].block[0][0].weight)


def test_rgb_checkpoint_into_grayscale_model(tmp_path):
    src = get_model("resnet18", 7)
    torch.save(src.state_dict(), tmp_path / "rgb.pt")
    model = get_model("resnet18", 7, in_channels=1, weights=str(tmp_path / "rgb.pt"))
    assert torch.allclose(model.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.fc.weight, src.fc.weight)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # summed kernels: the gray net equals the RGB net on the replicated image
        torch.testing.assert_close(model.eval()(x), src.eval()(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "corrupt, key",
    [
        (lambda sd: sd.__setitem__("layer1.0.conv1.weight", torch.zeros(64, 64, 1, 1)), "layer1.0.conv1.weight"),
        (lambda sd: sd.__setitem__("layer5.weight", torch.zeros(3)), "layer5.weight"),
        (lambda sd: sd.pop("layer4.1.bn2.running_var"), "layer4.1.bn2.running_var"),
    ],
    ids=["shape", "unexpected", "missing"],
)
def test_bad_checkpoint_is_user_error(tmp_path, corrupt, key):
    sd = get_model("resnet18", 7).state_dict()
    corrupt(sd)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=key) as e:
        get_model("resnet18", 7, weights=str(tmp_path / "bad.pt"))
    assert "bad.pt" in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        get_model("resnet18", 3, weights=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load"):
        get_model("resnet18", 3, weights=str(tmp_path / "junk.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a model file"):
        get_model("resnet18", 3, weights=str(tmp_path / "list.pt"))
    torch.save(get_model("lenet5", 3).state_dict(), tmp_path / "lenet.pt")  # another architecture
    with pytest.raises(UserError, match="does not fit resnet18"):
        get_model("resnet18", 3, weights=str(tmp_path / "lenet.pt"))


def test_build_model_from_file_roundtrip(tmp_path):
    model = get_model("lenet5", 3, in_channels=1).eval()
    save_model_file(
        tmp_path, model=model, arch="lenet5", classes=["a", "b", "c"], in_channels=1, image_size=32,
        mean=[0.5], std=[0.5],
    )  # fmt: skip
    rebuilt, meta = build_model_from_file(tmp_path)
    x = torch.randn(2, 1, 32, 32)
    assert meta["arch"] == "lenet5" and torch.equal(rebuilt(x), model(x))


def test_argument_errors():
    with pytest.raises(UserError, match="in_channels"):
        get_model("resnet18", 3, in_channels=4)
    with pytest.raises(UserError, match="num_classes"):
        get_model("resnet18", 0)


# ------------------------------------------------------------------------------------------- all of torchvision


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if n not in NAMED])
def test_every_torchvision_model_on_meta(name):
    """Every extra builds (on 'meta'), forwards at its spec size, has a 7-way head and a 1-channel stem,
    and its stages give strictly ordered strategies."""
    spec = get_spec(name)
    model = meta_model(name, in_channels=1)
    size = spec.default_size if spec.fixed_size else max(spec.min_size, 2)
    assert model.eval()(torch.zeros(2, 1, size, size, device="meta")).shape == (2, 7)
    assert model.get_submodule(stem_name(model)).in_channels == 1
    counts = []
    for strategy in ("full", "freeze_early", "freeze_most", "feature_extraction"):
        apply_transfer(model, name, strategy)
        counts.append(count_trainable(model))
    assert counts[0] > counts[1] > counts[2] > counts[3] == head_params(model, name)
    assert [g["name"] for g in param_groups(model, name, 1.0, 0.1, 0.5)][0] == "head/decay"  # maxvit: no bias
