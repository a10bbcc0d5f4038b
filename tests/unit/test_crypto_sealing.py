"""Hybrid ML-KEM-768 + X25519 sealing: round trip and every way it must fail."""

from __future__ import annotations

import pytest

from qflare.crypto import KemPrivateKey, TrustRejected, open_sealed, seal
from qflare.crypto.sealing import MLKEM_CIPHERTEXT_SIZE, OVERHEAD, X25519_SIZE, open_for, seal_for


@pytest.fixture(scope="module")
def key() -> KemPrivateKey:
    return KemPrivateKey.generate()


@pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20])
def test_round_trip(key: KemPrivateKey, size: int) -> None:
    plaintext = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    blob = seal(key.public_key, plaintext, b"header")
    assert len(blob) == len(plaintext) + OVERHEAD
    assert open_sealed(key, blob, b"header") == plaintext
    assert plaintext not in blob or size < 4


def test_two_seals_of_the_same_plaintext_differ(key: KemPrivateKey) -> None:
    assert seal(key.public_key, b"same", b"") != seal(key.public_key, b"same", b"")


@pytest.mark.parametrize(
    "offset",
    [0, MLKEM_CIPHERTEXT_SIZE - 1, MLKEM_CIPHERTEXT_SIZE, MLKEM_CIPHERTEXT_SIZE + X25519_SIZE, -1],
    ids=["mlkem-ct", "mlkem-ct-end", "x25519-ct", "aes-ct", "tag"],
)
def test_tampering_anywhere_fails(key: KemPrivateKey, offset: int) -> None:
    blob = bytearray(seal(key.public_key, b"secret update", b"hdr"))
    blob[offset] ^= 0x01
    with pytest.raises(TrustRejected) as exc:
        open_sealed(key, bytes(blob), b"hdr")
    assert exc.value.code == "UNSEAL_FAILED"


def test_wrong_key_fails(key: KemPrivateKey) -> None:
    blob = seal(key.public_key, b"secret", b"hdr")
    with pytest.raises(TrustRejected) as exc:
        open_sealed(KemPrivateKey.generate(), blob, b"hdr")
    assert exc.value.code == "UNSEAL_FAILED"


def test_wrong_associated_data_fails(key: KemPrivateKey) -> None:
    blob = seal(key.public_key, b"secret", b"header of envelope A")
    with pytest.raises(TrustRejected) as exc:
        open_sealed(key, blob, b"header of envelope B")
    assert exc.value.code == "UNSEAL_FAILED"


def test_truncated_blob_fails(key: KemPrivateKey) -> None:
    blob = seal(key.public_key, b"secret", b"")
    for cut in (0, 10, OVERHEAD - 1, len(blob) - 1):
        with pytest.raises(TrustRejected) as exc:
            open_sealed(key, blob[:cut], b"")
        assert exc.value.code == "UNSEAL_FAILED"


def test_bad_recipient_key_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="1216 bytes"):
        seal(b"short", b"x", b"")


def test_pem_round_trip_with_passphrase(key: KemPrivateKey) -> None:
    pem = key.to_pem(b"pass")
    assert b"ENCRYPTED PRIVATE KEY" in pem
    again = KemPrivateKey.from_pem(pem, b"pass")
    assert again.public_key == key.public_key
    with pytest.raises((ValueError, TypeError)):
        KemPrivateKey.from_pem(pem, b"wrong")


# -- one encryption, several readers (seal_for / open_for) ------------------------------------
def test_sealed_for_several_readers_opens_for_each_and_no_one_else() -> None:
    readers = [KemPrivateKey.generate() for _ in range(3)]
    outsider = KemPrivateKey.generate()
    blob = seal_for([r.public_key for r in readers], b"update bytes", b"header")
    for r in readers:
        assert open_for(r, blob, b"header") == b"update bytes"
    with pytest.raises(TrustRejected) as exc:
        open_for(outsider, blob, b"header")
    assert exc.value.code == "UNSEAL_FAILED"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # ciphertext / tag
        lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:],  # the first reader's wrapped key
        lambda b: b[:-20],  # truncated
        lambda b: bytes([0]) + b[1:],  # no readers
        lambda b: bytes([200]) + b[1:],  # more readers than bytes
        lambda b: b"",
    ],
    ids=["ciphertext", "wrapped-key", "truncated", "zero-readers", "reader-count", "empty"],
)
def test_tampered_sealed_for_body_is_refused(tamper) -> None:  # type: ignore[no-untyped-def]
    reader = KemPrivateKey.generate()
    blob = seal_for([reader.public_key, KemPrivateKey.generate().public_key], b"x" * 64, b"h")
    with pytest.raises(TrustRejected) as exc:
        open_for(reader, tamper(blob), b"h")
    assert exc.value.code == "UNSEAL_FAILED"


def test_sealed_for_binds_the_associated_data() -> None:
    reader = KemPrivateKey.generate()
    blob = seal_for([reader.public_key], b"body", b"header of envelope A")
    with pytest.raises(TrustRejected):
        open_for(reader, blob, b"header of envelope B")


def test_sealed_for_refuses_bad_reader_lists() -> None:
    key = KemPrivateKey.generate().public_key
    with pytest.raises(ValueError, match=r"1\.\.16 readers"):
        seal_for([], b"x", b"")
    with pytest.raises(ValueError, match=r"1\.\.16 readers"):
        seal_for([KemPrivateKey.generate().public_key for _ in range(17)], b"x", b"")
    with pytest.raises(ValueError, match="twice"):
        seal_for([key, key], b"x", b"")
    with pytest.raises(ValueError, match="1216 bytes"):
        seal_for([b"short"], b"x", b"")
