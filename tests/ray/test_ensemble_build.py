"""ensemble build: temperature scaling, greedy member and view selection on validation data, the manifest
it writes, and that inference applies its temperatures, weights and views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.model_files import save_model, train_digits_model

from imgcls_dist.cli import main as cli_main
from imgcls_dist.data.schema import split_files
from imgcls_dist.ensemble.build import build_ensemble
from imgcls_dist.ensemble.calibrate import MIN_ERRORS_TO_SHARPEN, choose_temperature, fit_temperature, softmax
from imgcls_dist.predictor.manifest import load_ensemble_manifest, resolve_ensemble, spread_note
from imgcls_dist.ensemble.select import accuracy, log_loss, select_members, select_views
from imgcls_dist.errors import UserError
from imgcls_dist.evaluate.metrics import expected_calibration_error
from imgcls_dist.predictor.predict import load_predictor
from imgcls_dist.predictor.prepare import labelled_batches
from imgcls_dist.models.checkpoint import load_model_file, save_model_file

# ------------------------------------------------------------------ synthetic logits (known answers)


def calibrated_logits(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax IS the label distribution: labels are drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, classes))
    p = softmax(logits).astype(np.float64)
    labels = np.array([rng.choice(classes, p=row / row.sum()) for row in p])
    return logits.astype(np.float32), labels


def test_temperature_lowers_nll_and_ece_of_an_over_confident_model_and_is_one_when_calibrated():
    logits, y = calibrated_logits(4000, 10, seed=0)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(1.0, abs=0.08)

    over = logits * 3.0  # the same ranking, three times too sharp
    t_over = fit_temperature(over, y)
    assert t_over == pytest.approx(3.0, rel=0.1)
    before, after = softmax(over), softmax(over, t_over)
    assert log_loss(after, y) < log_loss(before, y) - 0.1
    assert expected_calibration_error(after, y) < expected_calibration_error(before, y) / 2
    assert accuracy(after, y) == accuracy(before, y)  # T never changes an argmax
    assert choose_temperature(over, y)[0] == t_over  # softening is always fitted


def _sharp_process(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a ~99%-accurate calibrated model (labels drawn from their softmax), as on digits."""
    z = rng.normal(0, 1.0, (n, 10))
    z[np.arange(n), rng.integers(0, 10, n)] += 8.0
    p = softmax(z).astype(np.float64)
    return z, (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)


def test_sharpening_on_a_validation_split_without_errors_is_expectation_consistent():
    """An under-confident model (its logits / 3, as label smoothing leaves them) that gets every one of 300
    validation rows right: the NLL fit runs to T_MIN, the chosen T makes the mean confidence (n+1)/(n+2),
    and on 5,000 held-out rows of the same process it is close to the true T = 1/3 (errors included)."""
    rng = np.random.default_rng(0)
    z_val, _ = _sharp_process(rng, 300)
    z_test, y_test = _sharp_process(rng, 5000)
    z_val, z_test = z_val / 3, z_test / 3
    y_val = z_val.argmax(axis=1)  # every validation row right: NLL falls without bound as T -> 0
    t_nll = fit_temperature(z_val, y_val)
    assert t_nll < 0.1
    t, why = choose_temperature(z_val, y_val)
    assert t_nll < t < 1.0 and "0 validation errors" in why and "expectation consistency" in why
    assert softmax(z_val, t).max(axis=1).mean() == pytest.approx(301 / 302, abs=1e-4)
    held_out = {name: log_loss(softmax(z_test, x), y_test) for name, x in
                (("T=1", 1.0), ("chosen", t), ("NLL fit", t_nll), ("true", 1 / 3))}
    assert held_out["chosen"] < held_out["T=1"] / 3
    assert held_out["chosen"] < held_out["NLL fit"] / 2
    assert held_out["chosen"] < held_out["true"] * 1.2


def test_the_nll_fit_stands_with_enough_errors_or_when_it_softens():
    logits, _ = calibrated_logits(300, 10, seed=11)
    y = logits.argmax(axis=1)
    y[:MIN_ERRORS_TO_SHARPEN] = (y[:MIN_ERRORS_TO_SHARPEN] + 1) % 10  # enough errors: the fit stands
    assert choose_temperature(logits, y)[0] == fit_temperature(logits, y)
    assert choose_temperature(logits * 3, y)[0] == fit_temperature(logits * 3, y) > 1.0


