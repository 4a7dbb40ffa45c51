"""The `study` section -> the units it compares (arm x sweep value) and their trials (unit x seed), checked
before any Ray work: every arm key is a config key, every unit's config is valid, every subset fits the data.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from imgcls_dist.config import ExperimentConfig
from imgcls_dist.errors import UserError
from imgcls_dist.tune.space import NOT_SEARCHABLE, apply_sampled, config_keys, plain

# The study sets these from its seeds: an arm or a sweep that set them would break the pairing by seed.
SEED_KEYS = ("train.seed", "data.subset_seed")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@=+-]")


@dataclass(frozen=True)
class Unit:
    """One thing the study measures over seeds: an arm, at one value of the sweep (if any)."""

    name: str
    arm: str
    sweep_value: Any
    overrides: dict[str, Any]


# A null training-subset setting means the whole split: its unit is `<arm>@all`.
SUBSET_KEYS = ("data.train_per_class", "data.train_fraction", "data.max_train_samples")


def value_label(v: Any, key: str) -> str:
    if v is None:
        return "all" if key in SUBSET_KEYS else "null"
    return str(plain(v))


def _safe(name: str) -> str:
    """A name usable as a directory on every filesystem and as an object-store key."""
    return _UNSAFE.sub("_", name)


def trial_name(unit: str, seed: int) -> str:
    """`pretrained@10_s1`: the unit and the seed; names the trial's directory and its Train run."""
    return _safe(f"{unit}_s{seed}")


def tune_trial_name(trial) -> str:
    """Tune's trial_name_creator for a study (a module-level function: Tune pickles it with its state)."""
    return trial_name(trial.config["unit"], trial.config["seed"])


def _check_key(where: str, key: Any) -> None:
    if not isinstance(key, str) or key.count(".") != 1:
        raise UserError(f"{where}: {key!r}: keys are dotted config paths like model.arch or train.lr")
    if key.split(".")[0] in NOT_SEARCHABLE:
        raise UserError(f"{where}.{key}: {key.split('.')[0]}.* settings size and name the study itself; "
                        "set them in the base config")
    if key in SEED_KEYS:
        raise UserError(f"{where}.{key}: the study sets it from study.seeds (each trial's seed)")
    valid = config_keys()
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=1)
        raise UserError(f"{where}.{key}: not a config key{f' (did you mean {close[0]}?)' if close else ''}")


def units_of(cfg: ExperimentConfig) -> list[Unit]:
    """Every unit, arms in the order given, each over the sweep's values in the order given."""
    s = cfg.study
    if not s.arms:
        raise UserError("study.arms: no arms: give at least one, e.g. arms: {baseline: {}, "
                        "wider: {data.image_size: 64}}")
    if len(s.sweep) > 1:
        raise UserError(f"study.sweep: one key at most (got {', '.join(s.sweep)}); make the others arms")
    for arm, overrides in s.arms.items():
        if _UNSAFE.search(arm) or not arm:
            raise UserError(f"study.arms.{arm}: arm names may hold letters, digits and _.@=+- only")
        if not isinstance(overrides, dict):
            raise UserError(f"study.arms.{arm}: expected a mapping of dotted keys to values, got {overrides!r}")
        for key in overrides:
            _check_key(f"study.arms.{arm}", key)
    sweep = [(k, v) for k, vs in s.sweep.items() for v in vs] if s.sweep else []
    for key, values in s.sweep.items():
        _check_key("study.sweep", key)
        if not values:
            raise UserError(f"study.sweep.{key}: no values")
    if not sweep:
        return [Unit(arm, arm, None, dict(o)) for arm, o in s.arms.items()]
    units = [Unit(_safe(f"{arm}@{value_label(v, k)}"), arm, plain(v), {**o, k: v})
             for arm, o in s.arms.items() for k, v in sweep]
    names = [u.name for u in units]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"study.sweep.{sweep[0][0]}: values that name the same unit ({', '.join(twice)}): "
                        "give each value once")
    return units


def sweep_key(cfg: ExperimentConfig) -> str | None:
    return next(iter(cfg.study.sweep), None)


def check_seeds(cfg: ExperimentConfig) -> None:
    s = cfg.study
    if not s.seeds:
        raise UserError("study.seeds: no seeds: give at least one (2 give an interval, 3 or more a useful one)")
    if len(set(s.seeds)) != len(s.seeds):
        raise UserError(f"study.seeds: {s.seeds} repeats a seed")
    if s.baseline is not None:
        if s.baseline not in s.arms:
            raise UserError(f"study.baseline: {s.baseline!r} is not an arm (arms: {', '.join(s.arms)})")
        if len(s.seeds) < 2:
            raise UserError(f"study.seeds: a comparison with the baseline needs 2 or more seeds (got {s.seeds})")


def unit_overrides(unit: Unit, seed: int) -> dict[str, Any]:
    """What a trial of `unit` at `seed` sets on the base config: the seed also draws the training subset."""
    return {**unit.overrides, "train.seed": seed, "data.subset_seed": None}


def unit_config(base: dict[str, Any], unit: Unit, seed: int, source: str) -> ExperimentConfig:
    """The unit's config for one seed (before the trial names its run)."""
    from imgcls_dist.config import build_config

    return build_config(apply_sampled(base, unit_overrides(unit, seed)), source=source)


def validate_study(cfg: ExperimentConfig) -> list[Unit]:
    """Every check that needs no Ray: the units, the seeds, each unit's config and its dataset/subset."""
    from imgcls_dist.train.job import resolve_dataset

    units = units_of(cfg)
    check_seeds(cfg)
    base = cfg.to_dict()
    for unit in units:
        where = f"study.arms.{unit.arm}"
        if cfg.study.sweep:
            where += f" at {sweep_key(cfg)}={value_label(unit.sweep_value, sweep_key(cfg))}"
        try:
            ExperimentConfig.model_validate(apply_sampled(base, unit.overrides))
        except ValidationError as e:
            first = e.errors()[0]
            raise UserError(f"{where}: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
        try:
            resolve_dataset(unit_config(base, unit, cfg.study.seeds[0], source=where))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return units
