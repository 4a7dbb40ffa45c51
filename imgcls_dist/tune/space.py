"""`tune.space` (plain YAML) -> a Ray Tune search space, validated against the experiment config.

Each entry maps a dotted config key to a distribution (`loguniform`, `uniform`, `choice`, `randint`), e.g.
`train.lr: {type: loguniform, lower: 1.0e-4, upper: 1.0e-1}`, for random or grid search. `validate_space`
checks every key and every value a distribution can produce before any Ray work; `to_tune_space` builds the
space. Format and rules: docs/design.md, "Search space".
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from imgcls_dist.config import ExperimentConfig, build_config
from imgcls_dist.errors import UserError
from imgcls_dist.storage import is_uri

TYPES = ("loguniform", "uniform", "choice", "randint")
_FIELDS = {
    "loguniform": ({"lower", "upper"}, {"grid", "num"}),
    "uniform": ({"lower", "upper"}, {"grid", "num"}),
    "randint": ({"lower", "upper"}, set()),
    "choice": ({"values"}, set()),
}
# These size, name and drive the campaign itself: searching them would break the resource sizing
# (trials * workers must fit the cluster) or the campaign layout.
NOT_SEARCHABLE = ("run", "scaling", "tune", "study")


def config_keys() -> list[str]:
    """Every dotted leaf key of ExperimentConfig (`train.lr`, `augment.strength`, ...)."""
    keys = []
    for sec, field in ExperimentConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            keys.extend(f"{sec}.{name}" for name in model.model_fields)
    return keys


def _err(key: str, msg: str) -> UserError:
    return UserError(f"tune.space.{key}: {msg}")


def check_key(key: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise _err(key, "keys are dotted config paths like train.lr or augment.strength")
    if parts[0] in NOT_SEARCHABLE:
        raise _err(key, f"{parts[0]}.* settings are not searchable (they size and name the campaign); "
                        "set them in the base config")
    valid = config_keys()
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise _err(key, f"not a config key{hint}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _coerce(v: Any) -> Any:
    """PyYAML reads `1e-4` (no dot) as a string; take numeric strings as the numbers they spell."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def check_entry(key: str, entry: Any) -> dict[str, Any]:
    """Shape of one distribution entry; returns it normalized (numbers as float/int)."""
    if not isinstance(entry, dict):
        raise _err(key, f"expected a mapping like {{type: loguniform, lower: 1e-4, upper: 1e-1}}, got {entry!r}")
    kind = entry.get("type")
    if kind not in TYPES:
        raise _err(key, f"type must be one of {', '.join(TYPES)} (got {kind!r})")
    required, optional = _FIELDS[kind]
    missing = sorted(required - entry.keys())
    if missing:
        raise _err(key, f"{kind} needs {', '.join(missing)}")
    extra = sorted(entry.keys() - required - optional - {"type"})
    if extra:
        raise _err(key, f"unknown field(s) {', '.join(extra)} for {kind} (allowed: {', '.join(sorted(required | optional))})")
    out = dict(entry)
    if kind == "choice":
        if not isinstance(entry["values"], list) or not entry["values"]:
            raise _err(key, "choice values must be a non-empty list")
        return out
    lo, hi = _coerce(entry["lower"]), _coerce(entry["upper"])
    if not (_is_number(lo) and _is_number(hi)):
        raise _err(key, f"{kind} lower/upper must be numbers (got {lo!r}, {hi!r})")
    if kind == "randint":
        if not (float(lo).is_integer() and float(hi).is_integer()):
            raise _err(key, f"randint lower/upper must be integers (got {lo!r}, {hi!r})")
        out["lower"], out["upper"] = int(lo), int(hi)
        if out["upper"] <= out["lower"]:
            raise _err(key, f"randint needs lower < upper (upper is exclusive; got {lo}, {hi})")
        return out
    if not lo < hi:
        raise _err(key, f"{kind} needs lower < upper (got {lo}, {hi})")
    if kind == "loguniform" and lo <= 0:
        raise _err(key, f"loguniform needs lower > 0 (got {lo})")
    out["lower"], out["upper"] = float(lo), float(hi)
    if "grid" in entry:
        g = [_coerce(x) for x in entry["grid"]] if isinstance(entry["grid"], list) else entry["grid"]
        if not isinstance(g, list) or not g or not all(_is_number(x) for x in g):
            raise _err(key, "grid must be a non-empty list of numbers")
        out["grid"] = g
        if any(x < lo or x > hi for x in g):
            raise _err(key, f"grid values must lie in [{lo}, {hi}]")
    if "num" in entry and not (isinstance(entry["num"], int) and not isinstance(entry["num"], bool)
                               and entry["num"] >= 1):
        raise _err(key, f"num must be an integer >= 1 (got {entry['num']!r})")
    return out


