"""The stop request (imgcls_dist/preemption.py): SIGTERM to the driver sets a flag every worker can read, a
worker's poll never waits for it, and the grace ends a process that does not reach its safe point in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from imgcls_dist.errors import Stopped
from imgcls_dist.preemption import StopPoller, new_flag, stop_on_sigterm, stop_requested


def test_sigterm_sets_the_flag_workers_read_and_the_handler_is_restored(ray_session):
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm("job", grace_s=60) as req:
        poller = StopPoller(req.flag, interval_s=0)
        for _ in range(20):
            assert poller.poll() is None
            time.sleep(0.01)
        assert stop_requested(req.flag) is None
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in this (main) thread at once
        assert req.reason == "SIGTERM"
        deadline = time.time() + 10
        while poller.poll() is None:
            assert time.time() < deadline, "the poll never saw the request"
            time.sleep(0.01)
        assert poller.reason == "SIGTERM" == stop_requested(req.flag)
    assert signal.getsignal(signal.SIGTERM) is before  # and the grace timer is cancelled: this process lives on


def test_the_flag_lives_on_the_drivers_node_and_a_lost_one_reads_as_no_stop(ray_session):
    import ray
    from ray.util.state import list_actors

    flag = new_flag()
    assert ray.get(flag.get.remote()) is None
    deadline = time.time() + 30
    gcs = ray.get_runtime_context().gcs_address
    while not (states := [a for a in list_actors(address=gcs, filters=[("class_name", "=", "StopFlag")])
                          if a.actor_id == flag._actor_id.hex()]):
        assert time.time() < deadline, "the state API never listed the flag actor"
        time.sleep(0.2)
    assert states[0].node_id == ray.get_runtime_context().get_node_id()
    ray.kill(flag)
    assert stop_requested(flag) is None
    poller = StopPoller(flag, interval_s=0)
    for _ in range(200):  # the first poll sends the read, a later one finds it failed
        assert poller.poll() is None
        time.sleep(0.01)


def test_no_flag_means_never_stop():
    assert StopPoller(None).poll() is None and stop_requested(None) is None


SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import ray
    from imgcls_dist.preemption import stop_on_sigterm
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    with stop_on_sigterm("job", grace_s=float(sys.argv[1])):
        for _ in range(int(sys.argv[2])):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        time.sleep(60)  # a safe point never reached
""")


def _run(ray_session, grace_s: float, signals: int) -> tuple[int, str, float]:
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(grace_s), str(signals)], env=env, capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stderr, time.perf_counter() - t0


def test_the_grace_ends_a_process_that_never_reaches_its_safe_point(ray_session):
    code, err, _ = _run(ray_session, grace_s=1.0, signals=1)
    assert code == Stopped.exit_code, err
    assert "job: SIGTERM received" in err and "job: the grace of 1 s ran out" in err


def test_a_second_sigterm_ends_the_process_at_once(ray_session):
    code, err, _ = _run(ray_session, grace_s=300.0, signals=2)
    assert code == Stopped.exit_code, err
    assert "job: second SIGTERM, exiting now" in err and "ran out" not in err


def test_a_stopped_bulk_job_reads_nothing_more(ray_session, tmp_path):
    """The bulk job's read tasks: a unit's rows while the flag is clear, none once it is set (the predictor
    actors check the same flag before each batch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from imgcls_dist.batch import parts

    f = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "image": [b"x"] * 10}), f)
    unit = parts.Unit(file=0, first=0, last=0, offset=0, wanted=((0, 10),), rows=10, bytes=1)
    flag = new_flag()
    assert sum(t.num_rows for t in parts.read_unit(str(f), unit, ["id", "image"], flag)) == 10
    ray.get(flag.set.remote("SIGTERM"))
    assert list(parts.read_unit(str(f), unit, ["id", "image"], flag)) == []


def test_a_stopped_bulk_job_predicts_nothing_more(ray_session, tmp_path):
    """The predictor actor UDF: once the flag is set, a batch passes through as no rows (of the output schema
    with positions), so the rows already predicted reach the write stage at once."""
    import pyarrow as pa
    import ray
    from helpers.model_files import save_model

    from imgcls_dist.batch import parts

    flag = new_flag()
    ray.get(flag.set.remote("SIGTERM"))
    actor = parts.PositionedPredictActor([str(save_model(tmp_path / "m"))], ["identity"], None, "mean", None, 8, 1,
                                         False, stop_flag=flag)
    out = actor(pa.table({"id": ["a", "b"], parts.POS_FILE: pa.array([0, 0], pa.int32()),
                          parts.POS_ROW: pa.array([0, 1], pa.int64())}))
    assert out.num_rows == 0 and out.schema.names[-2:] == [parts.POS_FILE, parts.POS_ROW]
