from pathlib import Path

import pytest
import yaml

from imgcls_dist.cli import main
from imgcls_dist.config import ExperimentConfig, load_config, parse_override, write_config
from imgcls_dist.errors import UserError

# serve.yaml is a Ray Serve config file (validated in tests/ray/test_serve.py), not an experiment config.
CONFIGS = sorted(p for p in (Path(__file__).parents[2] / "configs").glob("*.yaml") if p.name != "serve.yaml")


def _write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_defaults_and_overrides(tmp_path):
    p = _write(tmp_path, {"model": {"arch": "resnet18"}, "train": {"epochs": 3}})
    cfg = load_config(p, ["train.lr=0.01", "augment.strength=0.25", "train.progressive_resizing=[[0, 16], [2, 32]]",
                          "scaling.num_workers=2", "model.weights=null"])
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3
    assert cfg.augment.strength == 0.25
    assert cfg.train.progressive_resizing == [(0, 16), (2, 32)]
    assert cfg.scaling.num_workers == 2 and cfg.model.weights is None


@pytest.mark.parametrize(
    "data, overrides, expect",
    [
        ({"train": {"lrr": 0.1}}, [], "train.lrr: unknown key"),
        ({"trian": {}}, [], "trian: unknown key"),
        ({}, ["train.lr=-1"], "train.lr: Input should be greater than 0"),
        ({}, ["train.epochs=many"], "train.epochs: Input should be a valid integer"),
        ({}, ["augment.strength=1.5"], "augment.strength: Input should be less than or equal to 1"),
        ({}, ["train.scheduler=linear"], "train.scheduler: Input should be"),
        ({}, ["model.transfer=half"], "model.transfer: Input should be"),
        ({}, ["train.epochs=2", "train.warmup_epochs=2"], "train.warmup_epochs (2) must be < train.epochs (2)"),
        ({}, ["train.progressive_resizing=[[2, 16], [1, 32]]"], "train.progressive_resizing"),
        ({}, ["run.name=../x"], "run.name"),
        ({}, ["trainlr"], "expected KEY=VALUE"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, data, overrides, expect):
    p = _write(tmp_path, data)
    with pytest.raises(UserError) as e:
        load_config(p, overrides)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg


def test_yaml_is_never_executed(tmp_path):
    p = _write(tmp_path, "train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(p)


def test_override_values_are_parsed_as_yaml_not_code():
    assert parse_override("model.weights=__import__('os')") == (["model", "weights"], "__import__('os')")
    assert parse_override("train.nesterov=false") == (["train", "nesterov"], False)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "train.progressive_resizing=[[1, 24]]"])
    out = write_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(out)
    assert again == cfg
    assert isinstance(cfg.to_dict()["train"]["progressive_resizing"][0], list)  # plain types for checkpoints


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.run.name == path.stem


def test_cli_config_error_exits_2_without_traceback(tmp_path, capsys):
    p = _write(tmp_path, {"train": {"epochs": 0}})
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.epochs" in err[0] and "Traceback" not in err[0]
