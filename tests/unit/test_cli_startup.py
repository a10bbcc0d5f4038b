"""The CLI loads heavy libraries only in the handlers that use them: building the parser
(every ``qflare`` command, ``--help`` included) and ``qflare provision`` must not import
dp_accounting (about 1 s with scipy), torch or the service runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("dp_accounting", "scipy", "torch", "qflare.runtime", "qflare.privacy", "aio_pika")


def _loaded_after(code: str) -> list[str]:
    probe = (
        code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_the_cli_loads_no_heavy_library() -> None:
    assert _loaded_after("from qflare.cli import build_parser\nbuild_parser()") == []


def test_provision_loads_no_heavy_library(tmp_path: Path) -> None:
    code = (
        f"from qflare.cli import main\n"
        f"assert main(['provision', '--out', {str(tmp_path / 'pki')!r}, '--clients', '1']) == 0"
    )
    assert _loaded_after(code) == []
    assert (tmp_path / "pki" / "clients").is_dir()


def test_serve_spells_out_the_runtime_service_names() -> None:
    from qflare.commands.serve import SERVICES
    from qflare.runtime import SERVICES as RUNTIME_SERVICES

    assert SERVICES == RUNTIME_SERVICES
