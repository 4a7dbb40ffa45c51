"""EnsemblePredictor: probabilities, combine rules with known answers, mixed members, batched TTA,
ensemble manifests, and pixel parity with the training decode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.image_fixtures import good, write_image_fixtures
from helpers.model_files import DIGITS, save_model

from imgcls_dist.data.augment import apply, build_eval_transform
from imgcls_dist.data.builtin import digits_images
from imgcls_dist.data.decode import decode_image
from imgcls_dist.errors import UserError
from imgcls_dist.predictor.manifest import load_ensemble_manifest, resolve_ensemble
from imgcls_dist.predictor.predictor import EnsemblePredictor
from imgcls_dist.predictor.prepare import prepare_encoded, prepare_image, to_channels
from imgcls_dist.predictor.tta import VIEWS
from imgcls_dist.models.preprocess import normalize
from imgcls_dist.train.data import DecodeSamples


def softmax(logits):
    e = np.exp(np.asarray(logits, np.float64) - np.max(logits))
    return e / e.sum()


def digit_batch(size: int, n: int = 8, channels: int = 3) -> np.ndarray:
    imgs, _, _ = digits_images(size)
    return np.stack([imgs[i] for i in range(n)])[..., :channels]


def logits_for(top: int, others: float = 0.0, top_value: float = 3.0) -> list[float]:
    v = [others] * 10
    v[top] = top_value
    return v


def test_probs_sum_to_one_with_members_of_different_arch_and_size(tmp_path):
    a = save_model(tmp_path / "a", "lenet5", 16, seed=1)
    b = save_model(tmp_path / "b", "resnet18", 32, seed=2)
    pred = EnsemblePredictor([a, b], views="identity,shift_left", batch_size=3)
    assert pred.input_keys == [(16, 3), (32, 3)]
    batch = {(16, 3): digit_batch(16), (32, 3): digit_batch(32)}
    probs, members = pred.predict_uint8(batch, return_members=True)
    # int keys mean RGB; torch tensors are NCHW
    as_tensors = {s: torch.from_numpy(digit_batch(s)).permute(0, 3, 1, 2) for s in (16, 32)}
    np.testing.assert_allclose(pred.predict_uint8(as_tensors), probs, atol=1e-6)
    assert probs.shape == (8, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, (members[0] + members[1]) / 2, atol=1e-6)
    assert not np.allclose(members[0], members[1])  # really two different networks


def test_default_views_are_the_views_every_member_trained_with(tmp_path):
    shifts = ["shift_left", "shift_right", "shift_up", "shift_down"]
    standard = save_model(tmp_path / "s", config={"augment": {"preset": "standard", "strength": 0.5}})
    light = save_model(tmp_path / "l", seed=1, config={"augment": {"preset": "light", "strength": 0.5}})
    flips = save_model(tmp_path / "f", seed=2, hflip=True, config={"augment": {"preset": "standard", "strength": 1.0}})
    assert EnsemblePredictor([standard]).views == ["identity", *shifts, "zoom_in"]
    assert EnsemblePredictor([standard, light]).views == ["identity"]  # light never translated
    assert EnsemblePredictor([flips]).views == ["identity", "hflip", *shifts, "zoom_in", "zoom_out"]
    assert EnsemblePredictor([standard, flips]).views == ["identity", *shifts, "zoom_in"]  # digits never flipped
    assert EnsemblePredictor([standard], views="none").views == ["identity"]


def test_mean_and_weighted_combine_known_answer(tmp_path):
    la, lb = logits_for(1, top_value=2.0), logits_for(2, top_value=1.0)
    a = save_model(tmp_path / "a", logits=la)
    b = save_model(tmp_path / "b", logits=lb)
    x = {(16, 3): digit_batch(16, 4)}
    mean = EnsemblePredictor([a, b], views="none").predict_uint8(x)
    np.testing.assert_allclose(mean, np.tile((softmax(la) + softmax(lb)) / 2, (4, 1)), atol=1e-5)
    weighted = EnsemblePredictor([a, b], views="none", weights=[3, 1], combine="weighted").predict_uint8(x)
    np.testing.assert_allclose(weighted, np.tile(0.75 * softmax(la) + 0.25 * softmax(lb), (4, 1)), atol=1e-5)
    # weights only matter through their ratio
    again = EnsemblePredictor([a, b], views="none", weights=[0.6, 0.2]).predict_uint8(x)
    np.testing.assert_allclose(again, weighted, atol=1e-6)
    # a member's temperature divides its logits before its softmax (ensemble build's calibration)
    scaled = EnsemblePredictor([a, b], views="none", temperatures=[2.0, 0.5]).predict_uint8(x)
    expect = (softmax(np.asarray(la) / 2.0) + softmax(np.asarray(lb) / 0.5)) / 2
    np.testing.assert_allclose(scaled, np.tile(expect, (4, 1)), atol=1e-5)
    with pytest.raises(UserError, match="one > 0 per model"):
        EnsemblePredictor([a, b], temperatures=[1.0, 0.0])


def test_vote_counts_and_tie_break(tmp_path):
    x = {(16, 3): digit_batch(16, 2)}
    m1 = save_model(tmp_path / "m1", logits=logits_for(1))
    m2 = save_model(tmp_path / "m2", logits=logits_for(1))
    m3 = save_model(tmp_path / "m3", logits=logits_for(2, top_value=8.0))
    probs = EnsemblePredictor([m1, m2, m3], views="none", combine="vote").predict_uint8(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs[:, 1], 2 / 3, atol=2e-3)
    np.testing.assert_allclose(probs[:, 2], 1 / 3, atol=2e-3)
    assert (probs.argmax(axis=1) == 1).all()  # the majority wins even against a very confident member
    # 1:1 tie between class 1 (confident member m3-like) and class 2: averaged probabilities decide
    weak = save_model(tmp_path / "weak", logits=logits_for(1, top_value=0.5))
    tie = EnsemblePredictor([weak, m3], views="none", combine="vote").predict_uint8(x)
    np.testing.assert_allclose(tie[:, 1], tie[:, 2], atol=2e-3)
    assert (tie.argmax(axis=1) == 2).all()
    # weighted vote: one member with weight 3 outvotes two with weight 1
    wv = EnsemblePredictor([m1, m2, m3], views="none", combine="vote", weights=[1, 1, 3]).predict_uint8(x)
    assert (wv.argmax(axis=1) == 2).all()


def test_classes_mismatch_names_both_files(tmp_path):
    a = save_model(tmp_path / "a")
    b = save_model(tmp_path / "b", classes=[f"c{i}" for i in range(10)])
    with pytest.raises(UserError, match=r"disagree on classes.*a/model\.pt.*b/model\.pt"):
        EnsemblePredictor([a, b])


def test_batched_tta_equals_per_view_forwards(tmp_path):
    path = save_model(tmp_path / "m", "lenet5", 16, seed=3)
    views = ["identity", "shift_up", "shift_right", "zoom_in", "zoom_out"]
    pred = EnsemblePredictor([path], views=views, batch_size=64, precision="fp32")  # as the forwards below
    x = digit_batch(16, 6)
    got = pred.predict_uint8({(16, 3): x})
    m = pred.members[0]
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.inference_mode():
        per_view = [m.model(normalize(VIEWS[v](xt), m.meta["mean"], m.meta["std"])).softmax(-1) for v in views]
    np.testing.assert_allclose(got, torch.stack(per_view).mean(0).numpy(), atol=1e-5)


def test_predictor_rejects_mirroring_views_for_no_flip_models(tmp_path):
    path = save_model(tmp_path / "m", hflip=False)
    with pytest.raises(UserError, match="hflip"):
        EnsemblePredictor([path], views="identity,hflip")
    assert "hflip" not in EnsemblePredictor([path]).views
    flip_ok = save_model(tmp_path / "f", hflip=True)
    assert "hflip" in EnsemblePredictor([flip_ok]).views


def test_ensemble_manifest_paths_weights_combine(tmp_path):
    a = save_model(tmp_path / "runs" / "a")
    save_model(tmp_path / "runs" / "b", seed=5)
    doc = {"models": [{"path": "runs/a", "weight": 0.75, "name": "a", "val_acc": 0.9},
                      {"path": str(tmp_path / "runs" / "b" / "model.pt"), "weight": 0.25}],
           "combine": "weighted", "weight_rule": "val_acc-proportional"}
    manifest = tmp_path / "ensemble.json"
    manifest.write_text(json.dumps(doc))
    spec = load_ensemble_manifest(manifest)
    paths, weights, combine = spec.paths, spec.weights, spec.combine
    assert paths == [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b" / "model.pt")]
    assert weights == [0.75, 0.25] and combine == "weighted" and spec.temperatures is None and spec.views is None
    # explicit --combine mean drops the manifest's weights; explicit weights replace them
    mean = resolve_ensemble(str(manifest), None, "mean")
    assert (mean.weights, mean.combine) == (None, "mean")
    given = resolve_ensemble(str(manifest), [1, 1], None)
    assert (given.weights, given.combine) == ([1, 1], None)
    pred = EnsemblePredictor(paths, weights=weights, combine=combine)
    assert pred.weights == [0.75, 0.25] and pred.members[0].path == str(a)

    doc["models"][1].pop("weight")
    manifest.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="every model has a 'weight' or none"):
        load_ensemble_manifest(manifest)
    manifest.write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON"):
        load_ensemble_manifest(manifest)


def test_combine_argument_errors(tmp_path):
    a = save_model(tmp_path / "a")
    with pytest.raises(UserError, match="needs --weights"):
        EnsemblePredictor([a], combine="weighted")
    with pytest.raises(UserError, match="ignores weights"):
        EnsemblePredictor([a], combine="mean", weights=[1.0])
    with pytest.raises(UserError, match="2 weights for 1 models"):
        EnsemblePredictor([a], weights=[1, 2])
    with pytest.raises(UserError, match="no model file"):
        EnsemblePredictor([tmp_path / "missing"])


def test_decode_once_matches_training_decode_per_channel_count(tmp_path):
    # Training decodes 1-channel models with decode_image(channels=1); we decode RGB once and convert.
    for fx in good(write_image_fixtures(tmp_path)):
        data = fx.path.read_bytes()
        rgb = decode_image(data, channels=3).array
        assert np.array_equal(to_channels(rgb, 1), decode_image(data, channels=1).array), fx.name
    arrays, errors = prepare_encoded([fx.path.read_bytes() for fx in good(write_image_fixtures(tmp_path))] + [b""],
                                     [(16, 1), (24, 3)])
    assert errors[:-1] == [None] * (len(errors) - 1) and "empty" in errors[-1]
    assert arrays[(16, 1)].shape == (len(errors), 16, 16, 1) and arrays[(24, 3)].shape == (len(errors), 24, 24, 3)
    assert not arrays[(16, 1)][-1].any()  # placeholder zeros for the bad row
    first = decode_image(good(write_image_fixtures(tmp_path))[0].path.read_bytes(), channels=1).array
    assert np.array_equal(arrays[(16, 1)][0], apply(build_eval_transform(16), first))


def test_training_eval_decode_equals_inference_prepare_at_reduced_size(tmp_path):
    # Reduced-size decoding: both decode a JPEG at the DCT scale of their own image_size. 3000x2000 takes 1/8 for
    # 24 px and 1/4 for 300 px, so an ensemble of both sizes must decode once per size to match each member's
    # training.
    keys = [(24, 1), (24, 3), (300, 3)]
    for fx in good(write_image_fixtures(tmp_path)):
        data = fx.path.read_bytes()
        prepared, err = prepare_image(data, keys)
        assert err is None, (fx.name, err)
        for size, channels in keys:
            training = DecodeSamples(channels, build_eval_transform(size), size, seeded=False)
            image, label, sid = training[(7, data, 3)]
            assert (label, sid) == (3, 7)
            assert np.array_equal(image, prepared[(size, channels)]), (fx.name, size, channels)


def test_one_channel_member_beside_rgb_member(tmp_path):
    gray = save_model(tmp_path / "g", in_channels=1, seed=7)
    rgb = save_model(tmp_path / "r", seed=8)
    pred = EnsemblePredictor([gray, rgb], views="none")
    assert pred.input_keys == [(16, 1), (16, 3)]
    probs = pred.predict_uint8({(16, 1): digit_batch(16, 4, 1), (16, 3): digit_batch(16, 4)})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert DIGITS == pred.classes


def test_compiled_members_use_one_graph_for_every_call_size_and_match_eager(tmp_path, monkeypatch):
    """`compile`: members go through torch.compile with static shapes, and a call's short last micro-batch is
    padded, so calls of 11 and 6 rows (tails of 3 and 2) reuse one graph. Dynamo's tracing and guards are the
    real ones; inductor's code generation is swapped for the eager backend here (on a CPU it takes tens of
    seconds even for LeNet, and is torch's own, tested part)."""
    import functools

    import torch._dynamo.utils as dynamo_utils

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    path = save_model(tmp_path / "m", "lenet5", 16, seed=3)
    views = ["identity", "shift_up"]
    eager = EnsemblePredictor([path], views=views, batch_size=4)
    compiled = EnsemblePredictor([path], views=views, batch_size=4, compile=True)
    assert isinstance(compiled.members[0].forward, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(eager.members[0].forward, torch._dynamo.eval_frame.OptimizedModule)
    x = np.random.default_rng(0).integers(0, 256, (11, 16, 16, 3), dtype=np.uint8)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for n in (11, 6):
        np.testing.assert_allclose(compiled.predict_uint8({(16, 3): x[:n]}), eager.predict_uint8({(16, 3): x[:n]}),
                                   atol=1e-6)
    logits = compiled.view_logits({(16, 3): x[:3]})
    assert logits.shape == (1, 2, 3, 10)
    np.testing.assert_allclose(logits, eager.view_logits({(16, 3): x[:3]}), atol=1e-5)
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast, channels_last, pinned copies)")
def test_cuda_predictor_gives_the_cpu_predictors_probabilities_within_bf16(tmp_path):
    a = save_model(tmp_path / "a", "lenet5", 16, seed=1)
    b = save_model(tmp_path / "b", "resnet18", 32, seed=2)
    x = {(16, 3): digit_batch(16, 40), (32, 3): digit_batch(32, 40)}
    kw = dict(views="identity,shift_left", batch_size=16)  # 40 rows: 3 micro-batches through the pinned feed
    cpu = EnsemblePredictor([a, b], device="cpu", **kw).predict_uint8(x)
    cuda = EnsemblePredictor([a, b], device="cuda", **kw)
    assert cuda.amp_dtype is not None and cuda.channels_last
    got = cuda.predict_uint8(x)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # softmax and combine run in fp32
    np.testing.assert_allclose(got, cpu, atol=3e-2)  # bf16 forward: ~3 significant digits
    # torch.compile (inductor) on CUDA gives what eager CUDA gives; one member keeps the compile short.
    eager = EnsemblePredictor([a], device="cuda", **kw).predict_uint8(x)
    compiled = EnsemblePredictor([a], device="cuda", compile=True, **kw).predict_uint8(x)
    np.testing.assert_allclose(compiled, eager, atol=1e-2)
