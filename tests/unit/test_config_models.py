"""The configuration as typed models: every table refuses unknown keys, values are checked
at load (types, ranges, rule specs by the robust core's parser, file paths), and each
mistake is one line naming the table and key, the value and what is allowed."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import MappingProxyType

import pytest

from qflare.errors import ConfigError
from qflare.runtime.config import (
    FILE_KEYS,
    SERVICE_OPTIONS,
    AlertingOptions,
    DetectorOptions,
    IngestOptions,
    Settings,
    load_settings,
)

JOB = 'job_id = "j1"\nrounds = 2\nparticipants = ["a", "b", "c"]\ninitial_model = "m.safetensors"\n'


def _load(
    tmp_path: Path, text: str, env: dict[str, str] | None = None, **flags: object
) -> Settings:
    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "q.toml").write_text(text)
    return load_settings(tmp_path / "q.toml", env=env or {}, **flags)


def _error(tmp_path: Path, text: str, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("table", "allowed"),
    [("[qflare]", FILE_KEYS)]
    + [(f"[services.{name}]", tuple(model.model_fields)) for name, model in SERVICE_OPTIONS.items()]
    + [("[[jobs]]", ("job_id", "rule", "initial_model"))],
)
def test_a_typo_in_any_table_names_the_key_and_what_is_allowed(
    tmp_path: Path, table: str, allowed: tuple[str, ...]
) -> None:
    text = f"{table}\nmax_update_nrom = 5\n" + (JOB if table == "[[jobs]]" else "")
    message = _error(tmp_path, text)
    where = "[[jobs]] #1 (job_id 'j1')" if table == "[[jobs]]" else table
    assert f"{where} max_update_nrom: unknown option; allowed: " in message
    assert all(key in message for key in allowed)


def test_the_issue_example(tmp_path: Path) -> None:
    message = _error(tmp_path, "[services.ingest]\nmax_update_nrom = 5\n")
    assert message.endswith(
        "[services.ingest] max_update_nrom: unknown option; allowed: replica, max_update_norm, "
        "round_news_wait_s, dedup_capacity, report_burst, report_per_s, shed_report_s, share, "
        "crl_path, part_ttl_s"
    )


def test_an_unknown_service_or_table(tmp_path: Path) -> None:
    assert "[services.ingst]: unknown service; allowed: aggregator, detector, ingest" in _error(
        tmp_path, "[services.ingst]\nx = 1\n"
    )
    assert "[other]: unknown top-level table" in _error(tmp_path, "[other]\n")
    assert "[services.accountant] x: unknown option; allowed: (none)" in _error(
        tmp_path, "[services.accountant]\nx = 1\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[services.ingest]\nmax_update_norm = -1\n", "max_update_norm = -1: must be greater"),
        ("[services.ingest]\nreplica = 'a b'\n", "replica = 'a b': must be 1-64 letters"),
        ("[services.alerting]\nburst = true\n", "burst = True: must be a valid integer"),
        ("[services.alerting]\nburst = 2.5\n", "burst = 2.5: must be a valid integer"),
        ("[services.alerting]\nrate_per_s = inf\n", "rate_per_s = inf: must be a finite"),
        ("[services.detector]\ndecay = 1.5\n", "decay = 1.5: must be less than or equal to 1"),
        ("[services.detector]\nquarantine_rounds = 0\n", "quarantine_rounds = 0: must be greater"),
        ("[services.aggregator]\ntick_s = 'fast'\n", "tick_s = 'fast': must be a valid number"),
        ("[services]\ningest = 5\n", "[services.ingest] = 5: must be a table"),
        ("[qflare]\nlog_format = 'xml'\n", "[qflare] log_format = 'xml': must be 'json' or 'text'"),
        ("[qflare]\nbroker = 'http://x'\n", "must be a memory://, amqp:// or amqps:// URL"),
        ("[qflare]\nmetrics_port = 70000\n", "[qflare] metrics_port = 70000: must be less"),
        ("[qflare]\npki_dir = 'nowhere'\n", "pki_dir = "),
        ("[qflare\n", "is not valid TOML"),
    ],
)
def test_bad_values_name_table_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("no_such_rule", "rule = 'no_such_rule': unknown rule 'no_such_rule'; rules (the last"),
        ("median+nosuch", "rule = 'median+nosuch': unknown name 'nosuch' in 'median+nosuch'"),
        ("krum(x=1)", "rule = 'krum(x=1)': krum takes no parameter 'x'"),
        ("mean+median", "rule = 'mean+median': unknown pre-aggregator 'mean' (rules go last"),
    ],
)
def test_rule_specs_are_checked_by_the_robust_parser(
    tmp_path: Path, rule: str, expected: str
) -> None:
    message = _error(tmp_path, f'[[jobs]]\n{JOB}rule = "{rule}"\n')
    assert "[[jobs]] #1 (job_id 'j1') " + expected in message


def test_good_rule_specs_load(tmp_path: Path) -> None:
    for rule in ("mean", "nnm+multikrum", "trimmed_mean", "clip(c=1.0)+median", "fedavg"):
        (tmp_path / "m.safetensors").write_bytes(b"")
        settings = _load(tmp_path, f'[[jobs]]\n{JOB}rule = "{rule}"\nf = 1\n')
        assert settings.job("j1").rule == rule


def test_job_model_file_and_ids(tmp_path: Path) -> None:
    no_file = JOB.replace("m.safetensors", "absent.safetensors")
    assert "initial_model = '" in _error(tmp_path, f"[[jobs]]\n{no_file}")
    assert str(tmp_path / "absent.safetensors") in _error(tmp_path, f"[[jobs]]\n{no_file}")
    no_model = "\n".join(x for x in JOB.splitlines() if "initial_model" not in x) + "\n"
    assert "initial_model: missing" in _error(tmp_path, f"[[jobs]]\n{no_model}")
    assert "job_id 'j1' appears 2 times" in _error(tmp_path, f"[[jobs]]\n{JOB}[[jobs]]\n{JOB}")
    assert "f=2 needs 2f < n" in _error(tmp_path, f"[[jobs]]\n{JOB}f = 2\n")
    # relative to the file's folder
    settings = _load(tmp_path, f"[[jobs]]\n{JOB}")
    assert settings.job("j1").initial_model == tmp_path / "m.safetensors"


def test_paths_are_taken_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    settings = _load(
        tmp_path,
        '[qflare]\ndata_dir = "state"\npki_dir = "pki"\n[services.ingest]\ncrl_path = "c.qrl"\n',
    )
    assert settings.data_dir == tmp_path / "state" and settings.pki_dir == tmp_path / "pki"
    assert settings.services.ingest.crl_path == tmp_path / "c.qrl"
    (tmp_path / "afile").write_text("")
    assert "data_dir = " in _error(tmp_path, '[qflare]\ndata_dir = "afile"\n')


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    text = '[qflare]\nprefix = "file-"\nlog_level = "info"\nmetrics_port = 9000\n'
    assert _load(tmp_path, text).prefix == "file-"
    env = {"QFLARE_PREFIX": "env-", "QFLARE_METRICS_PORT": "9100"}
    settings = _load(tmp_path, text, env=env)
    assert (settings.prefix, settings.metrics_port, settings.log_level) == ("env-", 9100, "INFO")
    settings = _load(tmp_path, text, env=env, prefix="flag-", metrics_port=None)
    assert (settings.prefix, settings.metrics_port) == ("flag-", 9100)
    # a bad value says where it came from
    assert "(from QFLARE_METRICS_PORT)" in _error(tmp_path, text, env={"QFLARE_METRICS_PORT": "x"})
    assert "(from --log-format)" in _error(tmp_path, text, log_format="xml")


def test_options_keep_working_for_services_that_read_a_mapping(tmp_path: Path) -> None:
    settings = _load(
        tmp_path, "[services.ingest]\nmax_update_norm = 0\n[services.alerting]\nburst = 4\n"
    )
    assert dict(settings.options("ingest")) == {"max_update_norm": 0.0}  # unset keys absent
    assert dict(settings.options("alerting")) == {"burst": 4}
    assert dict(settings.options("aggregator")) == {}
    assert dict(settings.options("no-such-service")) == {}
    typed = settings.service_options("ingest")
    assert isinstance(typed, IngestOptions) and typed.round_news_wait_s == 5.0
    assert settings.services.alerting.burst == 4 and settings.services.alerting.rate_per_s == 1.0


def test_settings_built_in_code_are_validated_too(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        services=MappingProxyType({"ingest": {"replica": "r1", "round_news_wait_s": 0.3}}),
    )
    assert settings.options("ingest") == {"replica": "r1", "round_news_wait_s": 0.3}
    with pytest.raises(ValueError, match="max_update_nrom"):
        Settings(services=MappingProxyType({"ingest": {"max_update_nrom": 1}}))


def test_defaults_are_the_services_own() -> None:
    from qflare.robust.reputation import Reputation
    from qflare.services.alerting.core import AlertPolicy

    policy = AlertPolicy()
    assert {k: getattr(policy, k) for k in AlertingOptions.model_fields} == (
        AlertingOptions().model_dump()
    )
    params = inspect.signature(Reputation.__init__).parameters
    detector = DetectorOptions()
    for key in ("decay", "penalty", "threshold", "quarantine_rounds"):
        assert params[key].default == getattr(detector, key)
    # ingest runs with its table as it is (services/ingest/service.py): no defaults of its own


def test_a_services_revocation_list_and_ingests_norm_bound(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    settings = Settings(
        data_dir=tmp_path,
        pki_dir=tmp_path / "pki",
        services=MappingProxyType(
            {"ingest": {"crl_path": str(tmp_path / "mine.qrl"), "max_update_norm": 0.0}}
        ),
    )
    assert settings.crl_path("ingest") == tmp_path / "mine.qrl"
    assert settings.crl_path("aggregator") == tmp_path / "pki/services/aggregator/crl.qrl"
    assert Settings(data_dir=tmp_path).crl_path("ingest") is None
    assert settings.services.ingest.norm_bound is None  # 0: finiteness only
    assert IngestOptions(max_update_norm=2.5).norm_bound == 2.5


def test_the_shipped_compose_config_loads() -> None:
    root = Path(__file__).resolve().parents[2]
    settings = load_settings(
        root / "compose" / "qflare.toml", env={"QFLARE_BROKER": "amqp://u:p@rabbitmq:5672/q"}
    )
    assert settings.broker.startswith("amqp://")
    assert "p@" not in str(settings.safe_dict())
