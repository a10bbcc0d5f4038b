"""Ingest's per-update cost against the crypto it cannot avoid, measured in one run.

For a sealed update of ``--params`` float32 parameters, ingest must at least: hash the
received body (SHA-256, binding it to the signature), verify one ML-DSA-65 signature and the
sender's certificate, decrypt the body (ML-KEM-768 + X25519 decapsulation, AES-256-GCM),
hash the re-signed body it publishes and sign it. That is the *floor*, timed here with the
same primitives on the same bytes. The *pipeline* is what the service's handler runs per
update, minus the broker, through the same functions: ``open_envelope`` (with unsealing),
the round checks, the tensor checks and the norm, and encoding + signing the
``update.accepted`` that names the update's stream offset. The ratio
pipeline / floor says what the decoding, validation and re-encoding add on top of the
cryptography (1.0 = nothing). Trials alternate floor and pipeline so machine noise hits
both.

    python benchmarks/ingest.py [--params 1000000] [--updates 8] [--trials 3]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import numpy as np

from qflare.crypto.pki import canonical
from qflare.crypto.sealing import seal
from qflare.crypto.signing import context_for, verify
from qflare.crypto.testing import make_federation
from qflare.messages import TensorSpec, Update, encode, open_envelope
from qflare.services.ingest.core import (
    OpenRound,
    RoundBook,
    accepted_update,
    check_tensors,
    check_update_round,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()

    fed = make_federation(clients=args.updates)
    ingest = fed["ingest"]
    trust = fed.trust()
    rows = max(1, args.params // 1000)
    rng = np.random.default_rng(0)
    tensors = [
        {"w": rng.standard_normal((rows, 1000)).astype(np.float32) * 0.01} for _ in fed.clients
    ]
    updates = [
        encode(
            "update",
            Update(base_version=0, num_samples=10, tensors=t),
            fed[c],
            job="b",
            round=1,
            seal_to=ingest.cert,
        )
        for c, t in zip(fed.clients, tensors, strict=True)
    ]
    book = RoundBook()  # what ingest learns from the round's round.opened
    info = OpenRound(
        job="b",
        round=1,
        base_version=0,
        tensors=(TensorSpec(name="w", dtype="float32", shape=[rows, 1000]),),
        participants=frozenset(fed.clients),
    )
    book.opened(info)
    # the floor's inputs: the same bytes, sealed the same way
    plain = [
        encode(
            "update", Update(base_version=0, num_samples=10, tensors=t), fed[c], job="b", round=1
        )
        for c, t in zip(fed.clients, tensors, strict=True)
    ]
    aad = b"qflare/v1/seal-aad" + canonical({"x": 1})
    sealed = [seal(ingest.kem.public_key, p, aad) for p in plain]
    header = canonical({"kind": "update", "body_digest": b"\0" * 32})
    sig = fed[fed.clients[0]].key.sign(header, context_for("update"))
    pub = fed[fed.clients[0]].cert.public_key

    def floor() -> float:
        t0 = time.perf_counter()
        for data, box in zip(updates, sealed, strict=True):
            hashlib.sha256(data).digest()  # bind received body
            verify(pub, sig, header, context_for("update"))  # sender's signature
            trust.verify_certificate(fed[fed.clients[0]].cert.to_bytes())  # its certificate
            body = ingest.kem.open(box, aad)  # KEM + AES-GCM
            hashlib.sha256(body).digest()  # re-signed body hash
            ingest.key.sign(header, context_for("update.accepted"))  # re-sign
        return time.perf_counter() - t0

    def pipeline() -> float:
        t0 = time.perf_counter()
        for offset, data in enumerate(updates):
            env = open_envelope(data, trust, expect_kind="update", kem_key=ingest.kem)
            got = check_update_round(book, env, time.time())
            check_tensors(got, env.body.tensors)
            encode("update.accepted", accepted_update(env, offset), ingest, job="b", round=1)
        return time.perf_counter() - t0

    floor()
    pipeline()  # warm caches (certificate cache, allocator)
    fl, pl = [], []
    for _ in range(args.trials):
        fl.append(floor())
        pl.append(pipeline())
    f, p = statistics.median(fl), statistics.median(pl)
    mb = args.updates * rows * 1000 * 4 / 1e6
    print(
        f"ingest, {args.updates} sealed updates of {rows * 1000} float32 params ({mb / args.updates:.1f} MB each), "
        f"median of {args.trials} trials"
    )
    print(
        f"  floor (hash, verify, unseal, hash, sign): {f / args.updates * 1e3:8.2f} ms/update  {mb / f:7.0f} MB/s"
    )
    print(
        f"  ingest pipeline (no broker):               {p / args.updates * 1e3:8.2f} ms/update  {mb / p:7.0f} MB/s"
    )
    print(f"  ratio pipeline / floor: {p / f:.2f}x")


if __name__ == "__main__":
    main()
