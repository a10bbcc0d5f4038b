"""``qflare privacy epsilon|plan``: privacy budget arithmetic before a job starts.

``epsilon`` reports the PLD epsilon (dp-accounting) of T rounds of DP-FedAvg with Poisson
client sampling at rate q and noise multiplier z; ``plan`` inverts it for z or for T. The
numbers hold under the assumptions in docs/privacy.md (user-level add/remove neighbours,
Poisson sampling, no data-dependent filtering before the noisy sum) and no further.
Bad arguments exit with code 2 and one line naming the value (:func:`qflare.cli.main`).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, NoReturn

from qflare.commands._common import number_in, whole_number_in

if TYPE_CHECKING:  # qflare.privacy loads dp_accounting and scipy (about 1 s): only in handlers
    from qflare.privacy import PrivacyError


_Q = number_in("--q", 0.0, 1.0, low_open=True)
_Z = number_in("--z", 0.0, low_open=True, high_open=True)
_DELTA = number_in("--delta", 0.0, 1.0, low_open=True, high_open=True)
_EPS = number_in("--epsilon", 0.0, low_open=True, high_open=True)
_ROUNDS = whole_number_in("--rounds", 1)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "privacy",
        help="privacy budget arithmetic (epsilon of a plan, noise or rounds for a budget)",
        description="User-level DP-FedAvg accounting with dp-accounting's PLD accountant; "
        "see docs/privacy.md for what the numbers cover.",
    )
    sub = parser.add_subparsers(dest="privacy_command", metavar="ACTION", required=True)

    eps = sub.add_parser("epsilon", help="epsilon of T rounds at sampling rate q, noise z")
    eps.add_argument("--q", type=_Q, required=True, help="client sampling rate, in (0, 1]")
    eps.add_argument("--z", type=_Z, required=True, help="noise multiplier (> 0)")
    eps.add_argument("--rounds", type=_ROUNDS, required=True, help="number of rounds T (>= 1)")
    eps.add_argument("--delta", type=_DELTA, required=True, help="delta, in (0, 1)")
    eps.add_argument("--json", action="store_true", help='print {"epsilon": ...}')
    eps.set_defaults(func=_epsilon)

    plan = sub.add_parser("plan", help="noise multiplier for T rounds, or rounds for noise z")
    plan.add_argument("--epsilon", type=_EPS, required=True, help="epsilon budget (> 0)")
    plan.add_argument("--delta", type=_DELTA, required=True, help="delta, in (0, 1)")
    plan.add_argument("--q", type=_Q, required=True, help="client sampling rate, in (0, 1]")
    which = plan.add_mutually_exclusive_group(required=True)
    which.add_argument("--rounds", type=_ROUNDS, help="plan the noise multiplier for T rounds")
    which.add_argument("--z", type=_Z, help="plan the most rounds at noise multiplier z")
    plan.add_argument("--json", action="store_true", help='print {"z": ...} or {"rounds": ...}')
    plan.set_defaults(func=_plan)


def _fail(error: PrivacyError) -> NoReturn:
    from qflare.errors import UsageError

    raise UsageError(error.detail) from None


def _answer(args: argparse.Namespace, key: str, value: float, sentence: str) -> int:
    """``{key: value}`` as JSON with --json, else the sentence."""
    print(json.dumps({key: value}) if args.json else sentence)
    return 0


def _epsilon(args: argparse.Namespace) -> int:
    from qflare.privacy import PrivacyError, epsilon

    try:
        value = epsilon(args.q, args.z, args.rounds, args.delta)
    except PrivacyError as error:
        return _fail(error)
    return _answer(
        args,
        "epsilon",
        value,
        f"epsilon = {value:.4f} at delta = {args.delta:g} after {args.rounds} rounds "
        f"(q = {args.q:g}, z = {args.z:g}; PLD accountant, user-level, Poisson sampling)",
    )


def _plan(args: argparse.Namespace) -> int:
    from qflare.privacy import PrivacyError, plan_noise, plan_rounds

    budget = f"epsilon = {args.epsilon:g}, delta = {args.delta:g} (PLD accountant)"
    try:
        if args.rounds is not None:
            z = plan_noise(args.epsilon, args.delta, args.q, args.rounds)
            sentence = f"z = {z:.4f} keeps {args.rounds} rounds at q = {args.q:g} within {budget}"
            return _answer(args, "z", z, sentence)
        rounds = plan_rounds(args.epsilon, args.delta, args.q, args.z)
    except PrivacyError as error:
        return _fail(error)
    sentence = f"at most {rounds} rounds at q = {args.q:g}, z = {args.z:g} fit in {budget}"
    return _answer(args, "rounds", rounds, sentence)
