"""Resumable batch inference: a SIGKILLed infer run is resumed by the next one without predicting durably
written rows again, another job's unfinished run is refused until --fresh, and resume works on s3://."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.ray_procs import ray_worker_processes
from helpers.model_files import digit_rows, save_model, write_input
from helpers.faulty_s3 import FaultyS3
from helpers.ray_procs import sigterm_when, wait_all_cpus_free

from imgcls_dist.cli import main
from imgcls_dist.errors import JobFailed, Stopped, UserError
from imgcls_dist.batch import parts, publish, resume
from imgcls_dist.batch.pipeline import run_batch_inference
from imgcls_dist.batch.publish import prediction_files, read_manifest
from imgcls_dist.predictor.predict import load_predictor
from imgcls_dist.preemption import DEFAULT_GRACE_S
from imgcls_dist.predictor.prepare import prepare_encoded
from imgcls_dist.storage import StorageError, location

ROOT = Path(__file__).resolve().parents[2]
ROWS = 3000


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("resume_models") / "m", "lenet5", 16, seed=3)


@pytest.fixture(scope="module")
def rows(tiny_digits_dir):
    """ROWS rows with unique ids: the digits test split, repeated."""
    base = digit_rows(tiny_digits_dir, "test")
    return [(f"r{k:05d}", base[k % len(base)][1], base[k % len(base)][2]) for k in range(ROWS)]


def staged_rows(out: Path) -> int:
    """Rows durably written so far: footers of the parts in OUT's staging (written atomically, so a part that
    is there is complete; temp files end in .tmp)."""
    n = 0
    for f in out.glob(".staging-*/*.parquet"):
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except (FileNotFoundError, OSError):
            pass  # renamed or deleted meanwhile
    return n


def published(out) -> pa.Table:
    return pa.concat_tables(pq.read_table(f.path, filesystem=f.fs) for f in prediction_files(out))


def assert_every_id_once(t: pa.Table, rows) -> None:
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(rows)
    assert set(ids) == {r[0] for r in rows}


def reference_probs(model: Path, rows, ids: list[str], tta: str | None = None) -> np.ndarray:
    """What a clean run predicts for `ids`: the in-process predictor, no Ray, no resume."""
    pred = load_predictor(model, tta=tta)
    images = dict((r[0], r[1]) for r in rows)
    arrays, errors = prepare_encoded([images[i] for i in ids], pred.input_keys)
    assert not any(errors)
    return pred.predict_uint8(arrays)


def _start_cli_infer(ray_session, model: Path, inp: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "imgcls_dist.cli", "infer", "--models", str(model), "--input", str(inp),
           "--output", str(out), "--batch-size", "32", "--tta", "none"]
    # output to a file, not a pipe: a pipe nobody reads would block the driver once Ray's logs fill it
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for_dead_jobs_actors(ray_session) -> None:
    """A SIGKILLed driver's actors die when Ray notices its job ended; the rerun must not be sized from (or
    wait behind) them. If Ray has not freed them within a minute, end them by pid and fail."""
    if wait_all_cpus_free(ray_session, timeout=60) >= ray_session.cluster_resources()["CPU"]:
        return
    left = ray_worker_processes("PositionedPredictActor")
    for p in left:
        p.kill()
    pytest.fail(f"the killed run's actors still held CPUs after 60 s ({len(left)} killed by pid)")


def test_killed_run_is_resumed_and_repredicts_only_unwritten_rows(ray_session, model, rows, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_input(inp, rows, rows_per_shard=500)  # 6 files of 4 row groups
    t_start = time.perf_counter()
    proc = _start_cli_infer(ray_session, model, inp, out, tmp_path / "killed.log")
    try:
        deadline = time.time() + 180
        while staged_rows(out) < ROWS // 2:
            assert proc.poll() is None, f"the run ended before half its rows were written:\n" \
                                        f"{(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.time() < deadline, "the run never wrote half its rows"
            time.sleep(0.02)  # a part of 256 rows lands every fraction of a second
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    [staging] = out.glob(".staging-*")
    killed_id = staging.name[len(publish.STAGING_PREFIX):]
    durable = staged_rows(out)  # counted after the kill: this much must never be predicted again
    assert ROWS // 2 <= durable < ROWS and not (out / publish.MANIFEST).exists()
    t_kill = time.perf_counter()
    _wait_for_dead_jobs_actors(ray_session)
    t_free = time.perf_counter()

    t0 = time.perf_counter()
    m = run_batch_inference(model, inp, out, batch_size=32, tta="none", verbose=False)
    rerun_s = time.perf_counter() - t0

    # The rerun adopted everything durable and predicted only the rest (no in-flight slack needed: a part
    # either exists, and is adopted, or does not, and its rows are predicted once).
    assert m["resumed_from"] == killed_id
    assert m["rows_adopted"] >= durable
    assert m["rows_predicted"] == ROWS - m["rows_adopted"] <= ROWS - durable
    assert m["rows_predicted"] > 0 and m["rows_in"] == m["rows_out"] == ROWS
    # ... counted again from the published files themselves, by the run that wrote each
    by_writer = Counter()
    for f in m["files"]:
        by_writer[f["written_by"]] += pq.ParquetFile(out / f["name"]).metadata.num_rows
    assert by_writer == {killed_id: m["rows_adopted"], m["run_id"]: m["rows_predicted"]}

    t = published(out)
    assert_every_id_once(t, rows)
    assert not list(out.glob(".staging-*")) and not list((out / publish.LEASES).glob("*"))
    # Same predictions as a clean run, for rows of both runs.
    sample = []
    for writer in (killed_id, m["run_id"]):
        f = next(f for f in m["files"] if f["written_by"] == writer)
        sample += pq.read_table(out / f["name"], columns=["id"]).column("id").to_pylist()[:150]
    got = {r["id"]: r for r in t.to_pylist()}
    expect = reference_probs(model, rows, sample, tta="none")
    np.testing.assert_allclose([got[i]["probs"] for i in sample], expect, atol=1e-5)
    assert [got[i]["pred"] for i in sample] == expect.argmax(1).tolist()
    print(f"killed at {durable}/{ROWS} durable rows after {t_kill - t_start:.1f}s, its CPUs back after "
          f"{t_free - t_kill:.1f}s; rerun adopted {m['rows_adopted']}, predicted {m['rows_predicted']} in "
          f"{rerun_s:.1f}s; parts {sorted(f['rows'] for f in m['files'])}")


def _one_row_group(inp: Path, rows) -> None:
    """All rows in one file of one row group, as pyarrow writes a table by default."""
    write_input(inp, rows, rows_per_shard=len(rows))
    [f] = inp.glob("*.parquet")
    pq.write_table(pq.read_table(f), f, row_group_size=len(rows))
    assert pq.ParquetFile(f).metadata.num_row_groups == 1


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """A model slow enough on one CPU (seconds for SLOW_ROWS rows) that a signal sent once the first part is
    written often lands while rows are still predicted (parts land seconds behind the predictions, on a loaded
    machine only at the end: then every row is written by the time the signal arrives)."""
    return save_model(tmp_path_factory.mktemp("resume_models") / "slow", "resnet18", 48, seed=3)


SLOW_ROWS = 1500


def test_sigterm_writes_what_is_predicted_and_the_rerun_predicts_the_rest(ray_session, slow_model, rows, tmp_path):
    """SIGTERM mid-run: the driver writes the predicted rows as parts and exits 143 within the grace, without
    publishing; the rerun adopts exactly those rows and predicts the rest. The input is one row group of every
    row, so the parts being bounded by rows (not by row groups) is what lets anything be written before the end.
    That nothing more is read or predicted once asked: test_preemption.py."""
    inp, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "stopped.log"
    rows = rows[:SLOW_ROWS]
    _one_row_group(inp, rows)
    proc = _start_cli_infer(ray_session, slow_model, inp, out, log)
    stop_s = sigterm_when(proc, lambda: staged_rows(out) > 0, log, timeout_s=180, exit_timeout_s=60)
    text = log.read_text()
    assert proc.returncode == Stopped.exit_code, text[-3000:]
    durable = staged_rows(out)
    assert 0 < durable <= SLOW_ROWS and not (out / publish.MANIFEST).exists()  # published by the rerun only
    [line] = [ln for ln in text.splitlines() if "stopped:" in ln]
    assert f"SIGTERM: {durable} of {SLOW_ROWS} rows are written" in line, line
    assert f"the other {SLOW_ROWS - durable}" in line, line
    assert stop_s < DEFAULT_GRACE_S
    [staging] = out.glob(".staging-*")
    stopped_id = staging.name[len(publish.STAGING_PREFIX):]
    _wait_for_dead_jobs_actors(ray_session)

    m = run_batch_inference(slow_model, inp, out, batch_size=32, tta="none", verbose=False)
    assert m["resumed_from"] == stopped_id
    assert (m["rows_adopted"], m["rows_predicted"], m["rows_out"]) == (durable, SLOW_ROWS - durable, SLOW_ROWS)
    assert_every_id_once(published(out), rows)
    limit = 2 * parts.rows_per_part(SLOW_ROWS)  # blocks of at most a part's rows, written once a part has that many
    assert len(m["files"]) >= SLOW_ROWS // limit and max(f["rows"] for f in m["files"]) < limit, m["files"]
    print(f"stopped {stop_s:.1f}s after SIGTERM with {durable}/{SLOW_ROWS} rows written; parts "
          f"{sorted(f['rows'] for f in m['files'])}")


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (the test runs as root, as CI does): a disk that fills up."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_disk_fails_the_job_in_one_line_and_the_rerun_finishes_it(ray_session, model, rows, tmp_path):
    """The output's disk fills up mid-job: one error line naming the file (exit 2), nothing published, only whole
    parts and no temporary files left in staging; once there is room, the same command adopts those parts and
    finishes."""
    inp = tmp_path / "in"
    write_input(inp, rows, rows_per_shard=500)
    with small_disk(tmp_path / "disk", "96k") as resize:
        out, log = tmp_path / "disk" / "out", tmp_path / "full.log"
        proc = _start_cli_infer(ray_session, model, inp, out, log)
        assert proc.wait(300) == StorageError.exit_code  # the output location cannot be used as it is
        err = log.read_text().strip().splitlines()[-1]
        assert re.fullmatch(r"imgcls-dist infer: error: inference job failed: \S+/disk/out/\.staging-\S+\.parquet: "
                            r"\[Errno 28\] No space left on device", err), err
        assert not (out / publish.MANIFEST).exists() and not list(out.glob("*.parquet"))
        [staging] = out.glob(".staging-*")
        staged = list(staging.glob("*.parquet"))
        assert len(parts.read_parts([location(str(f)) for f in staged])) == len(staged)  # every file a whole part
        assert not list(staging.glob(".*.tmp")) and staged_rows(out) < ROWS
        durable = staged_rows(out)
        resize("16m")
        _wait_for_dead_jobs_actors(ray_session)
        m = run_batch_inference(model, inp, out, tta="none", verbose=False)
        assert (m["rows_adopted"], m["rows_out"]) == (durable, ROWS)
        assert_every_id_once(published(out), rows)


@pytest.mark.own_ray
def test_an_object_store_refusing_writes_fails_the_job_in_one_line_and_the_rerun_finishes_it(s3, model, rows,
                                                                                           tmp_path):
    """The object store starts answering part uploads with 500 InternalError mid-job (a real HTTP proxy in front
    of moto): one error line naming the part, nothing published, the parts written before it stay whole; once
    the store answers again, the same command adopts them and finishes. Each run starts its own local Ray, so
    that its workers reach the store through the proxy (a node's workers take its environment)."""
    bucket = s3.bucket("faults")
    write_input(tmp_path / "in", rows, rows_per_shard=500)
    location(f"{bucket}/in").upload(tmp_path / "in")
    proxy = FaultyS3(s3.endpoint)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"AWS_ENDPOINT_URL": proxy.endpoint}
    cmd = [sys.executable, "-m", "imgcls_dist.cli", "infer", "--models", str(model), "--input", f"{bucket}/in",
           "--output", f"{bucket}/out", "--tta", "none"]
    try:
        proxy.fail_puts(r"/\.staging-[^/]+/[^/]+\.parquet", after=2)
        failed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert failed.returncode in (UserError.exit_code, JobFailed.exit_code), failed.stderr[-3000:]
        line = failed.stderr.strip().splitlines()[-1]
        assert re.fullmatch(r"imgcls-dist infer: error: inference job failed: s3://\S+/out/\.staging-\S+\.parquet: "
                            r".*AWS Error INTERNAL_FAILURE.*", line) and len(line) <= 400, line
        assert proxy.refused > 0
        out = location(f"{bucket}/out")
        assert not (out / publish.MANIFEST).exists() and not out.files(".parquet", recursive=False)
        [staging] = publish.staging_dirs(out)
        staged = parts.read_parts(parts.staged_parts(staging))
        assert len(staged) == 2 and len(parts.staged_parts(staging)) == 2  # the two let through, each whole
        proxy.heal()
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        proxy.close()
    m = read_manifest(out)
    assert (m["rows_adopted"], m["rows_out"]) == (sum(p.rows for p in staged), ROWS)
    assert_every_id_once(published(out), rows)


