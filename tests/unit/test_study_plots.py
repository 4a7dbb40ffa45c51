"""Study plots from synthetic trials: the right files are written, they are PNGs, and a plot with nothing to draw
writes nothing."""

from __future__ import annotations

import pytest

from imgcls_dist.study.metrics import METRICS
from imgcls_dist.study.plots import (
    plot_accuracy_vs_size, plot_efficiency, plot_lr_schedules, plot_pareto, plot_train_vs_test, plot_val_curves,
    write_plots,
)
from imgcls_dist.study.stats import mean_ci, pareto_front
from imgcls_dist.storage import location

PNG = b"\x89PNG"
ALL_FILES = {"lr_schedules.png", "val_curves.png", "train_vs_test.png", "accuracy_vs_train_size.png",
             "efficiency.png", "pareto.png"}


def _row(arm: str, size: int | None, seed: int, k: int) -> dict:
    unit = f"{arm}@{size if size is not None else 'all'}"
    quality = 0.6 + 0.1 * k + 0.01 * seed
    row = {m.key: None for m in METRICS}
    row.update(trial=f"{unit}-s{seed}", unit=unit, arm=arm, sweep_value=size, seed=seed, status="TERMINATED",
               test_acc=quality, train_clean_acc=quality + 0.05, best_val_acc=quality, params=1e6 * (k + 1),
               wall_s=30.0 + 5 * k + seed, latency_p50_ms=2.0 + k, model_mb=4.0 * (k + 1),
               val_curve=[quality * e / 4 for e in range(1, 5)],
               lr_curve=[0.1 * 0.5 ** (s // 10) for s in range(40)])
    return row


@pytest.fixture
def rows() -> list[dict]:
    out = []
    for i, arm in enumerate(("baseline", "wide")):
        for j, size in enumerate((100, 1000)):
            for seed in (0, 1):
                out.append(_row(arm, size, seed, i + j))
    return out


def _units(rows: list[dict]) -> list[dict]:
    units: dict[str, dict] = {}
    for r in rows:
        units.setdefault(r["unit"], {"unit": r["unit"], "arm": r["arm"], "sweep_value": r["sweep_value"], "rs": []})
        units[r["unit"]]["rs"].append(r)
    for u in units.values():
        rs = u.pop("rs")
        u["stats"] = {m.key: mean_ci([r[m.key] for r in rs]) for m in METRICS}
    return list(units.values())


def _is_png(loc) -> bool:
    data = location(loc).read_bytes()
    return len(data) > 100 and data.startswith(PNG)


def test_write_plots_writes_every_plot(rows, tmp_path):
    units = _units(rows)
    lat = [(u["unit"], u["stats"]["latency_p50_ms"].mean, u["stats"]["test_acc"].mean) for u in units]
    size = [(u["unit"], u["stats"]["model_mb"].mean, u["stats"]["test_acc"].mean) for u in units]
    written = write_plots(rows, units, sweep_key="data.train_rows",
                          constraints={"max_latency_ms": 3.5, "max_model_mb": None, "min_test_acc": 0.65},
                          meets={"wide@100"}, front_latency=pareto_front(lat), front_size=pareto_front(size),
                          out_dir=tmp_path / "plots")
    assert {w.name for w in written} == ALL_FILES
    assert {p.name for p in (tmp_path / "plots").iterdir()} == ALL_FILES
    assert all(_is_png(w) for w in written)


def test_no_sweep_key_skips_the_size_plot(rows, tmp_path):
    written = write_plots(rows, _units(rows), sweep_key=None, constraints={}, meets=set(), front_latency=[],
                          front_size=[], out_dir=tmp_path)
    assert {w.name for w in written} == ALL_FILES - {"accuracy_vs_train_size.png"}
    assert not (tmp_path / "accuracy_vs_train_size.png").exists()


def test_full_training_set_sits_at_the_right_end(rows, tmp_path):
    rows = rows + [_row("baseline", None, seed, 3) for seed in (0, 1)]
    out = plot_accuracy_vs_size(_units(rows), "data.train_rows", tmp_path / "size.png")
    assert out is not None and _is_png(out)


def test_size_plot_needs_a_numeric_sweep(rows, tmp_path):
    units = _units(rows)
    for u in units:
        u["sweep_value"] = "resnet18"
    assert plot_accuracy_vs_size(units, "model.name", tmp_path / "size.png") is None
    assert not (tmp_path / "size.png").exists()


def test_single_seed_units_still_plot(rows, tmp_path):
    one_seed = [r for r in rows if r["seed"] == 0]
    units = _units(one_seed)
    assert units[0]["stats"]["test_acc"].lo is None
    written = write_plots(one_seed, units, sweep_key="data.train_rows", constraints={"min_test_acc": 0.7},
                          meets=set(), front_latency=[units[0]["unit"]], front_size=[], out_dir=tmp_path)
    assert len(written) == 6 and all(_is_png(w) for w in written)


def test_nothing_to_draw_writes_nothing(rows, tmp_path):
    out = tmp_path / "x.png"
    no_curves = [dict(r, lr_curve=[], val_curve=[]) for r in rows]
    assert plot_lr_schedules(no_curves, out) is None
    assert plot_val_curves(no_curves, out) is None
    assert plot_lr_schedules([], out) is None
    assert plot_train_vs_test([], out) is None
    assert plot_efficiency([], out) is None
    assert plot_pareto([], {}, set(), [], [], out) is None
    assert plot_accuracy_vs_size([], "data.train_rows", out) is None
    assert write_plots([], [], sweep_key="data.train_rows", constraints={}, meets=set(), front_latency=[],
                       front_size=[], out_dir=tmp_path) == []
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failed_trials_without_metrics_are_left_out(rows, tmp_path):
    units = _units(rows)
    for u in units:
        u["stats"] = {k: mean_ci([None]) for k in u["stats"]}
    assert plot_train_vs_test(units, tmp_path / "a.png") is None
    assert plot_efficiency(units, tmp_path / "b.png") is None
    assert plot_pareto(units, {}, set(), [], [], tmp_path / "c.png") is None


def test_val_curves_with_unequal_lengths(rows, tmp_path):
    rows[0]["val_curve"] = rows[0]["val_curve"][:2]
    rows[1]["status"] = "ERROR"
    out = plot_val_curves(rows, tmp_path / "val.png")
    assert out is not None and _is_png(out)
