"""`imgcls-dist predict`: top-k for local files, same numbers as the batch path, clear errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers.model_files import save_model

from imgcls_dist.cli import main
from imgcls_dist.data.builtin import digits_images, encode_png
from imgcls_dist.predictor.predict import predict_images
from imgcls_dist.predictor.predictor import EnsemblePredictor
from imgcls_dist.predictor.prepare import prepare_encoded


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    a = save_model(d / "a", "lenet5", 16, seed=1)
    b = save_model(d / "b", "lenet5", 24, seed=2)
    (d / "ensemble.json").write_text(json.dumps({"models": [{"path": "a", "weight": 2}, {"path": "b", "weight": 1}],
                                                 "combine": "weighted"}))
    imgs, labels, _ = digits_images(40)
    pngs = []
    for i in range(3):
        p = d / f"digit{i}.png"
        p.write_bytes(encode_png(imgs[i]))
        pngs.append(p)
    return d, a, b, pngs


def test_predict_prints_topk_with_probabilities(setup, capsys):
    d, a, _, pngs = setup
    assert main(["predict", str(pngs[0]), str(pngs[1]), "--models", str(a), "--topk", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{pngs[0]}: ")
    pairs = re.findall(r"(\d) (0\.\d{4}|1\.0000)", lines[0])
    assert len(pairs) == 3
    probs = [float(p) for _, p in pairs]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001


def test_predict_with_ensemble_manifest_matches_batch_path(setup):
    d, a, b, pngs = setup
    res = predict_images(pngs, str(d / "ensemble.json"), topk=10)
    pred = EnsemblePredictor([a, b], weights=[2, 1], combine="weighted")
    arrays, errors = prepare_encoded([p.read_bytes() for p in pngs], pred.input_keys)
    assert errors == [None] * 3
    probs = pred.predict_uint8(arrays)
    for r, p in zip(res, probs):
        got = np.zeros(10)
        for t in r["top"]:
            got[t["index"]] = t["prob"]
        np.testing.assert_allclose(got, p, atol=1e-6)


def test_predict_bad_image_is_one_line_error(setup, tmp_path, capsys):
    _, a, _, _ = setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["predict", str(bad), "--models", str(a)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err
    assert main(["predict", str(tmp_path / "missing.png"), "--models", str(a)]) == 2
    assert "cannot read file" in capsys.readouterr().err
