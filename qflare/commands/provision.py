"""``qflare provision``: create a federation's CA, service identities and client kits."""

from __future__ import annotations

import argparse

from qflare.crypto.keystore import passphrase_from_env
from qflare.crypto.provision import provision


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "provision",
        help="create a CA, a key and certificate per service, and a kit per client",
        description="Writes ca/ (CA certificate, key, revocation list, issued certificates), "
        "services/<role>/ and clients/<id>/ (certificate, ML-DSA-65 key, ML-KEM-768+X25519 "
        "key, CA certificate, revocation list). Keep ca/key.pem offline.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--clients", type=int, required=True, help="number of client kits")
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt every private key (PKCS#8) with the passphrase in env VAR",
    )
    p.add_argument(
        "--expiry-days",
        type=float,
        default=365.0,
        help="validity of service and client certificates (default 365)",
    )
    p.add_argument(
        "--ca-expiry-days",
        type=float,
        default=3650.0,
        help="validity of the CA certificate (default 3650)",
    )
    p.add_argument("--client-prefix", default="client", help="client ids are PREFIX-000, ...")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing federation in --out (invalidates every old kit)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qflare.errors import UsageError

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: is a file; give a folder")
    try:
        passphrase = passphrase_from_env(args.passphrase_env)
        fed = provision(
            args.out,
            args.clients,
            passphrase=passphrase,
            expiry_days=args.expiry_days,
            ca_expiry_days=args.ca_expiry_days,
            client_prefix=args.client_prefix,
            force=args.force,
        )
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    encrypted = "encrypted" if passphrase else "UNENCRYPTED (no --passphrase-env)"
    print(f"CA          {fed.root / 'ca'}  (keep ca/key.pem offline)")
    print(f"services    {', '.join(fed.services)}  under {fed.root / 'services'}")
    print(f"clients     {len(fed.clients)} kits under {fed.root / 'clients'}")
    print(f"private keys {encrypted}")
    return 0
