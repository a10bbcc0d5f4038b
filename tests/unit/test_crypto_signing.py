"""ML-DSA-65 signing: interoperability with dilithium-py (an independent pure-Python
FIPS 204 implementation) in both directions, context separation, backend selection."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from dilithium_py.ml_dsa import ML_DSA_65

from qflare.crypto import (
    CryptoUnavailable,
    context_for,
    get_backend,
    signing_key_from_seed,
    verify,
)
from qflare.crypto.signing import PUBLIC_KEY_SIZE, SIGNATURE_SIZE

SEEDS = [bytes(32), bytes(range(32)), hashlib.sha256(b"qflare").digest()]
MESSAGES = [b"", b"x", b"update body digest" * 50]


@pytest.mark.parametrize("seed", SEEDS, ids=["zero", "counting", "sha256"])
def test_same_seed_gives_same_public_key_as_dilithium_py(seed: bytes) -> None:
    pk, _ = ML_DSA_65.key_derive(seed)
    assert signing_key_from_seed(seed).public_key == pk
    assert len(pk) == PUBLIC_KEY_SIZE


@pytest.mark.parametrize("message", MESSAGES, ids=["empty", "one", "long"])
def test_cryptography_signature_verifies_in_dilithium_py(message: bytes) -> None:
    key = signing_key_from_seed(SEEDS[2])
    pk, _ = ML_DSA_65.key_derive(SEEDS[2])
    ctx = context_for("update")
    sig = key.sign(message, ctx)
    assert len(sig) == SIGNATURE_SIZE
    assert ML_DSA_65.verify(pk, message, sig, ctx=ctx)
    assert not ML_DSA_65.verify(pk, message, sig, ctx=context_for("model.published"))
    assert not ML_DSA_65.verify(pk, message + b"!", sig, ctx=ctx)


@pytest.mark.parametrize("message", MESSAGES, ids=["empty", "one", "long"])
def test_dilithium_py_signature_verifies_in_cryptography(message: bytes) -> None:
    pk, sk = ML_DSA_65.key_derive(SEEDS[1])
    ctx = context_for("round.verdict")
    sig = ML_DSA_65.sign(sk, message, ctx=ctx)
    assert verify(pk, sig, message, ctx)
    assert not verify(pk, sig, message, context_for("round.closed"))
    forged = bytearray(sig)
    forged[100] ^= 1
    assert not verify(pk, bytes(forged), message, ctx)


def test_deterministic_dilithium_signature_matches_known_length_and_rejects_other_key() -> None:
    pk, sk = ML_DSA_65.key_derive(SEEDS[0])
    sig = ML_DSA_65.sign(sk, b"m", ctx=b"c", deterministic=True)
    other = signing_key_from_seed(SEEDS[1]).public_key
    assert verify(pk, sig, b"m", b"c")
    assert not verify(other, sig, b"m", b"c")


def test_verify_rejects_garbage_public_key_and_signature_without_raising() -> None:
    key = signing_key_from_seed(SEEDS[0])
    sig = key.sign(b"m", b"c")
    assert not verify(b"\x00" * 10, sig, b"m", b"c")
    assert not verify(key.public_key, sig[:-1], b"m", b"c")


def test_context_strings_are_per_kind_and_bounded() -> None:
    assert context_for("update") == b"qflare/v1/update"
    with pytest.raises(ValueError, match="over 255"):
        context_for("k" * 300)


def test_unknown_backend_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="unknown signature backend"):
        get_backend("nope")


def test_oqs_backend_without_liboqs_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from qflare.crypto import signing

    monkeypatch.setattr(signing, "find_liboqs", lambda: None)
    monkeypatch.delitem(signing._BACKENDS, "oqs", raising=False)
    with pytest.raises(CryptoUnavailable, match="liboqs is not installed"):
        get_backend("oqs")


def test_importing_qflare_never_imports_oqs() -> None:
    # A fresh interpreter: importing oqs without liboqs would start a git clone + build.
    code = (
        "import sys, qflare.crypto, qflare.messages; "
        "from qflare.crypto import get_backend, CryptoUnavailable\n"
        "try: get_backend('oqs')\nexcept CryptoUnavailable: pass\n"
        "import qflare.crypto.signing as s\n"
        "print('oqs' in sys.modules, s.find_liboqs() is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    if out[1] == "True":  # no liboqs here: oqs must not have been imported
        assert out[0] == "False"
