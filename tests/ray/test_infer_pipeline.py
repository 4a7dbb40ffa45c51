"""Batch inference end to end on the 2-CPU session Ray: damaged rows, exact schema, reruns, killed runs,
bad input schemas, and actor-pool sizing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.image_fixtures import write_image_fixtures
from helpers.model_files import digit_rows, save_model, write_input

from imgcls_dist.cli import main
from imgcls_dist.data.synthetic import write_synthetic_shards
from imgcls_dist.errors import JobFailed, UserError
from imgcls_dist.batch import pipeline, publish
from imgcls_dist.batch.pipeline import plan_actors, run_batch_inference
from imgcls_dist.batch.publish import read_manifest
from imgcls_dist.predictor.predict import load_predictor
from imgcls_dist.predictor.prepare import prepare_encoded

ROOT = Path(__file__).resolve().parents[2]

# docs/design.md's predictions contract, spelled out here (not imported) so a drift in the code fails the test.
EXPECTED_SCHEMA = [
    ("id", pa.string()), ("pred", pa.int32()), ("pred_name", pa.string()), ("confidence", pa.float32()),
    ("probs", "list<float32>"), ("entropy", pa.float32()), ("label", pa.int64()), ("error", pa.string()),
]


def read_out(out: Path) -> pa.Table:
    files = [out / f["name"] for f in read_manifest(out)["files"]]
    assert sorted(files) == sorted(out.glob("*.parquet")), "OUT holds parquet files the manifest does not list"
    return pa.concat_tables(pq.read_table(f) for f in files)


def by_id(t: pa.Table) -> dict[str, dict]:
    return {r["id"]: r for r in t.to_pylist()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    # two members of different input sizes: the decode stage must produce both
    return [save_model(d / "a", "lenet5", 16, seed=1), save_model(d / "b", "lenet5", 24, seed=2)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_digits_dir):
    d = tmp_path_factory.mktemp("inputs")
    good = digit_rows(tiny_digits_dir, "test", limit=240)
    fixtures = write_image_fixtures(d / "fixtures")
    mixed = list(good)
    for i, fx in enumerate(fixtures):  # spread over every shard
        mixed.insert(i * 11, (f"fx-{fx.name}", fx.path.read_bytes(), None))
    write_input(d / "mixed", mixed, rows_per_shard=70)
    write_input(d / "clean", good, rows_per_shard=100)
    return SimpleNamespace(mixed=d / "mixed", clean=d / "clean", mixed_rows=mixed, good_rows=good,
                           bad={f"fx-{fx.name}": fx for fx in fixtures if not fx.ok},
                           ok_fixture_ids={f"fx-{fx.name}" for fx in fixtures if fx.ok})


@pytest.fixture(scope="module")
def mixed_run(ray_session, models, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "mixed"
    return out, run_batch_inference(models, inputs.mixed, out, batch_size=32, verbose=False)


@pytest.fixture(scope="module")
def clean_out(ray_session, models, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "clean"
    run_batch_inference(models, inputs.clean, out, batch_size=32, verbose=False)
    return out


def test_every_row_accounted_for_and_only_bad_rows_error(mixed_run, inputs):
    out, manifest = mixed_run
    t = read_out(out)
    ids = t.column("id").to_pylist()
    assert len(ids) == len(inputs.mixed_rows) == len(set(ids))
    assert set(ids) == {r[0] for r in inputs.mixed_rows}
    rows = by_id(t)
    errored = {i for i, r in rows.items() if r["error"] is not None}
    assert errored == set(inputs.bad)
    for rid, fx in inputs.bad.items():
        r = rows[rid]
        assert fx.error_contains in r["error"], (rid, r["error"])
        assert r["pred"] is None and r["pred_name"] is None and r["probs"] is None
        assert r["confidence"] is None and r["entropy"] is None
    classes = manifest["classes"]
    for rid, r in rows.items():
        if rid in inputs.bad:
            continue
        p = np.asarray(r["probs"], np.float64)
        assert len(p) == 10 and abs(p.sum() - 1) < 1e-5
        assert r["pred"] == int(p.argmax()) and r["pred_name"] == classes[r["pred"]]
        assert r["confidence"] == pytest.approx(p.max(), abs=1e-6)
        assert r["entropy"] == pytest.approx(-(p * np.log(np.clip(p, 1e-12, 1))).sum(), abs=1e-4)
    labels = {r[0]: r[2] for r in inputs.mixed_rows}
    assert all(rows[i]["label"] == labels[i] for i in rows)  # passthrough, nulls included
    assert manifest["rows_in"] == manifest["rows_out"] == len(ids)
    assert manifest["error_rows"] == len(inputs.bad)
    assert manifest["complete"] and manifest["tta_views"][0] == "identity" and "hflip" not in manifest["tta_views"]
    assert [m["image_size"] for m in manifest["models"]] == [16, 24]
    assert sum(f["rows"] for f in manifest["files"]) == len(ids)
    assert len(manifest["input_files"]) == 4 and manifest["images_per_s"] > 0


def test_output_schema_is_design_contract(mixed_run):
    out, _ = mixed_run
    for f in out.glob("*.parquet"):
        schema = pq.read_schema(f)
        assert schema.names == [n for n, _ in EXPECTED_SCHEMA]
        for name, typ in EXPECTED_SCHEMA:
            got = schema.field(name).type
            if typ == "list<float32>":
                assert pa.types.is_list(got) and got.value_type == pa.float32(), got
            else:
                assert got == typ, (name, got)


def test_no_label_column_means_no_label_output(ray_session, models, inputs, tmp_path):
    write_input(tmp_path / "in", [(f"u{i}", b, None) for i, b, _ in inputs.good_rows[:40]])
    for f in (tmp_path / "in").glob("*.parquet"):  # drop the label column entirely
        pq.write_table(pq.read_table(f).drop_columns(["label"]), f)
    m = run_batch_inference(models[:1], tmp_path / "in", tmp_path / "out", tta="none", verbose=False)
    t = read_out(tmp_path / "out")
    assert "label" not in t.column_names and t.num_rows == 40 and not m["label_passthrough"]


def test_good_rows_match_a_clean_run(mixed_run, clean_out):
    mixed, clean = by_id(read_out(mixed_run[0])), by_id(read_out(clean_out))
    assert len(clean) == 240
    for rid, r in clean.items():
        assert mixed[rid]["pred"] == r["pred"]
        np.testing.assert_allclose(mixed[rid]["probs"], r["probs"], atol=1e-5)


def test_a_built_manifest_reaches_the_predictor_actors(ray_session, models, inputs, tmp_path):
    """Weights, temperatures and views of an ensemble.json go through the Ray Data job: its probabilities are
    the in-process predictor's for the same manifest."""
    manifest = tmp_path / "ensemble.json"
    manifest.write_text(json.dumps({"models": [{"path": str(models[0]), "weight": 3, "temperature": 0.5},
                                               {"path": str(models[1]), "weight": 1, "temperature": 2.0}],
                                    "combine": "weighted", "views": ["identity", "shift_left"]}))
    out = tmp_path / "out"
    m = run_batch_inference(manifest, inputs.clean, out, batch_size=32, verbose=False)
    assert m["temperatures"] == [0.5, 2.0] and m["tta_views"] == ["identity", "shift_left"]
    assert m["weights"] == [0.75, 0.25]
    rows = by_id(read_out(out))
    pred = load_predictor(manifest)
    ids, images = [r[0] for r in inputs.good_rows[:40]], [r[1] for r in inputs.good_rows[:40]]
    arrays, errors = prepare_encoded(images, pred.input_keys)
    assert not any(errors)
    expect = pred.predict_uint8(arrays)
    got = np.array([rows[i]["probs"] for i in ids])
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_rerun_replaces_instead_of_appending(models, inputs, clean_out):
    before = read_manifest(clean_out)
    first = by_id(read_out(clean_out))
    after = run_batch_inference(models, inputs.clean, clean_out, batch_size=64, verbose=False)
    t = read_out(clean_out)
    assert after["run_id"] != before["run_id"]
    assert t.num_rows == 240 == len(set(t.column("id").to_pylist()))
    assert all(after["run_id"] in f.name for f in clean_out.glob("*.parquet"))
    assert {i: r["pred"] for i, r in by_id(t).items()} == {i: r["pred"] for i, r in first.items()}