def grid_values(key: str, entry: dict[str, Any]) -> list[Any]:
    kind = entry["type"]
    if kind == "choice":
        return list(entry["values"])
    if kind == "randint":
        return list(range(entry["lower"], entry["upper"]))
    if "grid" in entry:
        return [float(x) for x in entry["grid"]]
    if "num" not in entry:
        raise _err(key, f"grid search needs 'grid: [...]' or 'num: N' for a {kind} range")
    n, lo, hi = entry["num"], entry["lower"], entry["upper"]
    if n == 1:
        return [math.sqrt(lo * hi) if kind == "loguniform" else (lo + hi) / 2]
    if kind == "loguniform":
        a, b = math.log(lo), math.log(hi)
        return [float(math.exp(a + (b - a) * i / (n - 1))) for i in range(n)]
    return [float(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def probe_values(key: str, entry: dict[str, Any], search: str) -> list[Any]:
    """Values worth validating: every value a grid/choice can take; both ends and the middle of a range."""
    kind = entry["type"]
    if search == "grid" or kind == "choice":
        return grid_values(key, entry)
    lo, hi = entry["lower"], entry["upper"]
    if kind == "randint":
        return sorted({lo, (lo + hi - 1) // 2, hi - 1})
    mid = math.sqrt(lo * hi) if kind == "loguniform" else (lo + hi) / 2
    # A non-integer middle makes an int field (train.epochs: uniform) fail here, not in trial 5.
    if float(mid).is_integer():
        mid += (hi - lo) * 1e-3
    return [lo, mid, hi]


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[parts[-1]] = value


def get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for p in key.split("."):
        node = node[p]
    return node


def plain(v: Any) -> Any:
    """numpy scalars (what Tune samples) -> Python scalars, so YAML/JSON/pydantic take them."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            return v.item()
        except (TypeError, ValueError):
            return v
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def apply_sampled(base: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    for key, value in sampled.items():
        set_dotted(raw, key, plain(value))
    return raw


def _first_error(err: ValidationError, key: str) -> str:
    want = tuple(key.split("."))
    errors = err.errors()
    mine = [e for e in errors if tuple(str(x) for x in e["loc"][:2]) == want] or errors
    e = mine[0]
    loc = ".".join(str(x) for x in e["loc"]) or "config"
    return f"{loc}: {e['msg']}"


def validate_space(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Check every key and every value the space can produce; returns the normalized entries."""
    base = cfg.to_dict()
    entries: dict[str, dict[str, Any]] = {}
    for key, entry in cfg.tune.space.items():
        check_key(key)
        entries[key] = e = check_entry(key, entry)
        for v in probe_values(key, e, cfg.tune.search):
            try:
                ExperimentConfig.model_validate(apply_sampled(base, {key: v}))
            except ValidationError as ve:
                raise _err(key, f"value {v!r} is not valid for the base config ({_first_error(ve, key)})") from None
    return entries


def candidate_values(cfg: ExperimentConfig, key: str) -> list[Any]:
    """Values of `key` worth checking against the dataset/registry (e.g. every model.arch choice)."""
    e = check_entry(key, cfg.tune.space[key])
    return probe_values(key, e, cfg.tune.search)


def to_tune_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """The param_space for ray.tune.Tuner: {dotted key: tune distribution or grid_search}."""
    from ray import tune

    entries = validate_space(cfg)
    space: dict[str, Any] = {}
    for key, e in entries.items():
        kind = e["type"]
        if cfg.tune.search == "grid":
            space[key] = tune.grid_search(grid_values(key, e))
        elif kind == "loguniform":
            space[key] = tune.loguniform(e["lower"], e["upper"])
        elif kind == "uniform":
            space[key] = tune.uniform(e["lower"], e["upper"])
        elif kind == "randint":
            space[key] = tune.randint(e["lower"], e["upper"])
        else:
            space[key] = tune.choice(e["values"])
    return space


def num_trials(cfg: ExperimentConfig) -> int:
    """Trials the campaign will run: num_samples (random) or the grid's size (grid, once)."""
    if cfg.tune.search == "random":
        return cfg.tune.num_samples
    entries = {k: check_entry(k, e) for k, e in cfg.tune.space.items()}
    return math.prod(len(grid_values(k, e)) for k, e in entries.items()) if entries else 1


def absolutize_paths(raw: dict[str, Any], cwd: str | Path) -> dict[str, Any]:
    """Relative data/weights paths -> absolute: Tune runs each trial in its own working directory."""
    data = raw.get("data") or {}
    if isinstance(data.get("path"), str) and not is_uri(data["path"]) and not Path(data["path"]).is_absolute():
        data["path"] = str((Path(cwd) / data["path"]).resolve())
    model = raw.get("model") or {}
    w = model.get("weights")
    if isinstance(w, str) and not is_uri(w) and not Path(w).expanduser().is_absolute() and (Path(cwd) / w).exists():
        model["weights"] = str((Path(cwd) / w).resolve())  # a local checkpoint (torchvision names stay names)
    return raw


def trial_config(base: dict[str, Any], sampled: dict[str, Any], name: str, trials_dir: str,
                 cwd: str | None = None) -> ExperimentConfig:
    raw = apply_sampled(base, sampled)
    if cwd:
        absolutize_paths(raw, cwd)
    raw["run"] = {**raw.get("run", {}), "name": name, "storage_path": trials_dir}
    return build_config(raw, source=f"trial {name}")
