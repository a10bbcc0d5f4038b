"""qflare.bus.topology: the services' durable queues, named in one place."""

from __future__ import annotations

from qflare.bus import topology
from qflare.commands.broker import service_queues
from qflare.crypto.pki import SERVICE_ROLES


def test_service_queues_are_exactly_the_durable_queues_the_services_declare() -> None:
    # service_queues() builds every service on the in-memory bus (no broker) and asks its
    # consumers: a queue a service declares that SERVICE_QUEUES lacks would survive
    # examples/teardown.py and the tests' clean-ups. Transient queues (ingest's
    # ingest.rounds.<replica>) are left out: the broker drops them with their connection.
    declared = [spec.name for spec in service_queues()]
    assert sorted(declared) == sorted(topology.SERVICE_QUEUES)
    assert len(set(topology.SERVICE_QUEUES)) == len(topology.SERVICE_QUEUES)


def test_each_service_queue_is_named_after_its_role() -> None:
    # a role's broker permissions cover <role> and <role>.<suffix> (qflare.commands.broker)
    for name in topology.SERVICE_QUEUES:
        assert name.split(".")[0] in SERVICE_ROLES, name
