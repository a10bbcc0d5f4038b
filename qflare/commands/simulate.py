"""``qflare simulate``: a federated job with simulated participants, under attack, reported.

Every setting is checked before anything starts (exit code 2 with the reason, on one line:
:func:`qflare.cli.main`), the output folder and the broker's login too; a run
writes report.json, report.md and plots into ``--out``. ``--sweep`` runs a grid of
attacks x rules and writes one comparison table and a heat map; ``--protocol`` runs the
evaluation protocol (``qflare.sim.protocol``: many seeds, alphas, populations, every attack,
each with no defence, detection and an oracle) and writes protocol.json and protocol.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qflare.commands._common import DefaultsHelpFormatter, add_pairs_option, output_folder
from qflare.sim.seed_sets import SEED_SETS  # no imports: the simulator itself loads torch


def _literal(value: str) -> Any:
    """VALUE of ``KEY=VALUE``: a Python literal where it reads as one, else the string."""
    import ast

    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="run a federated job with simulated clients (attacks, defences, DP) and write a report",
        description="Run a federated job with simulated participants against the real services "
        "(embedded bus by default, RabbitMQ with --broker amqp://...) and write a report.",
        formatter_class=DefaultsHelpFormatter,
    )
    g = p.add_argument_group("federation")
    g.add_argument(
        "--dataset", default="digits", help="digits (bundled with scikit-learn) or fashion-mnist"
    )
    g.add_argument(
        "--model",
        default="mlp",
        help="linear (logistic regression), mlp (64 hidden units), a small cnn, or a plug-in "
        "(module:function or an "
        "entry point of qflare.models); an unknown name is refused before anything starts",
    )
    g.add_argument("--clients", type=int, default=20, help="simulated participants")
    g.add_argument(
        "--byzantine", type=int, default=6, help="Byzantine clients (an omniscient coalition)"
    )
    g.add_argument(
        "--attack", default="sign-flip", help="attack name; 'none' for no attack (see --list)"
    )
    add_pairs_option(
        g, "--attack-option", _literal, help="parameter passed to the attack, e.g. scale=3"
    )
    g.add_argument(
        "--rule",
        default="mean",
        help="aggregation spec, pre-aggregators first (e.g. nnm+multikrum, median); f is "
        "filled from --byzantine. mean = FedAvg; with --detection flagged updates are dropped first",
    )
    g.add_argument(
        "--detection",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the detector and drop flagged updates",
    )
    g.add_argument("--rounds", type=int, default=20, help="federated rounds")
    g.add_argument("--local-epochs", type=int, default=2, help="local epochs per round")
    g.add_argument("--lr", type=float, default=0.1, help="client SGD learning rate")
    g.add_argument("--batch-size", type=int, default=16, help="local SGD batch size")
    split = g.add_mutually_exclusive_group()
    split.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration (non-IID split)"
    )
    split.add_argument("--iid", action="store_true", help="IID split instead of Dirichlet")
    g.add_argument("--sample-rate", type=float, default=1.0, help="Poisson client sampling rate q")
    g.add_argument("--server-lr", type=float, default=1.0, help="step applied to the aggregate")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the split, training, attacks, selection and noise",
    )

    d = p.add_argument_group(
        "differential privacy (off unless --noise-multiplier or --target-epsilon)"
    )
    z = d.add_mutually_exclusive_group()
    z.add_argument("--noise-multiplier", type=float, default=None, help="z: noise std = z * clip")
    z.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="plan z so the whole run spends this epsilon",
    )
    d.add_argument(
        "--clip",
        type=float,
        default=5.0,
        help="L2 clip norm C of each update (with --adaptive-clip: of round 1)",
    )
    d.add_argument(
        "--adaptive-clip",
        action="store_true",
        help="adaptive clipping (Andrew et al. 2021): each round moves the clip norm towards "
        "--clip-target-quantile of the update norms; with DP the round still costs z "
        "(the update sum takes a little more noise, the count the rest)",
    )
    d.add_argument(
        "--clip-target-quantile",
        type=float,
        default=0.5,
        help="adaptive clipping: fraction of updates the clip norm should leave unclipped",
    )
    d.add_argument(
        "--clip-learning-rate",
        type=float,
        default=0.2,
        help="adaptive clipping: C <- C * exp(-rate * (unclipped fraction - target))",
    )
    d.add_argument(
        "--clip-count-noise-std",
        type=float,
        default=None,
        help="adaptive clipping with DP: noise std on the count of unclipped updates "
        "(default: expected clients per round / 20; must exceed z / 2)",
    )
    d.add_argument("--delta", type=float, default=1e-5, help="DP delta")
    d.add_argument(
        "--dp-filter-bound",
        type=int,
        default=None,
        metavar="K",
        help="detection removes at most K updates per round (the K highest-scored "
        "flagged) and rounds are charged at z/(2K+1), q=1, so the epsilon covers the "
        "filter (filter_bounded); needs DP and detection on. Unset: with detection the "
        "epsilon is noise_only, not a DP guarantee",
    )
    d.add_argument(
        "--epsilon-budget",
        type=float,
        default=None,
        help="the accountant refuses rounds past this epsilon (unset: the target, or no limit)",
    )

    r = p.add_argument_group("running")
    r.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: runs/simulate, or runs/sweep with --sweep)",
    )
    r.add_argument("--broker", default="memory://", help="memory:// or amqp://user:pass@host:port/")
    r.add_argument(
        "--direct",
        action="store_true",
        help="call the pure cores in a loop instead of running the services (faster)",
    )
    r.add_argument("--baseline", action="store_true", help="also run the same job without attack")
    r.add_argument("--tui", action="store_true", help="watch the run in the terminal UI")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--list", action="store_true", help="list attacks, rules and data sets, then exit"
    )

    s = p.add_argument_group("sweep")
    s.add_argument(
        "--sweep",
        action="store_true",
        help="run every attack x rule of --sweep-attacks/--sweep-rules and compare",
    )
    s.add_argument("--sweep-attacks", default=None, help="comma-separated attacks (default: all)")
    s.add_argument(
        "--sweep-rules",
        default=None,
        help="comma-separated rule specs (default: a set of defences)",
    )
    e = p.add_argument_group("evaluation protocol")
    e.add_argument(
        "--protocol",
        action="store_true",
        help="run the evaluation protocol (direct path): every --sweep-attacks attack x "
        "--protocol-alphas x --protocol-populations, on --seeds seeds of --seed-set, each "
        "with no defence, detection and an oracle, all with --rule",
    )
    e.add_argument(
        "--seed-set",
        choices=tuple(SEED_SETS),
        default="tune",
        help="; ".join(
            f"{name}: seeds {first}, {first + 1}, ..." for name, first in SEED_SETS.items()
        )
        + " (tune for developing detection; the held-out sets for published tables only, each "
        "new one after changes made in answer to a failure seen on the one before)",
    )
    e.add_argument("--seeds", type=int, default=5, help="how many seeds of the set")
    e.add_argument(
        "--protocol-populations",
        default=None,
        help="comma-separated CLIENTS/BYZANTINE (default: 20/6,100/33)",
    )
    e.add_argument(
        "--protocol-alphas",
        default=None,
        help="comma-separated Dirichlet alphas (default: 0.1,0.5,1)",
    )
    e.add_argument(
        "--protocol-defences",
        default=None,
        help="comma-separated defences to run, of none, detect, oracle (default: all three; "
        "without none no undefended harm is reported, without oracle no gap to it)",
    )
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> Any:
    """The flags as a :class:`~qflare.sim.config.SimConfig`: a flag sets the field of its
    name (``--local-epochs`` sets ``local_epochs``), but for the split, DP off and the
    attack's options."""
    from qflare.sim.config import SimConfig

    given = vars(args)
    fields = {name: given[name] for name in SimConfig.model_fields if name in given}
    fields["alpha"] = None if args.iid else args.alpha
    fields["noise_multiplier"] = args.noise_multiplier or 0.0
    fields["attack_options"] = dict(args.attack_option)
    return SimConfig(**fields)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qflare.errors import CommandFailed, UsageError
    from qflare.sim.config import SimConfigError
    from qflare.sim.run import prepare, run_simulation

    console = Console(stderr=False)
    if args.out is None:
        args.out = Path(
            "runs/protocol" if args.protocol else "runs/sweep" if args.sweep else "runs/simulate"
        )
    if args.list:
        from qflare.sim.run import list_choices

        console.print(list_choices())
        return 0
    try:
        if args.tui and (args.direct or args.sweep or args.protocol):
            raise SimConfigError(
                "--tui watches the services; it does not combine with --direct, --sweep "
                "or --protocol"
            )
        if args.protocol and args.sweep:
            raise SimConfigError("--protocol and --sweep are different grids: pick one")
        _check_rule(args.rule, args.byzantine)
        config = prepare(config_from_args(args), broker=args.broker)
        if args.protocol:
            from qflare.sim.protocol import plan_protocol, run_protocol

            protocol = plan_protocol(
                config,
                seed_set=args.seed_set,
                seeds=args.seeds,
                attacks=args.sweep_attacks,
                populations=args.protocol_populations,
                alphas=args.protocol_alphas,
                defences=args.protocol_defences,
            )
        if args.sweep:
            from qflare.sim.sweep import plan_sweep, run_sweep

            plan = plan_sweep(config, args.sweep_attacks, args.sweep_rules)
    except SimConfigError as exc:
        raise UsageError(str(exc)) from None
    _check_login(args.broker)
    output_folder(args.out)
    if args.tui:
        # Textual loads now, not in the event loop of the running job it will watch
        import qflare.tui.console  # noqa: F401
    from qflare.bus import BusError
    from qflare.sim.services import SimulationFailed

    running = {
        "out": args.out,
        "broker": args.broker,
        "direct": args.direct,
        "console": console,
        "progress": not args.quiet,
    }
    try:
        if args.protocol:
            import shlex
            import sys

            argv = sys.argv[sys.argv.index("simulate") + 1 :] if "simulate" in sys.argv else []
            command = shlex.join(["qflare", "simulate", *argv])
            return run_protocol(protocol, out=args.out, console=console, command=command)
        if args.sweep:
            return run_sweep(plan, **running)
        return run_simulation(config, baseline=args.baseline, tui=args.tui, **running)
    except BusError as exc:
        raise CommandFailed(f"the broker failed: {exc}") from None
    except (SimulationFailed, TimeoutError) as exc:
        raise CommandFailed(f"the run did not finish: {exc}") from None


def _check_rule(rule: str, byzantine: int) -> None:
    """The rule spec alone, by the robust core's parser, before the settings that depend on
    it (an attack that adapts to the rule) are checked: a mistake in it is named as such."""
    from qflare.runtime.config import check_rule_spec
    from qflare.sim.config import SimConfigError

    try:
        check_rule_spec(rule, max(byzantine, 0))
    except ValueError as exc:
        raise SimConfigError(f"--rule {rule!r}: {exc}") from None


def _check_login(broker: str) -> None:
    """A broker that refuses the login says so now, in one line, not after the services'
    connect retries (the simulator's own check only opens a TCP connection)."""
    if broker.startswith("memory"):
        return
    import asyncio

    from qflare.runtime.preflight import connect_timeout_from_env, wait_for_broker

    asyncio.run(wait_for_broker(broker, connect_timeout_from_env()))