def test_failed_runs_never_publish_partial_output_and_rerun_completes(
        ray_session, models, inputs, clean_out, tmp_path, monkeypatch):
    before = read_manifest(clean_out)

    # 1. another job into the same OUT crashes after writing its parts, before publishing: the previous output
    #    stays complete. (SIGKILLed drivers: tests/ray/test_infer_resume.py locally, tests/ray/test_s3_e2e.py on S3.)
    other_model = save_model(tmp_path / "other", "lenet5", 16, seed=4)
    write_synthetic_shards(tmp_path / "big", 300, size=32, rows_per_shard=100)

    def crash_before_publishing(*_a, **_k):
        raise RuntimeError("simulated crash after the parts were written, before publishing")

    monkeypatch.setattr(publish, "publish", crash_before_publishing)
    with pytest.raises(RuntimeError, match="simulated"):
        run_batch_inference(other_model, tmp_path / "big", clean_out, batch_size=32, verbose=False)
    monkeypatch.undo()
    assert read_manifest(clean_out)["run_id"] == before["run_id"]
    assert read_out(clean_out).num_rows == 240
    assert list(clean_out.glob(".staging-*")), "the crashed run's staging dir should be where it left it"

    # 2. rows out != rows in (simulated lost part): JobFailed, nothing published, previous output intact
    #    (--fresh: the crashed run was another job, another model on other rows, so it is not resumed)
    real = pipeline.own_parts
    monkeypatch.setattr(pipeline, "own_parts", lambda staging, run_id: real(staging, run_id)[1:])
    with pytest.raises(JobFailed, match="rows out .* != rows in 240"):
        run_batch_inference(models, inputs.clean, clean_out, fresh=True, verbose=False)
    assert read_manifest(clean_out)["run_id"] == before["run_id"] and read_out(clean_out).num_rows == 240
    monkeypatch.undo()

    # 3. crash after the files moved in, before the manifest: nothing claims completeness (this run resumes
    #    step 2's staged parts, all of them on storage, so it predicts nothing itself)
    def crash(*_a, **_k):
        raise RuntimeError("simulated crash after publishing files, before the manifest")

    monkeypatch.setattr(publish, "commit", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        run_batch_inference(models, inputs.clean, clean_out, verbose=False)
    assert not (clean_out / "_manifest.json").exists()
    with pytest.raises(UserError, match="did not finish"):
        read_manifest(clean_out)
    monkeypatch.undo()

    # 4. a rerun cleans up and publishes complete, duplicate-free output
    m = run_batch_inference(models, inputs.clean, clean_out, verbose=False)
    t = read_out(clean_out)
    assert m["rows_out"] == t.num_rows == 240 == len(set(t.column("id").to_pylist()))
    assert not list(clean_out.glob(".staging-*"))


def _shard(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("case, column", [("no_id", "id"), ("no_image", "image"), ("image_str", "image")])
def test_bad_input_schema_exits_2_with_one_line(case, column, models, tmp_path, capsys):
    cols = {"id": pa.array(["a", "b"]), "image": pa.array([b"x", b"y"]), "label": pa.array([0, 1], pa.int64())}
    if case == "no_id":
        cols.pop("id")
    elif case == "no_image":
        cols.pop("image")
    else:
        cols["image"] = pa.array(["x", "y"])
    f = _shard(tmp_path / "in" / "part-0.parquet", pa.table(cols))
    out = tmp_path / "out"
    rc = main(["infer", "--models", str(models[0]), "--input", str(tmp_path / "in"), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(f) in err and f"'{column}'" in err
    assert not out.exists()  # failed before any work


def test_bad_model_or_tta_exits_2(models, inputs, tmp_path, capsys):
    args = ["infer", "--input", str(inputs.clean), "--output", str(tmp_path / "out")]
    assert main([*args, "--models", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([*args, "--models", str(models[0]), "--tta", "identity,hflip"]) == 2
    assert "hflip" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_job_entrypoint_is_the_cli_infer(tmp_path):
    # from another cwd and without the package installed: the script must find the repository itself
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "batch_infer.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--models" in r.stdout and "--actors" in r.stdout


@pytest.mark.parametrize("cpus, gpus, requested", [
    (2, 0, None), (1, 0, None), (16, 0, None), (2, 0, 2), (3.5, 0, None), (8, 2, None), (2, 1, None), (4, 1, 2),
])
def test_actor_plan_always_leaves_room_for_a_task(cpus, gpus, requested):
    p = plan_actors(cpus, gpus, requested)
    assert p.num_actors >= 1 and p.cpus_per_actor > 0 and p.task_cpus > 0
    assert p.num_actors * p.cpus_per_actor + p.task_cpus <= cpus + 1e-9
    if requested:
        assert p.num_actors == requested
    if gpus:
        assert p.gpus_per_actor > 0 and p.num_actors * p.gpus_per_actor <= gpus


def test_actor_plan_on_the_ci_machine():
    p = plan_actors(2, 0)
    assert (p.num_actors, p.cpus_per_actor, p.task_cpus, p.torch_threads) == (1, 1.0, 0.5, 1)
    with pytest.raises(UserError):
        plan_actors(2, 0, 0)


def test_decode_on_the_actors_device_gives_the_cpu_decodes_rows_and_errors(ray_session, models, inputs, mixed_run,
                                                                           tmp_path):
    """`--decode device` on CPU actors (torchvision's CPU decoder standing in for nvJPEG): the same rows, the
    same error strings, the CPU path's exact predictions for non-JPEG rows and close ones for JPEG rows."""
    out = tmp_path / "device"
    m = run_batch_inference(models, inputs.mixed, out, batch_size=32, decode="device", verbose=False)
    assert m["decode"] == "device" and mixed_run[1]["decode"] == "cpu"  # auto on a CPU-only cluster: cpu
    dev, cpu = by_id(read_out(out)), by_id(read_out(mixed_run[0]))
    assert dev.keys() == cpu.keys() and m["rows_out"] == len(inputs.mixed_rows)
    assert {i: r["error"] for i, r in dev.items()} == {i: r["error"] for i, r in cpu.items()}
    jpegs = {i for i, data, _ in inputs.mixed_rows if data[:3] == b"\xff\xd8\xff"}
    for i, r in dev.items():
        if r["error"] is None and i not in jpegs:
            assert r["probs"] == cpu[i]["probs"], i
        elif r["error"] is None:
            assert np.abs(np.subtract(r["probs"], cpu[i]["probs"])).max() < 0.05, i
    assert any(i in jpegs and dev[i]["error"] is None for i in dev)


def test_the_onnxruntime_backend_gives_torchs_rows(ray_session, models, inputs, tmp_path, tiny_digits_dir):
    """`--backend onnxruntime` through the Ray Data job: every row, the same classes, probabilities within
    fp32 rounding of the torch predictor's in fp32 (auto may pick bf16 on this CPU) on the same decoded rows."""
    predictor = load_predictor(models, precision="fp32", backend="torch")
    arrays, errors = prepare_encoded([b for _, b, _ in inputs.good_rows], predictor.input_keys)
    assert not any(errors)
    want = dict(zip((i for i, _, _ in inputs.good_rows), predictor.predict_uint8(arrays)))
    m = run_batch_inference(models, inputs.clean, tmp_path / "ort", batch_size=32, backend="onnxruntime",
                            verbose=False)
    assert (m["backend"], m["precision"]) == ("onnxruntime", "fp32")
    got = by_id(read_out(tmp_path / "ort"))
    assert got.keys() == want.keys() and m["rows_out"] == len(inputs.good_rows)
    for i, r in got.items():
        assert r["pred"] == int(want[i].argmax()) and r["error"] is None, i
        assert np.abs(np.array(r["probs"]) - want[i]).max() <= 1e-4, i
    # int8, calibrated on a dataset's validation split: every row, probabilities near fp32's, the dataset recorded
    m = run_batch_inference(models, inputs.clean, tmp_path / "int8", batch_size=32, precision="int8",
                            calibration=tiny_digits_dir, verbose=False)
    assert (m["backend"], m["precision"], m["calibration"]) == ("onnxruntime", "int8", str(tiny_digits_dir))
    got = by_id(read_out(tmp_path / "int8"))
    assert got.keys() == want.keys()
    diff = max(np.abs(np.array(r["probs"]) - want[i]).max() for i, r in got.items())
    assert 1e-4 < diff <= 0.05
