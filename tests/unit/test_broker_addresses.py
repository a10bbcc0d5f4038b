"""A RabbitMQ cluster's addresses and replica count: parsing, configuration, redaction."""

from __future__ import annotations

import pytest

from qflare.bus import QueueSpec, StreamSpec, broker_addresses
from qflare.bus.rabbitmq import _redact, check_replicas, queue_arguments, stream_arguments
from qflare.errors import ConfigError
from qflare.runtime.config import load_settings, redact_url

NODES = "amqp://u:p1@n1:5672/v,amqp://u:p2@n2:5673/v, amqps://u:p3@n3:5671/v"


def test_a_list_of_nodes_splits_only_before_a_url() -> None:
    assert broker_addresses(NODES) == (
        "amqp://u:p1@n1:5672/v",
        "amqp://u:p2@n2:5673/v",
        "amqps://u:p3@n3:5671/v",
    )
    # one URL, commas in its query included, stays one
    assert broker_addresses("amqp://h/?a=1,2") == ("amqp://h/?a=1,2",)
    assert broker_addresses("memory://x") == ("memory://x",)


@pytest.mark.parametrize("bad", ["", "  ", "amqp://h1/,memory://x", "memory://,amqp://h/"])
def test_a_bad_list_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        broker_addresses(bad)


