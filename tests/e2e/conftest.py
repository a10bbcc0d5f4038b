"""End-to-end fixtures: a provisioned federation (10 participants, one revoked client) and
the RabbitMQ URL. Runs are shared per module (each costs seconds of process start-up)."""

from __future__ import annotations

import pytest
from e2e_harness import REVOKED

from qflare.crypto import Federation, provision, revoke


@pytest.fixture(scope="session")
def e2e_federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("e2e-pki")
    provision(root, clients=11)
    revoke(root, [REVOKED])
    return Federation.at(root)
