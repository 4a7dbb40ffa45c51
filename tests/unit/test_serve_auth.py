"""Serve's bearer token: the header check, the token from the environment, and `imgcls-dist serve` refusing a
non-loopback host without one before it starts anything. The HTTP 401s of a running server: tests/ray/test_serve.py."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from imgcls_dist.cli import main
from imgcls_dist.serve.settings import TOKEN_ENV, ServeSettings, authorized, is_loopback, with_env_token


def test_the_bearer_header_must_carry_the_token_exactly():
    token = SecretStr("s3cret")
    assert authorized("Bearer s3cret", token) and authorized("bearer s3cret ", token)
    for header in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
        assert not authorized(header, token), header
    assert authorized(None, None)  # no token: no authentication


def test_the_token_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert with_env_token(ServeSettings(models=["m.pt"])).auth_token.get_secret_value() == "from-env"
    assert with_env_token(ServeSettings(models=["m.pt"], auth_token="given")).auth_token.get_secret_value() == "given"
    monkeypatch.setenv(TOKEN_ENV, "")
    assert with_env_token(ServeSettings(models=["m.pt"])).auth_token is None
    assert "from-env" not in repr(ServeSettings(models=["m.pt"], auth_token="from-env"))  # never printed


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                           ("127.0.0.2", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                           ("myhost.example", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_serve_on_all_interfaces_without_a_token_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve", "--models", "m.pt", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"serve: --host 0.0.0.0 accepts connections from other machines: give a token (${TOKEN_ENV} "
                        "or --auth-token) or say --insecure to serve without one") and "\n" not in err
