"""Fast unit tests: tune.space -> Ray Tune space, validation errors, resource sizing, results helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgcls_dist.cli import main
from imgcls_dist.config import load_config
from imgcls_dist.errors import UserError
from imgcls_dist.tune import results as R
from imgcls_dist.tune.campaign import asha_rungs, plan_resources
from imgcls_dist.tune.space import trial_config
from imgcls_dist.tune.space import (apply_sampled, grid_values, num_trials, probe_values, to_tune_space,
                                    validate_space)

ROOT = Path(__file__).parents[2]


def _noop_trainable(config):
    pass


def cfg_with(space, *extra):
    return load_config(None, [f"tune.space={json.dumps(space)}", "model.arch=lenet5", *extra])


def test_random_space_converts_to_tune_domains_and_is_seeded():
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space = {"train.lr": {"type": "loguniform", "lower": 1e-4, "upper": 1e-1},
             "augment.strength": {"type": "uniform", "lower": 0.0, "upper": 1.0},
             "train.scheduler": {"type": "choice", "values": ["step", "cosine"]},
             "train.warmup_epochs": {"type": "randint", "lower": 0, "upper": 3}}
    cfg = cfg_with(space, "tune.num_samples=6", "tune.seed=7")
    ts = to_tune_space(cfg)
    assert isinstance(ts["train.lr"], tune.search.sample.Float) and ts["train.lr"].lower == 1e-4
    assert isinstance(ts["train.lr"].sampler, tune.search.sample.LogUniform)
    assert isinstance(ts["augment.strength"].sampler, tune.search.sample.Uniform)
    assert ts["train.scheduler"].categories == ["step", "cosine"]
    assert isinstance(ts["train.warmup_epochs"], tune.search.sample.Integer) and ts["train.warmup_epochs"].upper == 3
    assert num_trials(cfg) == 6

    def sample(seed):
        gen = BasicVariantGenerator(random_state=seed)
        gen.add_configurations({"x": {"run": _noop_trainable, "config": to_tune_space(cfg), "num_samples": 6}})
        out = []
        while (t := gen.next_trial()) is not None:
            out.append({k: t.config[k] for k in space})
        return out

    a, b, c = sample(7), sample(7), sample(8)
    assert len(a) == 6 and a == b and a != c
    for s in a:
        assert 1e-4 <= s["train.lr"] <= 1e-1 and 0 <= s["augment.strength"] <= 1
        assert s["train.warmup_epochs"] in (0, 1, 2) and s["train.scheduler"] in ("step", "cosine")
        trial = trial_config(cfg.to_dict(), s, "trial_00000", "/tmp/x")  # every sample is a valid config
        assert trial.train.lr == pytest.approx(s["train.lr"]) and trial.run.name == "trial_00000"


def test_grid_space_is_the_cartesian_product():
    from ray import tune

    space = {"train.lr": {"type": "loguniform", "lower": 1e-3, "upper": 1e-1, "num": 3},
             "augment.strength": {"type": "uniform", "lower": 0.0, "upper": 1.0, "grid": [0.2, 0.8]},
             "train.scheduler": {"type": "choice", "values": ["step", "cosine"]},
             "train.warmup_epochs": {"type": "randint", "lower": 0, "upper": 2}}
    cfg = cfg_with(space, "tune.search=grid")
    ts = to_tune_space(cfg)
    assert ts["train.lr"] == tune.grid_search(pytest.approx([1e-3, 1e-2, 1e-1]))
    assert ts["augment.strength"] == tune.grid_search([0.2, 0.8])
    assert ts["train.warmup_epochs"] == tune.grid_search([0, 1])
    assert num_trials(cfg) == 3 * 2 * 2 * 2
    assert grid_values("x", {"type": "uniform", "lower": 0.0, "upper": 1.0, "num": 5}) == [0, 0.25, 0.5, 0.75, 1]


@pytest.mark.parametrize("space, extra, match", [
    ({"train.lrr": {"type": "uniform", "lower": 0, "upper": 1}}, [], r"tune.space.train.lrr: not a config key \(did you mean train.lr\?\)"),
    ({"trian.lr": {"type": "uniform", "lower": 0, "upper": 1}}, [], "tune.space.trian.lr: not a config key"),
    ({"lr": {"type": "uniform", "lower": 0, "upper": 1}}, [], "tune.space.lr: keys are dotted config paths"),
    ({"scaling.num_workers": {"type": "choice", "values": [1, 2]}}, [], "tune.space.scaling.num_workers: scaling.* settings are not searchable"),
    ({"train.lr": {"type": "normal", "lower": 0, "upper": 1}}, [], "tune.space.train.lr: type must be one of"),
    ({"train.lr": {"type": "loguniform", "lower": 0.1}}, [], "tune.space.train.lr: loguniform needs upper"),
    ({"train.lr": {"type": "loguniform", "lower": 0.0, "upper": 0.1}}, [], "loguniform needs lower > 0"),
    ({"train.lr": {"type": "uniform", "lower": 0.5, "upper": 0.1}}, [], "uniform needs lower < upper"),
    ({"train.lr": {"type": "uniform", "lower": "a", "upper": 0.1}}, [], "lower/upper must be numbers"),
    ({"train.lr": {"type": "uniform", "lower": 0.01, "upper": 0.1, "step": 2}}, [], r"unknown field\(s\) step"),
    ({"train.scheduler": {"type": "choice", "values": []}}, [], "choice values must be a non-empty list"),
    ({"train.warmup_epochs": {"type": "randint", "lower": 0.5, "upper": 3}}, [], "randint lower/upper must be integers"),
    # values that the distribution can produce but the config rejects
    ({"train.lr": {"type": "loguniform", "lower": 1e-3, "upper": 20}}, [],
     r"tune.space.train.lr: value 20.0 is not valid for the base config \(train.lr: Input should be less than or equal to 10"),
    ({"train.scheduler": {"type": "choice", "values": ["cosine", "linear"]}}, [],
     "tune.space.train.scheduler: value 'linear' is not valid"),
    ({"augment.strength": {"type": "uniform", "lower": 0.0, "upper": 1.5}}, [], "tune.space.augment.strength: value 1.5"),
    ({"train.epochs": {"type": "uniform", "lower": 2, "upper": 6}}, [], "tune.space.train.epochs: value 4.004 is not valid"),
    ({"train.warmup_epochs": {"type": "randint", "lower": 0, "upper": 4}}, ["train.epochs=3"],
     r"tune.space.train.warmup_epochs: value 3 is not valid.*must be < train.epochs"),
    ({"train.lr": {"type": "uniform", "lower": 0.01, "upper": 0.1}}, ["tune.search=grid"],
     "tune.space.train.lr: grid search needs 'grid: \\[...\\]' or 'num: N'"),
    ({"train.lr": {"type": "uniform", "lower": 0.01, "upper": 0.1, "grid": [0.5]}}, [], r"grid values must lie in"),
])
def test_space_errors_name_the_key(space, extra, match):
    with pytest.raises(UserError, match=match):
        validate_space(cfg_with(space, *extra))


def test_yaml_exponent_strings_are_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {arch: lenet5}\ntune:\n  space:\n    train.lr: {type: loguniform, lower: 1e-4, upper: 1e-1}\n")
    cfg = load_config(p)
    assert cfg.tune.space["train.lr"]["lower"] == "1e-4"  # PyYAML's YAML 1.1 reading
    assert validate_space(cfg)["train.lr"]["lower"] == 1e-4
    assert to_tune_space(cfg)["train.lr"].lower == 1e-4


def test_probe_values_cover_ends_and_middle():
    assert probe_values("k", {"type": "randint", "lower": 0, "upper": 5}, "random") == [0, 2, 4]
    lo, mid, hi = probe_values("k", {"type": "loguniform", "lower": 1e-4, "upper": 1e-2}, "random")
    assert (lo, hi) == (1e-4, 1e-2) and mid == pytest.approx(1e-3)


def test_bad_space_is_a_one_line_cli_error_before_ray(tmp_path, capsys):
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"arch": "lenet5"}, "run": {"storage_path": str(tmp_path)},
                                 "tune": {"space": {"train.lrr": {"type": "loguniform", "lower": 1e-4, "upper": 1}}}}))
    assert main(["tune", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tune.space.train.lrr" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()


def test_existing_campaign_needs_resume_and_resume_needs_a_campaign(tmp_path, capsys):
    from imgcls_dist.tune.campaign import run_campaign

    cfg = load_config(None, ["model.arch=lenet5", f"run.storage_path={tmp_path}", "run.name=c1"])
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match="already exists: pass --resume .* or pick another run.name"):
        run_campaign(cfg)
    cfg2 = load_config(None, ["model.arch=lenet5", f"run.storage_path={tmp_path}", "run.name=nothing"])
    with pytest.raises(UserError, match="--resume: no campaign at"):
        run_campaign(cfg2, resume=True)


@pytest.mark.parametrize("cpus, gpus, overrides, want", [
    (2, 0, [], {"workers_per_trial": 1, "concurrency": 2, "use_gpu": False}),  # null workers -> 1 per trial
    (2, 0, ["scaling.num_workers=2"], {"workers_per_trial": 2, "concurrency": 1}),
    (2, 0, ["tune.max_concurrent=1"], {"concurrency": 1}),
    (8, 0, ["scaling.cpus_per_worker=3"], {"concurrency": 2}),
    (16, 4, ["scaling.num_workers=2"], {"concurrency": 2, "use_gpu": True}),  # GPUs are the limit
    (2, 0, ["tune.num_samples=1"], {"concurrency": 1}),
])
def test_concurrency_never_oversubscribes(cpus, gpus, overrides, want):
    cfg = load_config(None, ["model.arch=lenet5", *overrides])
    plan = plan_resources(cfg, cfg.tune.num_samples, cpus, gpus)
    for k, v in want.items():
        assert plan[k] == v, (k, plan)
    assert plan["concurrency"] * plan["cpus_per_trial"] <= cpus


def test_a_trial_larger_than_the_cluster_is_refused():
    cfg = load_config(None, ["model.arch=lenet5", "scaling.num_workers=3"])
    with pytest.raises(UserError, match="needs 3 worker.*cluster has 2"):
        plan_resources(cfg, 4, 2, 0)


def test_asha_rungs():
    assert asha_rungs(load_config(None, ["train.epochs=10", "tune.grace_period=1", "tune.reduction_factor=2"])) == [1, 2, 4, 8]
    assert asha_rungs(load_config(None, ["train.epochs=3", "tune.grace_period=1", "tune.reduction_factor=3"])) == [1]


def test_best_config_is_a_complete_standalone_training_config(tmp_path):
    cfg = cfg_with({"train.lr": {"type": "loguniform", "lower": 1e-4, "upper": 1e-1}}, "run.name=camp")
    row = {"trial": "trial_00002", "train.lr": 0.0123, "best_val_acc": 0.97, "best_epoch": 3, "epochs_run": 4}
    best = R.best_config(cfg.to_dict(), row, ["train.lr"], name="camp_best", storage_path="runs", num_workers=1)
    p = R.write_best_yaml(best, row, tmp_path / "best.yaml")
    again = load_config(p)
    assert again.train.lr == 0.0123 and again.run.name == "camp_best" and again.tune.space == {}
    assert again.scaling.num_workers == 1 and again.model.arch == "lenet5"


def test_shipped_tune_configs_are_valid_campaigns():
    for name in ("tune_digits", "tune_digits_tiny"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        entries = validate_space(cfg)
        assert cfg.run.name == name and entries
    full = load_config(ROOT / "configs/tune_digits.yaml")
    assert num_trials(full) >= 8
    for key in ("train.lr", "train.scheduler", "train.warmup_epochs", "augment.preset", "augment.strength",
                "augment.mixup_alpha", "augment.cutmix_alpha", "train.weight_decay"):
        assert key in full.tune.space, key
    assert set(full.tune.space["train.scheduler"]["values"]) == {"step", "cosine", "cosine_warm_restarts", "plateau"}
    assert full.tune.space["train.lr"]["type"] == "loguniform"


def test_apply_sampled_converts_numpy_scalars():
    import numpy as np

    raw = apply_sampled({"train": {"lr": 0.1}}, {"train.lr": np.float64(0.5), "train.warmup_epochs": np.int64(2)})
    assert raw == {"train": {"lr": 0.5, "warmup_epochs": 2}}
    assert type(raw["train"]["lr"]) is float and type(raw["train"]["warmup_epochs"]) is int


def test_trial_paths_are_absolute_because_tune_changes_the_working_directory(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"x")
    base = load_config(None, ["model.arch=lenet5", "data.path=data/digits", "model.weights=ckpt/model.pt"]).to_dict()
    cfg = trial_config(base, {"train.lr": 0.01}, "trial_00001", str(tmp_path / "trials"), cwd=str(tmp_path))
    assert cfg.data.path == str(tmp_path / "data" / "digits")
    assert cfg.model.weights == str(tmp_path / "ckpt" / "model.pt")
    assert cfg.run.storage_path == str(tmp_path / "trials") and cfg.train.lr == 0.01
    named = load_config(None, ["model.arch=resnet18", "model.weights=IMAGENET1K_V1", "data.path=s3://b/d"]).to_dict()
    cfg = trial_config(named, {}, "trial_00002", "/x", cwd=str(tmp_path))
    assert cfg.model.weights == "IMAGENET1K_V1" and cfg.data.path == "s3://b/d"  # names and URIs untouched


def test_asha_saving_compares_the_same_search_both_ways(monkeypatch, capsys):
    import imgcls_dist.tune.campaign as campaign
    from benchmarks.tune_bench import measure_asha_saving

    calls = []

    def fake_run(cfg, *, early_stopping=True, resume=False):
        calls.append((cfg.run.name, early_stopping))
        rows = [{"train.lr": lr} for lr in (0.1, 0.01, 0.001)]
        return {"campaign_dir": cfg.run.name, "num_trials": 3, "trial_epochs": 12 if early_stopping else 30,
                "stopped_early": 2 if early_stopping else 0, "errored": 0, "best_val_acc": 0.98 if early_stopping else 0.985,
                "best_trial": "trial_00000", "wall_s": 50.0 if early_stopping else 100.0, "rows": rows}

    monkeypatch.setattr(campaign, "run_campaign", fake_run)
    cfg = cfg_with({"train.lr": {"type": "loguniform", "lower": 1e-4, "upper": 1e-1}}, "run.name=c")
    r = measure_asha_saving(cfg)
    assert calls == [("c_asha", True), ("c_fifo", False)]
    assert r["epoch_ratio"] == pytest.approx(0.4) and r["wall_ratio"] == pytest.approx(0.5)
    assert r["best_val_acc_delta"] == pytest.approx(-0.005) and r["same_configs"] is True
    out = capsys.readouterr().out
    assert "ASHA / FIFO: 0.40x the trial-epochs (60% saved)" in out and "FIFO" in out
