"""The administrator's two steps around an example run: load a federation's broker
definitions into a virtual host of its own, and remove that vhost and its users afterwards.

    python examples/broker_vhost.py load defs.json      # the file `qflare broker-definitions` wrote
    python examples/broker_vhost.py remove defs.json

The file names the vhost (``--vhost``), the exchanges, the services' durable queues, the
policy, and one user per service role and per client with its permissions; loading it is
what lets every process of the run log in as its own user instead of an administrator.
Loading goes through RabbitMQ's management API (``POST /api/definitions``) as the
administrator of ``--management`` (default ``$QFLARE_MANAGEMENT_URL``, else
``http://guest:guest@127.0.0.1:15672/``); when the API does not answer, through ``rabbitmqctl
import_definitions`` (run on the broker's machine, with rights on its node). ``load`` returns
once every user of the file has its permissions in the vhost, and takes back those RabbitMQ
gives the administrator on a vhost it creates (only the file's users may touch it; an
administrator can still delete it). ``remove`` deletes the vhost
(its exchanges, queues and streams with it) and every user the file names (broker users are
global: the file's users carry the run's prefix, so no other federation's are touched).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from qflare.bus.management import Management, ManagementError

DEFAULT_MANAGEMENT = "http://guest:guest@127.0.0.1:15672/"


def _api(url: str) -> Management | None:
    """The management API, or None when it does not answer (then rabbitmqctl is used)."""
    api = Management.from_url(url, timeout_s=5)
    try:
        api.request("GET", "/api/overview")
    except ManagementError as exc:
        if shutil.which("rabbitmqctl") is None:
            raise SystemExit(
                f"RabbitMQ's management API does not answer ({exc}) and rabbitmqctl is not "
                "installed: enable the API (`rabbitmq-plugins enable rabbitmq_management`) "
                "or run this on the broker's machine"
            ) from None
        print(f"management API: {exc}; using rabbitmqctl", file=sys.stderr)
        return None
    return api


def _ctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"rabbitmqctl {' '.join(args)}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _permitted(api: Management | None, vhost: str) -> set[str]:
    """The users that hold permissions in ``vhost`` (empty while it does not exist)."""
    if api is not None:
        try:
            rows = api.request("GET", f"/api/vhosts/{quote(vhost, safe='')}/permissions") or []
        except LookupError:
            return set()
        return {str(r["user"]) for r in rows}
    done = subprocess.run(
        ["rabbitmqctl", "-q", "list_permissions", "-p", vhost, "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return {line.split("\t")[0] for line in done.stdout.splitlines() if line.strip()}


def load(doc: dict[str, Any], api: Management | None, timeout: float = 60.0) -> str:
    (vhost,) = (v["name"] for v in doc["vhosts"])
    if api is not None:
        api.request("POST", "/api/definitions", doc)
        how = "management API"
    else:
        # Debian's rabbitmqctl runs as the rabbitmq user: the file must be readable by it
        fd, name = tempfile.mkstemp(prefix="qflare-defs-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh)
            os.chmod(name, 0o644)
            _ctl("import_definitions", name)
        finally:
            os.unlink(name)
        how = "rabbitmqctl"
    # an import may finish after the call returns (rabbitmqctl on 3.10): wait for every user
    users = {u["name"] for u in doc["users"]}
    end = time.monotonic() + timeout
    while not users <= _permitted(api, vhost):
        if time.monotonic() > end:
            raise SystemExit(f"the definitions for vhost {vhost!r} were not loaded in {timeout} s")
        time.sleep(0.3)
    # RabbitMQ gives whoever creates a vhost full permissions on it: the administrator's
    # are taken back, so that only the file's users may touch the run's vhost
    for other in sorted(_permitted(api, vhost) - users):
        if api is not None:
            api.request(
                "DELETE", f"/api/permissions/{quote(vhost, safe='')}/{quote(other, safe='')}"
            )
        else:
            _ctl("clear_permissions", "-p", vhost, other)
    return f"vhost {vhost}: {len(users)} users and their permissions loaded ({how})"


def remove(doc: dict[str, Any], api: Management | None) -> str:
    (vhost,) = (v["name"] for v in doc["vhosts"])
    users = sorted(u["name"] for u in doc["users"])
    if api is not None:
        with contextlib.suppress(LookupError):  # gone already
            api.request("DELETE", f"/api/vhosts/{quote(vhost, safe='')}")
        for user in users:
            api.delete_user(user)
    else:
        for args in (["delete_vhost", vhost], *(["delete_user", user] for user in users)):
            # one missing already is no error here
            subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=120)
    return f"vhost {vhost} and its {len(users)} users deleted"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("load", "remove"))
    p.add_argument("definitions", type=Path, help="the file `qflare broker-definitions` wrote")
    p.add_argument(
        "--management",
        default=os.environ.get("QFLARE_MANAGEMENT_URL") or DEFAULT_MANAGEMENT,
        help="http://<admin>:<password>@<host>:15672/ (default $QFLARE_MANAGEMENT_URL, "
        "else guest on 127.0.0.1)",
    )
    args = p.parse_args(argv)
    doc = json.loads(args.definitions.read_text())
    api = _api(args.management)
    print(load(doc, api) if args.action == "load" else remove(doc, api))
    return 0


if __name__ == "__main__":
    sys.exit(main())
