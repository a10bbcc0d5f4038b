"""Entry points behind ``qflare simulate``: check everything, run, write the report."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qflare.sim.config import NO_ATTACK, SimConfig, SimConfigError, check_adaptive_clip, validate
from qflare.sim.console import round_progress, summary_table
from qflare.sim.data import DatasetUnavailable, dataset_names, load_dataset
from qflare.sim.federation import Federation
from qflare.sim.report import RunResult, write_report

BROKER_SCHEMES = ("memory://", "amqp://", "amqps://")


def plan_noise(config: SimConfig) -> SimConfig:
    """Turn ``target_epsilon`` into a noise multiplier for the whole run (and a budget)."""
    if config.target_epsilon is None:
        return config
    from qflare.privacy.policy import privacy_charge
    from qflare.sim.robust_glue import noise_for_epsilon

    k = config.dp_filter_bound
    coverage = privacy_charge(
        rule=config.rule_spec,
        detection=config.detection,
        sample_rate=config.sample_rate,
        noise_multiplier=1.0,
        dp_filter_bound=k,
    ).coverage
    try:
        if coverage == "filter_bounded" and k is not None:
            # charged at z/(2k+1) and q = 1 (qflare.privacy.policy.privacy_charge): plan that charged
            # multiplier for the target, and add (2k+1) times it
            z = (2 * k + 1) * noise_for_epsilon(
                config.target_epsilon, 1.0, config.rounds, config.delta
            )
        else:
            z = noise_for_epsilon(
                config.target_epsilon, config.sample_rate, config.rounds, config.delta
            )
    except ValueError as exc:
        raise SimConfigError(f"--target-epsilon {config.target_epsilon}: {exc}") from None
    budget = config.epsilon_budget if config.epsilon_budget is not None else config.target_epsilon
    return config.with_(noise_multiplier=z, epsilon_budget=budget)


def prepare(config: SimConfig, broker: str = "memory://") -> SimConfig:
    """Validate everything that can be checked before a run starts; return the config to run.

    Raises :class:`SimConfigError` (exit code 2 at the command line) for any problem.
    """
    if not broker.startswith(BROKER_SCHEMES):
        raise SimConfigError(
            f"--broker must start with one of {', '.join(BROKER_SCHEMES)}, got {broker!r}"
        )
    if not broker.startswith("memory://"):
        check_broker_reachable(broker)
    validate(config)
    if config.dp_on and config.target_epsilon is not None:
        raise SimConfigError("give either --noise-multiplier or --target-epsilon, not both")
    config = plan_noise(config)
    check_adaptive_clip(config)  # with the noise multiplier --target-epsilon planned
    if config.dataset not in dataset_names():  # pragma: no cover - validate() checked it
        raise SimConfigError(f"unknown data set {config.dataset!r}")
    try:
        data = load_dataset(config.dataset)
    except DatasetUnavailable as exc:
        raise SimConfigError(str(exc)) from None
    try:
        Federation.split(config, data)
    except ValueError as exc:
        raise SimConfigError(
            f"cannot split {config.dataset} among {config.clients} clients: {exc}"
        ) from None
    return config


def check_broker_reachable(url: str, timeout: float = 3.0) -> None:
    """A TCP connect to the broker, so a wrong URL fails in seconds, before anything starts
    (the bus itself retries for half a minute, as a service should). With a cluster's
    comma-separated addresses, one node that answers is enough (the bus fails over)."""
    import socket
    from urllib.parse import urlsplit

    from qflare.bus.port import broker_addresses

    try:
        addresses = broker_addresses(url)
    except ValueError as exc:
        raise SimConfigError(f"--broker: {exc}") from None
    tried: list[str] = []
    for address in addresses:
        parts = urlsplit(address)
        host = parts.hostname or "localhost"
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return
        except OSError as exc:
            tried.append(f"{host}:{port} ({exc.strerror or exc})")
    raise SimConfigError(
        f"cannot reach the broker at {', '.join(tried)}; is RabbitMQ running "
        "(rabbitmq-server -detached)?"
    )


def list_choices() -> Table:
    from qflare.robust import list_rules
    from qflare.sim.robust_glue import attack_names

    rules = list_rules()
    table = Table(title="qflare simulate: choices", show_header=True, header_style="bold")
    table.add_column("option")
    table.add_column("values")
    table.add_row("--attack", ", ".join(attack_names()))
    table.add_row("--rule (last part)", ", ".join(rules["rules"]))
    table.add_row("--rule (pre-aggregators)", ", ".join(rules["pre"]))
    table.add_row("--dataset", ", ".join(dataset_names()))
    return table


def execute(
    config: SimConfig,
    *,
    direct: bool,
    broker: str,
    console: Console,
    progress: bool,
    label: str,
    tui: bool = False,
    log_path: Path | None = None,
) -> RunResult:
    """One run by the chosen path, with a progress bar."""
    federation = Federation.build(config)
    with round_progress(console, label, config.rounds, enabled=progress) as on_round:
        if direct:
            from qflare.sim.direct import run_direct

            return run_direct(config, federation, on_round=on_round)
        from qflare.sim.services import run_services

        return run_services(
            config, federation, broker=broker, on_round=on_round, tui=tui, log_path=log_path
        )


def run_simulation(
    config: SimConfig,
    *,
    out: Path,
    broker: str,
    direct: bool,
    baseline: bool,
    tui: bool,
    console: Console,
    progress: bool,
) -> int:
    result = execute(
        config,
        direct=direct,
        broker=broker,
        console=console,
        progress=progress and not tui,
        label=f"{config.attack} vs {config.rule}",
        tui=tui,
        log_path=out / "services.log",
    )
    base: RunResult | None = None
    if baseline:
        base_config = config.with_(attack=NO_ATTACK)
        base = execute(
            base_config,
            direct=direct,
            broker=broker,
            console=console,
            progress=progress,
            label="no-attack baseline",
            log_path=out / "services-baseline.log",
        )
    written = write_report(out, result, base)
    console.print(summary_table(result, base))
    console.print(f"report: {', '.join(str(p) for p in written)}")
    acc = result.final_accuracy
    return 0 if acc is not None and math.isfinite(acc) else 1
