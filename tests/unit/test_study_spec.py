"""The study section -> units and trials, and every bad-input line, before any Ray work."""

import pytest

from imgcls_dist.config import build_config
from imgcls_dist.errors import UserError
from imgcls_dist.study.spec import trial_name, units_of, validate_study


def study_cfg(data_path, **study):
    return build_config({"data": {"path": str(data_path)}, "model": {"arch": "lenet5"},
                         "study": {"seeds": [0, 1], **study}})


def test_arms_cross_the_sweep_in_the_order_given(tiny_digits_dir):
    cfg = study_cfg(tiny_digits_dir, arms={"adam": {"train.optimizer": "adam"}, "sgd": {}},
                    sweep={"data.train_per_class": [5, 10, None]}, baseline="sgd")
    units = validate_study(cfg)
    assert [u.name for u in units] == ["adam@5", "adam@10", "adam@all", "sgd@5", "sgd@10", "sgd@all"]
    assert units[1].overrides == {"train.optimizer": "adam", "data.train_per_class": 10}
    assert units[2].sweep_value is None and units[3].overrides == {"data.train_per_class": 5}
    assert trial_name(units[0].name, 3) == "adam@5_s3"


def test_a_null_sweep_value_is_all_only_for_a_training_subset(tiny_digits_dir):
    units = units_of(study_cfg(tiny_digits_dir, arms={"a": {}}, sweep={"model.weights": [None, "x/m.pt"]}))
    assert [u.name for u in units] == ["a@null", "a@x_m.pt"]


def test_without_a_sweep_each_arm_is_one_unit(tiny_digits_dir):
    units = units_of(study_cfg(tiny_digits_dir, arms={"a": {}, "b": {"train.lr": 0.01}}))
    assert [(u.name, u.sweep_value, u.overrides) for u in units] == [("a", None, {}), ("b", None, {"train.lr": 0.01})]


@pytest.mark.parametrize("study, message", [
    ({"arms": {}}, "study.arms: no arms"),
    ({"arms": {"a": {"train.lrr": 0.1}}}, "study.arms.a.train.lrr: not a config key (did you mean train.lr?)"),
    ({"arms": {"a": {"lr": 0.1}}}, "study.arms.a: 'lr': keys are dotted config paths"),
    ({"arms": {"a": {"scaling.num_workers": 2}}}, "study.arms.a.scaling.num_workers: scaling.* settings size"),
    ({"arms": {"a": {"train.seed": 3}}}, "study.arms.a.train.seed: the study sets it from study.seeds"),
    ({"arms": {"a": {"train.lr": -1}}}, "study.arms.a: train.lr: Input should be greater than 0"),
    ({"arms": {"a": {}}, "baseline": "b"}, "study.baseline: 'b' is not an arm (arms: a)"),
    ({"arms": {"a": {}, "b": {}}, "baseline": "a", "seeds": [0]}, "study.seeds: a comparison with the baseline "
                                                                    "needs 2 or more seeds"),
    ({"arms": {"a": {}}, "seeds": []}, "study.seeds: no seeds"),
    ({"arms": {"a": {}}, "seeds": [1, 1]}, "study.seeds: [1, 1] repeats a seed"),
    ({"arms": {"a b": {}}}, "study.arms.a b: arm names may hold"),
    ({"arms": {"a": {}}, "sweep": {"data.train_per_class": [5], "train.lr": [0.1]}}, "study.sweep: one key at most"),
    ({"arms": {"a": {}}, "sweep": {"data.train_per_class": []}}, "study.sweep.data.train_per_class: no values"),
    ({"arms": {"a": {}}, "sweep": {"data.train_per_class": [5, 5]}},
     "study.sweep.data.train_per_class: values that name the same unit (a@5)"),
    ({"arms": {"a": {}}, "sweep": {"data.train_per_class": [5, 100000]}},
     "study.arms.a at data.train_per_class=100000: data.train_per_class: 100000 per class is more than any class"),
    ({"arms": {"a": {"model.arch": "resnet9000"}}}, "study.arms.a: "),
    ({"arms": {"a": {"model.weights": "runs/none/model.pt"}}},
     "study.arms.a: model.weights: weights checkpoint runs/none/model.pt does not exist"),
])
def test_bad_studies_fail_in_one_line_naming_the_key(tiny_digits_dir, study, message):
    with pytest.raises(UserError) as e:
        validate_study(study_cfg(tiny_digits_dir, **study))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_study_section_is_not_searchable_by_tune():
    from imgcls_dist.tune.space import check_key

    with pytest.raises(UserError, match="study.seeds: study.. settings are not searchable"):
        check_key("study.seeds")
