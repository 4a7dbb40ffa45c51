"""Ray's console noise: what the filters drop, what they keep, and that the job's own processes get them."""

import io
import logging

from imgcls_dist.console import NO_TRACEBACK, quiet_ray_console

COORDINATOR = next(iter(NO_TRACEBACK))


def _emit(logger: str, msg: str) -> str:
    """What a handler on `logger` prints for a warning logged with the exception being handled."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        try:
            raise TimeoutError("Get timed out: some object(s) not ready.")
        except TimeoutError:
            log.warning(msg, exc_info=True)
    finally:
        log.removeHandler(handler)
    return out.getvalue()


def test_the_coordinator_warning_keeps_its_line_and_loses_its_traceback():
    quiet_ray_console()
    text = _emit(COORDINATOR, "Failed to send resource request for train-1. If this only happens transiently ...")
    assert text.startswith("Failed to send resource request for train-1") and "Traceback" not in text
    # Anything else on that logger, and the same words on another logger, keep their tracebacks.
    assert "Traceback" in _emit(COORDINATOR, "Something else went wrong")
    assert "Traceback" in _emit("imgcls_dist.somewhere", "Failed to send resource request for train-1")


def test_the_token_notice_is_dropped_and_other_warnings_stay():
    quiet_ray_console()
    auth = "ray._private.authentication.authentication_token_setup"
    assert _emit(auth, "Token authentication is enabled for this Ray cluster.") == ""
    assert "Token file is unreadable" in _emit(auth, "Token file is unreadable")


def test_the_jobs_ray_processes_run_the_setup_hook(ray_session):
    """Train's controller is one of the job's worker processes: the hook must have run there."""

    @ray_session.remote(num_cpus=0)
    def worker_view(logger: str) -> str:
        # Self-contained: this test module is not importable in Ray's workers.
        import io
        import logging

        out = io.StringIO()
        log = logging.getLogger(logger)
        log.addHandler(logging.StreamHandler(out))
        try:
            raise TimeoutError("Get timed out")
        except TimeoutError:
            log.warning("Failed to cancel resource request for train-2.", exc_info=True)
        return out.getvalue()

    text = ray_session.get(worker_view.remote(COORDINATOR))
    assert text.startswith("Failed to cancel resource request for train-2") and "Traceback" not in text, text
