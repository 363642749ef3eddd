"""An operator's first hour, as a new user would go through it, with the real CLI and a real
``cloud serve`` process: ``cloud init`` shows the first admin token once; the coordinator refuses to
listen beyond loopback without TLS; tokens are made, used and revoked with the CLI; a viewer cannot
roll out; contexts carry the URL, token and CA of an https coordinator; and no token ever appears in
the coordinator's log (the test reads it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetloop_cloud.http_api import HttpSettings, HttpTls, start_http_server
from fleetloop_cloud.repositories.records import AuditFilter
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.broker import CertificateAuthority
from tests.fixtures.cloud_serve import cloud_serve

TOKEN = re.compile(r"flt_[A-Za-z0-9_-]{43}")


def cli(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True, text=True,
                          timeout=120, input=stdin, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str, str, Path]]:
    """``cloud init`` then ``cloud serve`` (debug logging into a file): data dir, URL, admin token, log."""
    data = tmp_path / "cloud"
    init = cli("cloud", "init", "--dir", str(data))
    assert init.returncode == 0, init.stderr
    tokens = TOKEN.findall(init.stdout)
    assert len(tokens) == 1 and not TOKEN.search(init.stderr)
    ready, log = tmp_path / "ready.json", tmp_path / "cloud.log"
    args = ["--dir", str(data), "--grpc-port", "0", "--http-port", "0", "--ready-file", str(ready),
            "--log-level", "debug"]  # fmt: skip
    with cloud_serve(args, ready, log) as info:
        yield data, info["http"], tokens[0], log


def test_tokens_roles_and_a_log_without_secrets(served: tuple[Path, str, str, Path]) -> None:
    data, url, admin, log = served
    as_admin = {"FLEETLOOP_CLOUD": url, "FLEETLOOP_TOKEN": admin}
    again = cli("cloud", "init", "--dir", str(data))
    assert again.returncode == 7 and "fleetloop tokens create" in again.stderr
    assert not TOKEN.search(again.stdout)

    made = cli("tokens", "create", "ci-reader", "--role", "viewer", "--expires", "30d", env=as_admin)
    assert made.returncode == 0, made.stderr
    viewer = made.stdout.strip()
    assert TOKEN.fullmatch(viewer) and "shown once" in made.stderr
    as_viewer = {"FLEETLOOP_CLOUD": url, "FLEETLOOP_TOKEN": viewer}
    assert cli("devices", "list", env=as_viewer).returncode == 0
    denied = cli("rollout", "create", "--release", "1.0.0", env=as_viewer)
    assert denied.returncode == 4
    needs = "rollouts.create needs role release-manager or admin; token 'ci-reader' has role viewer"
    assert needs in denied.stderr
    nobody = cli("devices", "list", env={"FLEETLOOP_CLOUD": url, "FLEETLOOP_TOKEN": ""})
    assert nobody.returncode == 4 and "no API token" in nobody.stderr

    # a token sent where it does not belong (a query string, a wrong one) is not echoed or logged
    for path, token in (("/v1/summary?token=" + admin, None), ("/v1/summary", "flt_" + "x" * 43)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(url + path, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 401 and not TOKEN.search(refused.value.read().decode())

    listed = cli("tokens", "list", "-o", "json", env=as_admin)
    roles = {t["name"]: t["role"] for t in json.loads(listed.stdout)}
    assert roles == {"admin": "admin", "ci-reader": "viewer"}
    assert not TOKEN.search(listed.stdout)
    assert cli("tokens", "revoke", "ci-reader", env=as_admin).returncode == 0
    revoked = cli("devices", "list", env=as_viewer)
    assert revoked.returncode == 4 and "'ci-reader' is revoked" in revoked.stderr

    audit = cli("audit", "list", "-o", "json", env=as_admin)
    trail = [(e["actor"], e["action"], e["target"]) for e in json.loads(audit.stdout)]
    assert trail == [("local", "tokens.create", "admin"), ("admin", "tokens.create", "ci-reader"),
                     ("admin", "tokens.revoke", "ci-reader")]  # fmt: skip
    assert cli("audit", "verify", env=as_admin).returncode == 0

    time.sleep(0.5)
    text = log.read_text()
    assert "tokens.create" in text and '"request_id"' in text  # the log is there, with request ids
    for secret in (admin, viewer, "flt_" + "x" * 43):
        assert secret not in text
    assert not TOKEN.search(text)


def test_serve_refuses_other_addresses_without_tls_and_tokens(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cert, key = ca.issue("coordinator", server=True)
    serve = ["cloud", "serve", "--dir", str(tmp_path / "cloud"), "--host", "0.0.0.0"]
    plain = cli(*serve)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        "error: refusing to serve HTTP on 0.0.0.0 without TLS: give --http-cert and --http-key "
        "(a certificate from your CA, like the gRPC port's), or bind 127.0.0.1, or --insecure for a lab"
    ]
    http_only = cli(*serve, "--http-cert", str(cert), "--http-key", str(key))
    assert http_only.returncode == 2 and "devices' gRPC on 0.0.0.0 without mTLS" in http_only.stderr
    tls = ["--http-cert", str(cert), "--http-key", str(key), "--grpc-cert", str(cert), "--grpc-key", str(key),
           "--grpc-ca", str(ca.ca_path)]  # fmt: skip
    no_tokens = cli(*serve, *tls)
    assert no_tokens.returncode == 2
    init = f"no API token exists yet; run 'fleetloop cloud init --dir {tmp_path / 'cloud'}' first"
    assert init in no_tokens.stderr
    assert "Traceback" not in plain.stderr + http_only.stderr + no_tokens.stderr


def test_an_https_coordinator_through_a_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cert, key = ca.issue("coordinator", server=True)
    c = Coordinator(tmp_path / "cloud")
    admin = c.tokens.bootstrap(c.clock()).secret
    server, port = start_http_server(c, "127.0.0.1", 0, HttpSettings(tls=HttpTls(cert, key)))
    env = {"FLEETLOOP_CONFIG": str(tmp_path / "home" / "config.yaml"), "FLEETLOOP_TOKEN": "",
           "FLEETLOOP_CLOUD": ""}  # fmt: skip
    try:
        url = f"https://127.0.0.1:{port}"
        made = cli("config", "set-context", "lab", "--cloud", url, "--ca", str(ca.ca_path), "--token-stdin",
                   env=env, stdin=admin + "\n")  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert (tmp_path / "home" / "config.yaml").stat().st_mode & 0o777 == 0o600
        assert cli("devices", "list", env=env).returncode == 0
        listed = cli("config", "get-contexts", env=env)
        assert "lab" in listed.stdout and admin not in listed.stdout
        # another context without the CA: the certificate is not trusted, said in one line
        cli("config", "set-context", "no-ca", "--cloud", url, env=env)
        assert cli("config", "use-context", "no-ca", env=env).returncode == 0
        untrusted = cli("devices", "list", env=env)
        assert untrusted.returncode == 6 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        assert cli("devices", "list", "--context", "lab", env=env).returncode == 0
        missing = cli("devices", "list", "--context", "prod", env=env)
        assert missing.returncode == 2 and "no context 'prod'" in missing.stderr
    finally:
        server.shutdown()
        c.stop()
        c.close()


def test_insecure_is_a_lab_without_tokens(tmp_path: Path) -> None:
    c = Coordinator(tmp_path / "cloud")
    server, port = start_http_server(c, "127.0.0.1", 0, HttpSettings(insecure=True))
    try:
        env = {"FLEETLOOP_CLOUD": f"http://127.0.0.1:{port}", "FLEETLOOP_TOKEN": ""}
        made = cli("tokens", "create", "x", "--role", "viewer", env=env)
        assert made.returncode == 0, made.stderr
        entry = c.audit.entries(Caller.local(), AuditFilter(kind="tokens"))[-1]
        assert (entry.actor, entry.role, entry.address) == ("anonymous", "admin", "127.0.0.1")
    finally:
        server.shutdown()
        c.stop()
        c.close()