def _member(y: np.ndarray, classes: int, correct: float, sharp: float, seed: int) -> np.ndarray:
    """Probabilities of a synthetic member right on a `correct` fraction of rows (errors independent)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.0, (len(y), classes))
    right = rng.random(len(y)) < correct
    target = np.where(right, y, (y + rng.integers(1, classes, len(y))) % classes)
    logits[np.arange(len(y)), target] += sharp
    return softmax(logits)


def test_selection_never_loses_to_the_best_member_and_a_weak_member_gets_little_weight():
    y = np.random.default_rng(1).integers(0, 10, 2000)
    strong, weak = _member(y, 10, 0.95, 4.0, seed=2), _member(y, 10, 0.40, 4.0, seed=3)
    counts, steps = select_members(np.stack([weak, strong]), y, ["weak", "strong"])
    ens = (counts[0] * weak + counts[1] * strong) / sum(counts)
    assert steps[0].added == "strong"  # the best single member by log-loss starts
    assert log_loss(ens, y) <= log_loss(strong, y) and accuracy(ens, y) >= accuracy(strong, y)
    assert counts[0] / sum(counts) <= 0.2
    assert all(b.nll < a.nll and b.acc >= a.acc for a, b in zip(steps, steps[1:]))  # every step helped


def test_two_comparable_members_ensemble_beats_both():
    y = np.random.default_rng(4).integers(0, 10, 2000)
    a, b = _member(y, 10, 0.85, 3.0, seed=5), _member(y, 10, 0.85, 3.0, seed=6)
    counts, _ = select_members(np.stack([a, b]), y, ["a", "b"])
    ens = (counts[0] * a + counts[1] * b) / sum(counts)
    assert min(counts) >= 1
    assert log_loss(ens, y) < min(log_loss(a, y), log_loss(b, y))
    assert accuracy(ens, y) >= max(accuracy(a, y), accuracy(b, y))


def test_a_view_that_hurts_is_never_chosen():
    y = np.random.default_rng(7).integers(0, 10, 1000)
    views = {"identity": _member(y, 10, 0.9, 3.0, seed=8), "shift_left": _member(y, 10, 0.9, 3.0, seed=9),
             "vflip": _member(y, 10, 0.1, 3.0, seed=10)}  # a flipped digit is mostly another digit
    chosen, steps = select_views(views, y, list(views))
    assert "vflip" not in chosen and chosen[:2] == ["identity", "shift_left"]
    assert steps[-1].nll < steps[0].nll


# ------------------------------------------------------------------ real model files on digits


@pytest.fixture(scope="module")
def digit_models(digits_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ens_models")
    return {"strong": train_digits_model(root / "strong", digits_dir, epochs=8, seed=0),
            "strong2": train_digits_model(root / "strong2", digits_dir, epochs=8, seed=1),
            "weak": train_digits_model(root / "weak", digits_dir, epochs=1, seed=2, limit=128)}


def test_build_on_validation_never_loses_and_inference_applies_the_manifest(digit_models, digits_dir, tmp_path,
                                                                             capsys):
    out = tmp_path / "ens" / "ensemble.json"
    doc = build_ensemble([digit_models["strong"], digit_models["weak"], digit_models["strong2"]], digits_dir, out)
    v = doc["validation"]
    cands = {c["name"]: c for c in v["candidates"]}
    best = min(v["candidates"], key=lambda c: c["nll_calibrated"])
    assert v["result"]["nll"] <= best["nll_calibrated"] and v["result"]["acc"] >= best["acc"]
    assert cands["weak"]["acc"] < cands["strong"]["acc"] - 0.2 and cands["weak"]["weight"] <= 0.2
    counts = json.loads((digits_dir / "dataset.json").read_text())["counts"]
    assert v["rows"] == counts["val"]  # the val split, never test
    assert "/test/" not in v["split"] and "/val/" in v["split"]
    assert set(doc["views"]) <= set(v["candidate_views"]) and doc["views"][0] == "identity"
    assert all(c["nll_calibrated"] <= c["nll"] + 1e-6 for c in v["candidates"])
    assert (out.parent / "ensemble_calibration.png").stat().st_size > 5000
    assert "built, views" in capsys.readouterr().out

    # the manifest round-trips and the predictor applies temperatures, weights and views from it
    spec = load_ensemble_manifest(out)
    assert spec.views == doc["views"] and spec.combine == "weighted"
    assert spec.temperatures == [m["temperature"] for m in doc["models"]]
    pred = load_predictor(out)
    assert pred.views == doc["views"] and pred.temperatures == spec.temperatures
    assert load_predictor(out, tta="none").views == ["identity"]  # --tta still overrides
    ys, ps = [], []
    for y, arrays in labelled_batches(split_files(digits_dir, "val"), pred.input_keys, 128):
        ys.append(y)
        ps.append(pred.predict_uint8(arrays))
    probs, y = np.concatenate(ps), np.concatenate(ys)
    assert log_loss(probs, y) == pytest.approx(v["result"]["nll"], abs=1e-4)
    assert accuracy(probs, y) == pytest.approx(v["result"]["acc"])


def test_cli_build_from_a_campaign_layout_and_bad_input(digit_models, digits_dir, tmp_path, capsys):
    camp = tmp_path / "camp"
    for name in ("strong", "weak"):
        (camp / "models" / name).mkdir(parents=True)
        (camp / "models" / name / "model.pt").write_bytes(Path(digit_models[name]).read_bytes())
    assert cli_main(["ensemble", "build", "--models", str(camp), "--val", str(digits_dir),
                     "--out", str(camp / "ensemble.json"), "--max-rows", "200"]) == 0
    doc = json.loads((camp / "ensemble.json").read_text())
    assert doc["validation"]["rows"] == 200 and doc["models"][0]["path"] == "models/strong/model.pt"
    assert load_ensemble_manifest(camp / "ensemble.json").paths[0] == str(camp / "models" / "strong" / "model.pt")

    no_val = tmp_path / "noval"
    (no_val / "train").mkdir(parents=True)
    (no_val / "dataset.json").write_text((digits_dir / "dataset.json").read_text())
    assert cli_main(["ensemble", "build", "--models", str(digit_models["strong"]), "--val", str(no_val),
                     "--out", str(tmp_path / "e.json")]) == 2
    assert "missing split directory val/" in capsys.readouterr().err
    other = save_model(tmp_path / "other", classes=[str(i) for i in range(7)])
    with pytest.raises(UserError, match="classes differ"):
        build_ensemble([digit_models["strong"], other], digits_dir, tmp_path / "x.json", verbose=False)


def test_models_without_a_manifest_get_a_note_when_their_val_accuracies_differ(tmp_path):
    a = save_model(tmp_path / "a")
    members = [{"path": "a", "metrics": {"val_acc": 0.99}}, {"path": "b", "metrics": {"val_acc": 0.95}}]
    spec = resolve_ensemble([a])
    note = spread_note(spec, members)
    assert note and "4.0 points" in note and "ensemble build" in note
    assert spread_note(spec, [members[0], {"path": "c", "metrics": {"val_acc": 0.985}}]) is None
    manifest = tmp_path / "ensemble.json"
    manifest.write_text(json.dumps({"models": [{"path": "a", "weight": 1.0}]}))
    assert spread_note(resolve_ensemble(str(manifest)), members) is None  # a built manifest says nothing
    manifest.write_text(json.dumps({"models": [{"path": "a", "temperature": 0}]}))
    with pytest.raises(UserError, match="'temperature' must be > 0"):
        load_ensemble_manifest(manifest)


def test_predict_with_members_of_different_val_accuracy_prints_the_note(tmp_path, capsys):
    from PIL import Image

    from imgcls_dist.data.builtin import digits_images

    paths = []
    for name, acc in (("good", 0.99), ("poor", 0.90)):
        payload = load_model_file(save_model(tmp_path / name))
        paths.append(str(save_model_file(tmp_path / name, state_dict=payload["state_dict"], metrics={"val_acc": acc},
                                         **{k: payload[k] for k in ("arch", "classes", "in_channels", "image_size",
                                                                    "mean", "std")})))
    png = tmp_path / "digit.png"
    Image.fromarray(digits_images(16)[0][0]).save(png)
    assert cli_main(["predict", str(png), "--models", *paths]) == 0
    err = capsys.readouterr().err
    assert "9.0 points" in err and "ensemble build" in err and err.count("\n") == 1
    assert cli_main(["predict", str(png), "--models", paths[0]]) == 0
    assert "ensemble build" not in capsys.readouterr().err
