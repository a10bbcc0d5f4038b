"""The simulator's one place that talks to qflare.robust: rule specs, attacks, detection.

Kept apart so that the rest of the simulator reads in its own terms (client ids, named
parameter dicts) and a change in the robustness core's call shapes touches one file.
``--rule`` and ``--attack`` take plug-ins as the core does: ``module:Class`` or the name of
an installed entry point (``qflare.rules``, ``qflare.attacks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qflare.robust import Aggregator, PluginNames, get_rule, is_reference
from qflare.sim.config import LABEL_FLIP, NO_ATTACK


def resolve_rule_spec(spec: str, f: int) -> str:
    """``spec`` with ``f`` filled into every part that takes it but was not given one.

    ``nnm+multikrum`` with 6 Byzantine clients becomes ``nnm(f=6)+multikrum(f=6)``;
    a part that names its own ``f`` keeps it.
    """
    out = [p.strip() for p in spec.split("+")]
    resolved = []
    for i, part in enumerate(out):
        has_f = "f=" in part.replace(" ", "")
        if has_f:
            resolved.append(part)
            continue
        try:
            # Build the part alone with the override to learn whether it takes f; pre-
            # aggregators are built as a chain ending in "mean" to satisfy the parser.
            probe = part if i == len(out) - 1 else f"{part}+mean"
            get_rule(probe, f=f)
        except (TypeError, ValueError):
            # takes no f, or is wrong in itself: left as written, for --rule's own check
            # (build_rule) to name the mistake
            resolved.append(part)
            continue
        name, _, args = part.partition("(")
        args = args.rstrip(")").strip()
        resolved.append(f"{name}(f={f}{', ' + args if args else ''})")
    return "+".join(resolved)


def build_rule(spec: str) -> Aggregator:
    return get_rule(spec)


_ALIASES = {
    "sign-flip": "sign_flip",
    "signflip": "sign_flip",
    "label-flip": "label_flip",
    "labelflip": "label_flip",
    "large-deviation": "large",
    "large_deviation": "large",
    "min-max": "minmax",
    "min_max": "minmax",
    "min-sum": "minsum",
    "min_sum": "minsum",
    "optimal-ipm": "optimal_ipm",
    "optimal-alie": "optimal_alie",
    "no": "none",
}


def canonical_attack(name: str) -> str:
    """The robust core's name for an attack (``sign-flip`` -> ``sign_flip``); a plug-in's
    ``module:Class`` as written."""
    key = name.strip()
    if is_reference(key):
        return key
    key = key.lower()
    return _ALIASES.get(key, key)


def attack_names() -> list[str]:
    """Every attack the simulator can run: ``none`` and every attack of qflare.robust
    (installed plug-ins included); ``in`` also accepts a ``module:Class``, which
    :func:`check_attack` then loads."""
    from qflare.robust.attacks import list_attacks

    return PluginNames([NO_ATTACK, *list(list_attacks())], is_reference)


def _attack_kwargs(name: str, options: Mapping[str, Any] | None, rule_spec: str) -> dict[str, Any]:
    kwargs = dict(options or {})
    if name.startswith("optimal_"):
        # The "optimal" variants search the scale that hurts the server's rule most; the
        # omniscient coalition knows that rule unless told otherwise.
        kwargs.setdefault("rule", rule_spec)
    return kwargs


def check_attack(name: str, options: Mapping[str, Any] | None, rule_spec: str) -> None:
    """Construct the attack once so bad options fail before anything starts."""
    from qflare.robust.attacks import get_attack

    if name == NO_ATTACK:
        if options:
            raise ValueError("attack 'none' takes no options")
        return
    if name == LABEL_FLIP:
        if options:
            raise ValueError("label_flip takes no options (classes come from the data set)")
        return
    get_attack(name, **_attack_kwargs(name, options, rule_spec))


def coalition_updates(
    attack: str,
    honest: np.ndarray,
    *,
    f: int,
    rule_spec: str,
    seed: tuple[int, int],
    options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """The ``f`` poisoned updates the coalition sends, given this round's honest updates.

    ``rule_spec`` is the server's rule: the "optimal" variants optimise against it.
    """
    from qflare.robust.attacks import Attack, get_attack

    rng = np.random.default_rng([*list(seed), 4])
    fn = get_attack(attack, **_attack_kwargs(attack, options, rule_spec))
    if not isinstance(fn, Attack):
        raise ValueError(f"{attack} poisons data, not updates: it has no updates to send")
    out = np.asarray(fn(honest, f, rng=rng), dtype=np.float32)
    if out.shape != (f, honest.shape[1]):
        raise ValueError(
            f"attack {attack} returned shape {out.shape}, expected ({f}, {honest.shape[1]})"
        )
    return out


def label_flipper(num_classes: int) -> Any:
    """The robust core's data-level label flip for ``num_classes`` classes."""
    from qflare.robust.attacks import get_attack

    return get_attack(LABEL_FLIP, num_classes=num_classes)


def epsilon_spent(sample_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` DP-FedAvg rounds (qflare.privacy's PLD accounting)."""
    from qflare.privacy.accounting import epsilon

    return float(epsilon(sample_rate, noise_multiplier, rounds, delta))


def noise_for_epsilon(
    target_epsilon: float, sample_rate: float, rounds: int, delta: float
) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds stay within ``target_epsilon``."""
    from qflare.privacy.accounting import plan_noise

    return float(plan_noise(target_epsilon, delta, sample_rate, rounds))
