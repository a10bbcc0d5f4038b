"""Revocation outside the trust store: the watched list file (qflare.runtime.revocation), the
management-API client's URL handling (qflare.bus.management), the definitions leaving a revoked
client out, and ``qflare revoke`` telling the broker or saying it did not.

The management API itself, on the real broker: tests/e2e/test_revocation_job.py."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qflare.bus.management import Management, ManagementError, redact
from qflare.cli import main
from qflare.crypto import CertificateAuthority, Federation, TrustStore, provision, revoke
from qflare.crypto.pki import RevocationList
from qflare.runtime.revocation import RevocationWatch

LOG = logging.getLogger("test")


def test_watch_adopts_a_changed_file_and_ignores_a_half_written_one(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("t-ca")
    first = ca.revocation_list()
    path = tmp_path / "crl.qrl"
    path.write_bytes(first.to_bytes())
    trust = TrustStore(ca.cert)
    watch = RevocationWatch(path, trust, LOG)
    assert watch.reload() and watch.holders == frozenset()
    assert not watch.reload(), "an unchanged file is not read again"
    cert = ca.issue("client-3", "client", CertificateAuthority.create().key.public_key)
    second = ca.revoke(first, cert)
    data = second.to_bytes()
    path.write_bytes(data[: len(data) // 2])  # qflare revoke caught mid-write
    assert not watch.reload() and watch.holders == frozenset()
    path.write_bytes(data)
    assert watch.reload() and watch.holders == {"client-3"}
    assert cert in trust.crl  # type: ignore[operator]
    path.write_bytes(first.to_bytes())  # an older list never undoes a revocation
    assert not watch.reload() and watch.holders == {"client-3"}
    path.write_bytes(CertificateAuthority.create("t-ca").revoke(first, b"\x01" * 16).to_bytes())
    assert not watch.reload(), "a list another CA signed is ignored"
    path.unlink()
    assert not watch.reload() and watch.holders == {"client-3"}
    assert not RevocationWatch(None, trust, LOG).reload()


def test_definitions_from_a_kit_leave_out_revoked_clients(tmp_path: Path) -> None:
    from qflare.commands.broker import definitions_for_kit

    provision(tmp_path, clients=3)
    revoke(tmp_path, ["client-001"])
    doc = definitions_for_kit(tmp_path, vhost="v", prefix="", example=True)
    users = {u["name"] for u in doc["users"]}
    assert {"client-000", "client-002"} <= users and "client-001" not in users
    assert all(p["user"] != "client-001" for p in doc["permissions"])


def test_management_url() -> None:
    api = Management.from_url("http://ad%40min:p%3Ass@broker.example:15672/mgmt/")
    assert (api.base, api.user, api.password) == (
        "http://broker.example:15672/mgmt",
        "ad@min",
        "p:ss",
    )
    assert Management.from_url("https://a:b@[::1]:15671").base == "https://[::1]:15671"
    for bad, words in (
        ("amqp://a:secret@h:5672/", "must be http"),
        ("http://h:15672/", "names no user and password"),
        ("http://a@h:15672/", "names no user and password"),
        ("h:15672", "must be http"),
    ):
        with pytest.raises(ValueError, match=words) as exc:
            Management.from_url(bad)
        assert "secret" not in str(exc.value)
    assert redact("http://a:secret@h:15672/") == "http://a:***@h:15672/"
    assert redact("http://h:15672/") == "http://h:15672/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_revoke_without_a_management_url_says_the_broker_was_not_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QFLARE_MANAGEMENT_URL", raising=False)
    monkeypatch.delenv("QFLARE_CONFIG", raising=False)
    provision(tmp_path, clients=2)
    assert main(["revoke", "client-001", "--pki-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("revoked client-001: revocation list #2")
    assert len(out) == 2 and out[1].startswith("broker not told (no management URL): client-001")
    assert "rabbitmqctl delete_user client-001" in out[1]
    crl = RevocationList.from_bytes((tmp_path / "services" / "aggregator" / "crl.qrl").read_bytes())
    assert crl.holders == {"client-001"}
    # a service's certificate is revoked, but it has no client broker user to delete
    assert main(["revoke", "detector", "--pki-dir", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_revoke_with_an_unreachable_management_api_fails_after_writing_the_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QFLARE_CONFIG", raising=False)
    provision(tmp_path, clients=2)
    url = f"http://admin:secret@127.0.0.1:{_free_port()}/"
    monkeypatch.setenv("QFLARE_MANAGEMENT_URL", url)
    assert main(["revoke", "client-000", "--pki-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "revocation list written, but the broker was not told" in captured.err
    assert "cannot reach the management API" in captured.err and "secret" not in captured.err
    assert "client-000" in Federation.at(tmp_path).trust().crl.holders  # type: ignore[union-attr]
    # a management URL that is not one is a usage error before anything is written
    bad = ["revoke", "client-001", "--pki-dir", str(tmp_path), "--management-url", "amqp://x:y@h/"]
    assert main(bad) == 2
    assert "client-001" not in Federation.at(tmp_path).trust().crl.holders  # type: ignore[union-attr]


class _Flaky(BaseHTTPRequestHandler):
    """Answers each call with the next status of the server's ``script`` (then 204)."""

    def _answer(self) -> None:
        script: list[int] = self.server.script  # type: ignore[attr-defined]
        self.server.calls.append((self.command, self.path))  # type: ignore[attr-defined]
        status = script.pop(0) if script else 204
        body = b'{"error":"Internal Server Error"}' if status >= 500 else b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Management, ThreadingHTTPServer]]:
    monkeypatch.setattr("qflare.bus.management.SERVER_ERROR_RETRY_S", (0.01, 0.01))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    server.script, server.calls = [], []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Management.from_url(f"http://a:b@127.0.0.1:{server.server_port}/"), server
    finally:
        server.shutdown()
        server.server_close()


def test_a_management_call_that_fails_with_a_5xx_is_made_again(
    flaky_api: tuple[Management, ThreadingHTTPServer],
) -> None:
    api, server = flaky_api
    server.script[:] = [500, 503]  # type: ignore[attr-defined]
    assert api.delete_user("client-000") is True
    assert server.calls == [("DELETE", "/api/users/client-000")] * 3  # type: ignore[attr-defined]
    # a 404 after a 5xx: the failed try may have deleted the user; it is gone either way
    server.script[:] = [500, 404]  # type: ignore[attr-defined]
    assert api.delete_user("client-001") is True
    # a plain 404 is a user that was not there; a connection already gone is no failure
    server.script[:] = [404, 500, 404]  # type: ignore[attr-defined]
    assert api.delete_user("client-002") is False
    assert api.close_connection("c", "revoked") is False


def test_a_management_api_that_keeps_failing_is_an_error_and_a_4xx_is_not_retried(
    flaky_api: tuple[Management, ThreadingHTTPServer],
) -> None:
    api, server = flaky_api
    server.script[:] = [500, 500, 500]  # type: ignore[attr-defined]
    with pytest.raises(ManagementError, match="HTTP 500"):
        api.connections_of("client-000")
    assert len(server.calls) == 3  # type: ignore[attr-defined]
    server.calls.clear()  # type: ignore[attr-defined]
    server.script[:] = [401]  # type: ignore[attr-defined]
    with pytest.raises(ManagementError, match="HTTP 401"):
        api.delete_user("client-000")
    assert len(server.calls) == 1  # type: ignore[attr-defined]
