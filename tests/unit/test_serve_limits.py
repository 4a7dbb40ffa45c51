"""Serve's request timeout and queue bounds as settings: Serve's own schemas accept what ServeLimits hands them,
the deployments default to ServeLimits' defaults, and `imgcls-dist serve` refuses a bad value in one line before
it starts anything. What a running server answers (408, 503 with Retry-After): tests/ray/test_serve_resilience.py."""

from __future__ import annotations

import pytest

from imgcls_dist.cli import main
from imgcls_dist.serve.settings import (DEFAULT_MAX_ONGOING_REQUESTS, DEFAULT_MAX_QUEUED_REQUESTS,
                                        DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_RETRY_AFTER_S, ServeLimits)


def test_serves_own_schemas_take_the_limits_as_given():
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import DeploymentSchema

    limits = ServeLimits(request_timeout_s=2.5, max_ongoing_requests=3, max_queued_requests=7, retry_after_s=1.5)
    deployment = DeploymentSchema(name="Classifier", **limits.deployment_options())
    assert (deployment.max_ongoing_requests, deployment.max_queued_requests) == (3, 7)
    assert (deployment.backpressure_config.status_code, deployment.backpressure_config.retry_after_s) == (503, 1.5)
    assert HTTPOptions(host="127.0.0.1", **limits.http_options()).request_timeout_s == 2.5


def test_the_deployments_default_to_the_limits_defaults():
    from imgcls_dist.serve.deployment import INGRESS_MAX_QUEUED, Classifier, Ingress

    assert ServeLimits().model_dump() == {"request_timeout_s": DEFAULT_REQUEST_TIMEOUT_S,
                                          "max_ongoing_requests": DEFAULT_MAX_ONGOING_REQUESTS,
                                          "max_queued_requests": DEFAULT_MAX_QUEUED_REQUESTS,
                                          "retry_after_s": DEFAULT_RETRY_AFTER_S}
    assert Classifier.max_ongoing_requests == DEFAULT_MAX_ONGOING_REQUESTS
    assert Classifier.max_queued_requests == DEFAULT_MAX_QUEUED_REQUESTS
    for deployment in (Classifier, Ingress):
        assert deployment.backpressure_config.status_code == 503
        assert deployment.backpressure_config.retry_after_s == DEFAULT_RETRY_AFTER_S
    # the front queues no fewer than the Classifier, so a full queue is the Classifier's (answered in JSON)
    assert Ingress.max_queued_requests == INGRESS_MAX_QUEUED >= DEFAULT_MAX_QUEUED_REQUESTS


@pytest.mark.parametrize("flag,value,field,rule", [
    ("--request-timeout-s", "0", "request_timeout_s", "greater than 0"),
    ("--max-ongoing-requests", "0", "max_ongoing_requests", "greater than or equal to 1"),
    ("--max-queued-requests", "-1", "max_queued_requests", "greater than or equal to 1"),
    ("--retry-after-s", "-2", "retry_after_s", "greater than or equal to 0"),
])
def test_a_bad_limit_stops_serve_in_one_line(flag, value, field, rule, capsys):
    assert main(["serve", "--models", "m.pt", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"serve: {field}: Input should be {rule}") and "\n" not in err, err


def test_the_help_names_each_limits_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--request-timeout-s", f"{DEFAULT_REQUEST_TIMEOUT_S:g}"),
                          ("--max-ongoing-requests", DEFAULT_MAX_ONGOING_REQUESTS),
                          ("--max-queued-requests", DEFAULT_MAX_QUEUED_REQUESTS),
                          ("--retry-after-s", f"{DEFAULT_RETRY_AFTER_S:g}")):
        own_help = out.rsplit(f"{flag} ", 1)[1].split(" --", 1)[0]  # the last mention: its help, after the usage line
        assert f"(default {default})" in own_help, (flag, own_help)