def test_the_config_takes_a_list_in_the_file_or_a_string(tmp_path) -> None:
    config = tmp_path / "q.toml"
    config.write_text(
        '[qflare]\nbroker = ["amqp://u:p@n1/", "amqp://u:p@n2/"]\nbroker_replicas = 3\n'
    )
    settings = load_settings(config, env={})
    assert settings.broker == "amqp://u:p@n1/,amqp://u:p@n2/"
    assert settings.broker_replicas == 3
    assert settings.safe_dict()["broker"] == "amqp://u:***@n1/,amqp://u:***@n2/"
    from_env = load_settings(env={"QFLARE_BROKER": NODES, "QFLARE_BROKER_REPLICAS": "5"})
    assert broker_addresses(from_env.broker)[2] == "amqps://u:p3@n3:5671/v"
    assert from_env.broker_replicas == 5
    assert load_settings(env={}).broker_replicas is None


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"QFLARE_BROKER": "amqp://n1/,memory://x"}, "each must be an amqp:// or amqps:// URL"),
        ({"QFLARE_BROKER_REPLICAS": "0"}, "broker_replicas"),
        ({"QFLARE_BROKER_REPLICAS": "10"}, "broker_replicas"),
    ],
)
def test_the_config_refuses_bad_cluster_settings(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(env=env)


def test_the_declare_mode_comes_from_the_file_or_the_environment(tmp_path) -> None:
    from qflare.runtime.bootstrap import _bus_options

    assert load_settings(env={}).broker_declare == "full"  # creates what it needs
    config = tmp_path / "q.toml"
    config.write_text('[qflare]\nbroker = "amqp://u:p@n1/"\nbroker_declare = "passive"\n')
    passive = load_settings(config, env={})
    assert passive.broker_declare == "passive"
    assert _bus_options(passive, "ingest")["declare"] == "passive"
    from_env = load_settings(
        env={"QFLARE_BROKER": "amqp://u:p@n1/", "QFLARE_BROKER_DECLARE": "passive"}
    )
    assert _bus_options(from_env, "aggregator") == {
        "connection_name": "qflare-aggregator",
        "replicas": None,
        "declare": "passive",
    }
    # the environment wins over the file; the in-memory bus takes no options at all
    assert load_settings(config, env={"QFLARE_BROKER_DECLARE": "full"}).broker_declare == "full"
    assert _bus_options(load_settings(env={"QFLARE_BROKER_DECLARE": "passive"}), "ingest") == {}


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"QFLARE_BROKER_DECLARE": "lazy"},
            r"broker_declare = 'lazy': must be 'full' or 'passive'",
        ),
        ({"QFLARE_BROKER_DECLARE": "PASSIVE"}, "QFLARE_BROKER_DECLARE"),
    ],
)
def test_the_config_refuses_an_unknown_declare_mode(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(env=env)


def test_every_password_of_a_list_is_redacted() -> None:
    for redact in (redact_url, _redact):
        text = redact(NODES)
        assert "p1" not in text and "p2" not in text and "p3" not in text
        assert text.count("***") == 3


def test_replicas_go_to_durable_queues_and_streams_only() -> None:
    durable = QueueSpec("q", bindings=(("qflare.events", "k"),))
    assert "x-quorum-initial-group-size" not in queue_arguments(durable, "p-")
    assert queue_arguments(durable, "p-", 3)["x-quorum-initial-group-size"] == 3
    stream = StreamSpec("s", max_bytes=1 << 20)
    assert "x-initial-cluster-size" not in stream_arguments(stream)
    assert stream_arguments(stream, 3)["x-initial-cluster-size"] == 3
    for bad, error in ((0, ValueError), (10, ValueError), (True, TypeError), ("3", TypeError)):
        with pytest.raises(error):
            check_replicas(bad)  # type: ignore[arg-type]


def test_a_kit_fills_its_login_into_every_node() -> None:
    from qflare.client.kit import Kit

    class _Kit:
        id = "client-001"
        broker_password = "s3cret"
        broker_url = Kit.broker_url

    filled = _Kit().broker_url("amqp://n1:5672/q,amqp://n2:5672/q")
    assert filled == "amqp://client-001:s3cret@n1:5672/q,amqp://client-001:s3cret@n2:5672/q"


def test_the_definitions_file_declares_the_replicas_the_services_do() -> None:
    from qflare.commands.broker import ROLES, BrokerUser, build_definitions

    services = [BrokerUser(f"qflare-{r}", None) for r in ROLES]
    plain = build_definitions([], services)
    cluster = build_definitions([], services, replicas=3)
    assert plain["queues"] and len(plain["queues"]) == len(cluster["queues"])
    for queue in plain["queues"]:
        assert "x-quorum-initial-group-size" not in queue["arguments"]
    for queue in cluster["queues"]:
        assert queue["arguments"]["x-quorum-initial-group-size"] == 3


def test_a_url_without_a_user_logs_each_service_in_as_its_own_user(tmp_path) -> None:
    # `qflare up --broker amqp://host/vhost`: each service as <prefix>qflare-<service>, with
    # the password `qflare broker-definitions --kit` wrote beside its keys
    pki = tmp_path / "pki"
    for name in ("ingest", "aggregator"):
        (pki / "services" / name).mkdir(parents=True)
    (pki / "services" / "ingest" / "broker_password").write_text("s3cret/+\n")
    settings = load_settings(
        env={}, broker="amqp://n1:5672/v,amqp://n2:5672/v", pki_dir=str(pki), prefix="fed-"
    )
    assert settings.broker_for("ingest") == (
        "amqp://fed-qflare-ingest:s3cret%2F%2B@n1:5672/v,"
        "amqp://fed-qflare-ingest:s3cret%2F%2B@n2:5672/v"
    )
    assert settings.broker_for("aggregator") == settings.broker  # no password file: as given
    named = load_settings(env={}, broker="amqp://admin:pw@n1/v", pki_dir=str(pki))
    assert named.broker_for("ingest") == "amqp://admin:pw@n1/v"  # a URL's own user wins
    assert load_settings(env={}, pki_dir=str(pki)).broker_for("ingest") == "memory://"


def test_a_service_left_without_a_login_is_warned_about_once(
    tmp_path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `qflare up --broker amqp://host/` for development: the URL goes on as given (the
    # client's default login, guest), and each service says so once, with what to do
    from qflare.runtime import config

    monkeypatch.setattr(config, "_WARNED_WITHOUT_LOGIN", set())
    pki = tmp_path / "pki"
    for name in ("ingest", "aggregator"):
        (pki / "services" / name).mkdir(parents=True)
    (pki / "services" / "ingest" / "broker_password").write_text("s3cret\n")
    bare = load_settings(env={}, broker="amqp://u:p9@n1/v,amqp://n2/v", pki_dir=str(pki))
    with caplog.at_level("WARNING", logger="qflare.config"):
        for _ in range(3):
            assert bare.broker_for("aggregator") == bare.broker
        assert bare.broker_for("ingest") != bare.broker  # its password file: no warning
        assert load_settings(env={}, broker="amqp://n1/").broker_for("detector") == "amqp://n1/"
        named = load_settings(env={}, broker="amqp://admin:pw@n1/v", pki_dir=str(pki))
        assert named.broker_for("alerting") == "amqp://admin:pw@n1/v"
        assert load_settings(env={}, pki_dir=str(pki)).broker_for("accountant") == "memory://"
    warned = [r for r in caplog.records if r.name == "qflare.config"]
    assert [r.levelname for r in warned] == ["WARNING", "WARNING"]
    aggregator, detector = (r.getMessage() for r in warned)
    assert aggregator.startswith("service 'aggregator' connects to the broker without credentials")
    assert "amqp://n2/v" in aggregator and "p9" not in aggregator  # another node's password
    assert str(pki / "services" / "aggregator" / "broker_password") in aggregator
    assert "amqp://user:password@host/vhost" in aggregator
    assert "broker-definitions --kit" in aggregator
    assert detector.startswith("service 'detector' ") and "no pki_dir" in detector


def test_service_users_and_the_policy_carry_the_federation_prefix() -> None:
    from qflare.bus import topology
    from qflare.commands.broker import ROLES, BrokerUser, build_definitions

    doc = build_definitions(
        [BrokerUser("fed-client-000", None)],
        [BrokerUser(topology.service_user(r, "fed-"), None) for r in ROLES],
        prefix="fed-",
        queues=[],
    )
    assert {u["name"] for u in doc["users"]} == {
        "fed-client-000",
        *(f"fed-qflare-{r}" for r in ROLES),
    }
    ingest = next(p for p in doc["permissions"] if p["user"] == "fed-qflare-ingest")
    assert ingest["configure"] == r"^(fed\-ingest(\..*)?)$"  # the ingest role's, prefixed
    assert [p["name"] for p in doc["policies"]] == ["fed-qflare-dead-letters"]