def _crash_at_publish(*_a, **_k):
    raise RuntimeError("simulated crash after every part was written, before publishing")


def _part_files(staging: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in staging.iterdir()}


def test_another_jobs_unfinished_run_is_refused_until_fresh(ray_session, model, rows, tmp_path, monkeypatch,
                                                            capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_input(inp, rows[:600], rows_per_shard=250)
    base = ["infer", "--input", str(inp), "--output", str(out), "--tta", "none"]
    monkeypatch.setattr(publish, "publish", _crash_at_publish)
    with pytest.raises(RuntimeError, match="simulated"):
        main([*base, "--models", str(model)])
    [staging] = out.glob(".staging-*")
    before = _part_files(staging)
    assert resume.FINGERPRINT in before and len(before) >= 3  # the fingerprint and >= 2 parts

    other_model = save_model(tmp_path / "other", "lenet5", 16, seed=9)
    other_input = tmp_path / "in2"
    shutil.copytree(inp, other_input)
    write_input(other_input / "more", rows[600:650])
    cases = {
        "models (member 1": [*base, "--models", str(other_model)],
        f"input files (4 added, e.g. {other_input}/more/part-00000.parquet; 3 gone, e.g. {inp}/part-00000":
            ["infer", "--input", str(other_input), "--output", str(out), "--tta", "none", "--models", str(model)],
        "TTA views (identity -> identity,shift_left)": [*base[:-1], "identity,shift_left", "--models", str(model)],
    }
    capsys.readouterr()
    for what, args in cases.items():
        assert main(args) == 2, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err and "--fresh" in err and staging.name in err, err
        assert _part_files(staging) == before and not (out / publish.MANIFEST).exists()  # nothing mixed in

    # --fresh discards the other job's parts (crashing again before publishing, to leave its own staging)
    with pytest.raises(RuntimeError, match="simulated"):
        main([*base, "--models", str(other_model), "--fresh"])
    [fresh_staging] = out.glob(".staging-*")
    assert fresh_staging != staging and not set(_part_files(fresh_staging)) & (set(before) - {resume.FINGERPRINT})
    monkeypatch.undo()

    # the same job resumes: every row is already written, so nothing is predicted
    m = run_batch_inference(other_model, inp, out, tta="none", verbose=False)
    assert (m["rows_predicted"], m["rows_adopted"], m["rows_out"]) == (0, 600, 600)
    assert m["resumed_from"] == fresh_staging.name[len(publish.STAGING_PREFIX):]
    assert {f["written_by"] for f in m["files"]} == {m["resumed_from"]}
    assert m["models"][0]["path"].startswith(str(other_model))
    assert_every_id_once(published(out), rows[:600])


def test_resume_on_object_storage(ray_session, s3, model, rows, tmp_path, monkeypatch):
    bucket = s3.bucket("resume")
    write_input(tmp_path / "in", rows[:700], rows_per_shard=250)
    location(f"{bucket}/in").upload(tmp_path / "in")
    out = location(f"{bucket}/out")
    monkeypatch.setattr(publish, "publish", _crash_at_publish)
    with pytest.raises(RuntimeError, match="simulated"):
        run_batch_inference(model, f"{bucket}/in", out, tta="none", verbose=False)
    monkeypatch.undo()
    [staging] = publish.staging_dirs(out)
    staged = parts.read_parts(parts.staged_parts(staging))
    assert len(staged) >= 2 and sum(p.rows for p in staged) == 700
    first = {r["id"]: r for p in staged for r in pq.read_table(p.loc.path, filesystem=p.loc.fs).to_pylist()}
    lost = staged[0]
    lost.loc.delete()  # as if the crash had come before this part was written

    m = run_batch_inference(model, f"{bucket}/in", out, tta="none", verbose=False)
    assert (m["rows_predicted"], m["rows_adopted"]) == (lost.rows, 700 - lost.rows)
    assert m["resumed_from"] == staging.name[len(publish.STAGING_PREFIX):]
    t = published(out)
    assert_every_id_once(t, rows[:700])
    got = {r["id"]: r for r in t.to_pylist()}
    np.testing.assert_allclose([got[i]["probs"] for i in first], [first[i]["probs"] for i in first], atol=1e-5)
    assert not publish.staging_dirs(out) and not (out / publish.LEASES).files()
    assert read_manifest(out)["run_id"] == m["run_id"]


def _part(name: str, *ranges) -> parts.Part:
    return parts.Part(location(f"/p/{name}_x.parquet"), sum(e - s for _, s, e in ranges), 0, tuple(ranges))


def test_coverage_refuses_overlaps_and_reports_gaps():
    layout = [parts.FileLayout("/in/a.parquet", 1, 1, (128, 72), (1, 1)), parts.FileLayout("/in/b.parquet", 1, 1,
                                                                                           (50,), (1,))]
    cov = resume.Coverage(layout)
    assert cov.add(_part("r1", (0, 0, 100), (1, 10, 20)))
    assert not cov.add(_part("r2", (0, 99, 150)))  # overlaps r1: a late duplicate is not adopted
    assert not cov.add(_part("r3", (1, 40, 60)))  # beyond the file's rows
    assert not cov.add(_part("r4", (0, 150, 160), (0, 155, 170)))  # overlaps itself
    assert cov.gaps() == {0: [(100, 200)], 1: [(0, 10), (20, 50)]}
    # the read plan covers exactly the gaps, row groups without wanted rows unread
    units = parts.plan_units(layout, cov.gaps(), max_rows=1000)
    assert [(u.file, u.first, u.last, u.rows) for u in units] == [(0, 0, 1, 100), (1, 0, 0, 40)]
    assert [(u.first, u.last) for u in parts.plan_units(layout[:1], {0: [(0, 200)]}, max_rows=100)] == [(0, 0), (1, 1)]
    with pytest.raises(JobFailed, match=r"rows out 110 != rows in 250 \(rows 100-199 of /in/a.parquet"):
        resume.check_exact([_part("r1", (0, 0, 100), (1, 10, 20))], layout, location("/p"))
    with pytest.raises(JobFailed, match="holds rows another part holds"):
        resume.check_exact([_part("r1", (0, 0, 200), (1, 0, 50)), _part("r2", (1, 0, 1))], layout, location("/p"))
