"""Several --config files, each merged over the ones before it (a recipe, then a study of its arms)."""

import pytest

from imgcls_dist.cli import build_parser
from imgcls_dist.config import load_config, merge_raw
from imgcls_dist.errors import UserError


def test_later_files_win_key_by_key_at_every_depth(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train: {epochs: 30, lr: 0.003, optimizer: adamw}\naugment: {preset: strong}\n")
    study = tmp_path / "study.yaml"
    study.write_text("train: {epochs: 5}\nstudy: {arms: {a: {}, b: {train.lr: 0.01}}}\n")
    cfg = load_config([recipe, study], ["train.seed=3"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.optimizer, cfg.train.seed) == (5, 0.003, "adamw", 3)
    assert cfg.augment.preset == "strong" and set(cfg.study.arms) == {"a", "b"}
    assert merge_raw({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}, "d": 0}) == {"a": {"b": 1, "c": [2]}, "d": 0}


def test_the_cli_takes_repeated_configs_and_names_them_in_errors(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train: {epochs: 3}\n")
    b.write_text("train: {epoch: 4}\n")
    args = build_parser().parse_args(["study", "--config", str(a), "--config", str(b)])
    assert args.config == [str(a), str(b)]
    with pytest.raises(UserError, match=r"a.yaml \+ .*b.yaml: invalid config: train.epoch: unknown key"):
        load_config(args.config)
