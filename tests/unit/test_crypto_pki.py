"""Certificates, CA, revocation lists, trust store, key files and `qflare provision`."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

import pytest

from qflare.cli import main
from qflare.crypto import (
    Certificate,
    CertificateAuthority,
    Federation,
    Identity,
    RevocationList,
    TrustRejected,
    TrustStore,
    generate_signing_key,
    load_ca,
    provision,
    revoke,
)
from qflare.crypto.keystore import signing_key_from_pem, signing_key_to_pem
from qflare.messages.errors import Reason


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("test-ca")


def _issue(ca: CertificateAuthority, holder: str = "client-1", **kw: object) -> Certificate:
    return ca.issue(holder, "client", generate_signing_key().public_key, **kw)  # type: ignore[arg-type]


def _reason(fn, *args, **kw) -> Reason:  # type: ignore[no-untyped-def]
    with pytest.raises(TrustRejected) as exc:
        fn(*args, **kw)
    return Reason(exc.value.code)


def test_issued_certificate_verifies_and_round_trips(ca: CertificateAuthority) -> None:
    cert = _issue(ca)
    again = Certificate.from_bytes(cert.to_bytes())
    assert again == cert
    trust = TrustStore(ca.cert, ca.revocation_list())
    assert trust.verify_certificate(cert.to_bytes()).id == "client-1"


def test_certificate_of_another_ca_is_unknown_signer(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create("test-ca")  # same name, different key
    cert = _issue(other)
    assert _reason(TrustStore(ca.cert).verify_certificate, cert) is Reason.UNKNOWN_SIGNER


def test_altered_certificate_is_unknown_signer(ca: CertificateAuthority) -> None:
    cert = _issue(ca)
    from dataclasses import replace

    promoted = replace(cert, role="aggregator")
    assert _reason(TrustStore(ca.cert).verify_certificate, promoted) is Reason.UNKNOWN_SIGNER


def test_garbled_certificate_is_unknown_signer(ca: CertificateAuthority) -> None:
    raw = _issue(ca).to_bytes()
    for bad in (raw[:100], b"\xc1" + raw[1:], b"", raw + b"\x00"):
        assert _reason(TrustStore(ca.cert).verify_certificate, bad) is Reason.UNKNOWN_SIGNER


def test_expired_and_not_yet_valid(ca: CertificateAuthority) -> None:
    trust = TrustStore(ca.cert)
    assert _reason(trust.verify_certificate, _issue(ca, valid_days=-1)) is Reason.EXPIRED
    cert = _issue(ca, valid_days=1)
    assert _reason(trust.verify_certificate, cert, now=cert.not_after) is Reason.EXPIRED
    future = _issue(ca, now=time.time() + 86400 * 10)
    assert _reason(trust.verify_certificate, future) is Reason.NOT_YET_VALID


def test_revocation_and_crl_numbers(ca: CertificateAuthority) -> None:
    cert, other = _issue(ca), _issue(ca, "client-2")
    crl1 = ca.revocation_list()
    trust = TrustStore(ca.cert, crl1)
    trust.verify_certificate(cert)
    crl2 = ca.revoke(crl1, cert)
    assert crl2.number == crl1.number + 1 and cert in crl2
    assert trust.update_crl(crl2)
    assert _reason(trust.verify_certificate, cert) is Reason.REVOKED
    trust.verify_certificate(other)
    assert not trust.update_crl(crl1), "an older list must not undo a revocation"
    assert _reason(trust.verify_certificate, cert) is Reason.REVOKED
    assert RevocationList.from_bytes(crl2.to_bytes()) == crl2


def test_crl_names_the_revoked_holders(ca: CertificateAuthority) -> None:
    import msgpack

    cert = _issue(ca, "client-7")
    empty = ca.revocation_list()
    assert "holders" not in msgpack.unpackb(empty.to_bytes()), "no holders: the old bytes"
    assert RevocationList.from_bytes(empty.to_bytes()).holders == frozenset()
    crl = ca.revoke(empty, cert)
    assert crl.holders == {"client-7"}
    crl = ca.revoke(crl, b"\x01" * 16, holders=frozenset({"client-8"}))
    assert crl.holders == {"client-7", "client-8"} and len(crl.serials) == 2
    assert RevocationList.from_bytes(crl.to_bytes()) == crl
    trust = TrustStore(ca.cert)
    assert trust.update_crl(crl)  # the CA signed the holders with the serials
    # the holders are signed: another list of them does not verify
    fields = msgpack.unpackb(crl.to_bytes())
    fields["holders"] = ["client-7"]
    forged = RevocationList.from_bytes(msgpack.packb(dict(sorted(fields.items()))))
    assert _reason(TrustStore(ca.cert).update_crl, forged) is Reason.BAD_SIGNATURE
    # an empty holders list on the wire is a second encoding of a list without it
    fields = msgpack.unpackb(empty.to_bytes())
    fields["holders"] = []
    padded = msgpack.packb(dict(sorted(fields.items())))
    assert _reason(RevocationList.from_bytes, padded) is Reason.MALFORMED
    fields["holders"] = [b"client-7"]
    assert _reason(RevocationList.from_bytes, msgpack.packb(fields)) is Reason.MALFORMED


def test_crl_from_another_ca_is_refused(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create("test-ca")
    trust = TrustStore(ca.cert)
    assert _reason(trust.update_crl, other.revocation_list(number=99)) is Reason.BAD_SIGNATURE
    with pytest.raises(ValueError):
        TrustStore(ca.cert, other.revocation_list())


def test_trust_store_refuses_a_non_ca_anchor(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="not a self-signed CA"):
        TrustStore(_issue(ca))


def test_issue_checks_its_arguments(ca: CertificateAuthority) -> None:
    pk = generate_signing_key().public_key
    with pytest.raises(ValueError, match="role"):
        ca.issue("x", "root", pk)
    with pytest.raises(ValueError, match="invalid id"):
        ca.issue("../etc", "client", pk)
    with pytest.raises(ValueError, match="1952"):
        ca.issue("x", "client", pk[:-1])


def test_signing_key_pem_is_pkcs8_and_encrypted() -> None:
    key = generate_signing_key()
    pem = signing_key_to_pem(key, b"pw")
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert signing_key_from_pem(pem, b"pw").public_key == key.public_key
    with pytest.raises((ValueError, TypeError)):
        signing_key_from_pem(pem, b"wrong")
    with pytest.raises((ValueError, TypeError)):
        signing_key_from_pem(pem, None)
    plain = signing_key_to_pem(key)
    assert plain.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_provision_layout_passphrase_and_revoke(tmp_path: Path) -> None:
    fed = provision(tmp_path, 3, passphrase=b"s3cret", expiry_days=30)
    assert sorted(fed.clients) == ["client-000", "client-001", "client-002"]
    assert {"ingest", "detector", "aggregator", "accountant", "alerting", "operator"} <= set(
        fed.services
    )
    kit = fed.clients["client-001"]
    for name in ("cert.qc", "key.pem", "kem.pem", "ca.qc", "crl.qrl", "ingest.qc"):
        assert (kit / name).is_file(), name
    assert stat.S_IMODE(os.stat(kit / "key.pem").st_mode) == 0o600
    assert b"ENCRYPTED" in (kit / "key.pem").read_bytes()
    with pytest.raises((ValueError, TypeError)):
        Identity.load(kit)  # no passphrase
    me = Federation.at(tmp_path).identity("client-001", b"s3cret")
    assert me.role == "client" and me.kem is not None
    assert me.cert.not_after - me.cert.not_before <= 30 * 86400 + 300
    trust = fed.trust()
    trust.verify_certificate(me.cert)
    crl = revoke(tmp_path, ["client-001"], b"s3cret")
    assert me.cert in crl
    from qflare.crypto import load_trust

    for d in (tmp_path / "ca", kit, fed.services["ingest"]):
        assert _reason(load_trust(d).verify_certificate, me.cert) is Reason.REVOKED
    load_trust(kit).verify_certificate(fed.identity("client-000", b"s3cret").cert)
    assert load_ca(tmp_path, b"s3cret").cert == trust.ca
    with pytest.raises(FileExistsError):
        provision(tmp_path, 1)


def test_revoke_by_serial_names_the_holder(tmp_path: Path) -> None:
    fed = provision(tmp_path, 2)
    serial = Federation.at(tmp_path).identity("client-001").cert.serial
    crl = revoke(tmp_path, [serial.hex()])
    assert crl.holders == {"client-001"}
    crl = revoke(tmp_path, [b"\x02" * 16])  # a serial the CA did not issue: no holder
    assert crl.holders == {"client-001"} and len(crl.serials) == 2
    kit = RevocationList.from_bytes((fed.clients["client-000"] / "crl.qrl").read_bytes())
    assert kit == crl


def test_revoke_unknown_target_is_a_configuration_error(tmp_path: Path) -> None:
    provision(tmp_path, 1)
    with pytest.raises(ValueError, match="neither an issued id"):
        revoke(tmp_path, ["nobody"])


def test_cli_provision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QFLARE_TEST_PASS", "pw")
    out = tmp_path / "fed"
    assert (
        main(
            [
                "provision",
                "--out",
                str(out),
                "--clients",
                "2",
                "--passphrase-env",
                "QFLARE_TEST_PASS",
                "--expiry-days",
                "7",
            ]
        )
        == 0
    )
    assert "encrypted" in capsys.readouterr().out
    ident = Federation.at(out).identity("client-001", b"pw")
    assert ident.cert.not_after - time.time() < 7 * 86400 + 60
    assert main(["provision", "--out", str(out), "--clients", "2"]) == 2
    assert "exists" in capsys.readouterr().err
    monkeypatch.delenv("QFLARE_TEST_PASS")
    assert (
        main(
            [
                "provision",
                "--out",
                str(tmp_path / "x"),
                "--clients",
                "1",
                "--passphrase-env",
                "QFLARE_TEST_PASS",
            ]
        )
        == 2
    )


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ANCHOR = CertificateAuthority.create("fuzz-ca")
_TRUST = TrustStore(_ANCHOR.cert, _ANCHOR.revocation_list())
_CERT = _ANCHOR.issue("c", "client", generate_signing_key().public_key).to_bytes()


@settings(max_examples=200, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=512),
        st.tuples(st.integers(0, len(_CERT) - 1), st.integers(0, 255)).map(
            lambda e: _CERT[: e[0]] + bytes([e[1]]) + _CERT[e[0] + 1 :]
        ),
    )
)
def test_random_or_mutated_certificates_raise_only_message_rejected(data: bytes) -> None:
    if data == _CERT:
        return
    with pytest.raises(TrustRejected):
        _TRUST.verify_certificate(data)
    with contextlib.suppress(TrustRejected):
        RevocationList.from_bytes(data)


def test_non_canonical_certificate_encoding_is_refused(ca: CertificateAuthority) -> None:
    import msgpack

    fields = msgpack.unpackb(_issue(ca).to_bytes())
    reordered = msgpack.packb(dict(reversed(list(fields.items()))))  # same content
    assert _reason(Certificate.from_bytes, reordered) is Reason.MALFORMED
    assert _reason(TrustStore(ca.cert).verify_certificate, reordered) is Reason.UNKNOWN_SIGNER
