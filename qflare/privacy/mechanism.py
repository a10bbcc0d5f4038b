"""User-level DP-FedAvg: Poisson client sampling, per-client L2 clipping, Gaussian noise.

McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private Recurrent
Language Models" (ICLR): each round samples every client independently with probability
``q``, clips each sampled client's update to L2 norm ``C``, sums, adds N(0, (z C)^2 I) and
divides by the *expected* number of clients ``q * N`` (their fixed-denominator estimator:
the denominator does not depend on who was sampled, so it leaks nothing and the clipped sum
keeps sensitivity ``C`` under adding or removing one client's whole data).

Adaptive clipping follows Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially
Private Learning with Adaptive Clipping" (NeurIPS): clients report whether their update
norm was at most ``C``; the server adds N(0, sigma_b^2) to the (centred) count, estimates
the fraction below ``C`` and moves ``C`` geometrically towards a target quantile. The two
noisy sums of a round together are one Gaussian mechanism with multiplier ``z`` when the
update sum uses ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (their Theorem 1), so the
accountant charges ``z`` and nothing else.

Local DP (:func:`local_dp_update`) lets a client clip and noise its own update before it
leaves the device, for clients that do not trust the server to add the noise.

Noise comes from :class:`NoiseSource`, a NumPy generator seeded from the operating system's
CSPRNG (``secrets``); an explicit seed is accepted for reproducible simulations and is
never shown in ``repr`` or logged. What all this guarantees is in ``docs/privacy.md``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qflare.privacy.errors import INVALID_PARAMETERS, PrivacyError

Update = np.ndarray | Mapping[str, np.ndarray]


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise PrivacyError(INVALID_PARAMETERS, f"{name}={value!r} must be a finite number > 0")
    return float(value)


def _rate(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise PrivacyError(INVALID_PARAMETERS, f"{name}={value!r} must be in (0, 1]")
    return float(value)


class NoiseSource:
    """Gaussian noise and sampling coins from a NumPy ``Generator(PCG64)``.

    Seeded with 256 bits from ``secrets`` unless ``seed`` is given (simulations and tests).
    PCG64 is a statistical, not a cryptographic, generator: the seed is what is secret, and
    the raw stream is never released (only its sum with the clipped updates is).
    """

    __slots__ = ("_generator",)

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = secrets.randbits(256)
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TypeError("seed must be a non-negative int or None")
        self._generator = np.random.Generator(np.random.PCG64(seed))

    def __repr__(self) -> str:
        return "NoiseSource(<seed hidden>)"

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("NoiseSource is not picklable: its state would reveal the noise")

    def gaussian(self, std: float, shape: tuple[int, ...]) -> np.ndarray:
        """float64 N(0, std^2) samples."""
        return self._generator.normal(0.0, std, size=shape)

    def uniform(self, n: int) -> np.ndarray:
        return self._generator.random(n)


def poisson_sample(clients: Sequence[str], q: float, noise: NoiseSource) -> list[str]:
    """Each client independently with probability ``q`` (Poisson sampling), order kept.

    The accounting assumes the server samples exactly this way; see docs/privacy.md.
    """
    _rate("q", q)
    if not clients:
        return []
    coins = noise.uniform(len(clients))
    return [c for c, u in zip(clients, coins) if u < q]


def flatten(update: Update) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...], np.dtype]]]:
    """A float64 vector of all tensors (sorted by name) and the layout to undo it."""
    if isinstance(update, np.ndarray):
        return update.astype(np.float64, copy=False).ravel(), [("", update.shape, update.dtype)]
    layout = [(name, update[name].shape, update[name].dtype) for name in sorted(update)]
    if not layout:
        return np.zeros(0), layout
    vec = np.concatenate(
        [np.asarray(update[name], dtype=np.float64).ravel() for name, _, _ in layout]
    )
    return vec, layout


def unflatten(vec: np.ndarray, layout: list[tuple[str, tuple[int, ...], np.dtype]]) -> Update:
    if len(layout) == 1 and layout[0][0] == "":
        _, shape, dtype = layout[0]
        return vec.reshape(shape).astype(dtype)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, dtype in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = vec[offset : offset + size].reshape(shape).astype(dtype)
        offset += size
    return out


def clip_l2(vec: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """``vec`` scaled to L2 norm at most ``clip`` (float64), and its norm before clipping.

    A non-finite update would make the norm NaN and escape the bound, so it is refused.
    """
    clip = _positive("clip", clip)
    vec = np.asarray(vec, dtype=np.float64)
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm):
        raise PrivacyError(INVALID_PARAMETERS, "update has non-finite values; cannot clip")
    if norm <= clip:
        return vec, norm
    # The tiny shrink keeps rounding from landing the clipped norm a hair above clip.
    return vec * (clip / norm * (1.0 - 1e-12)), norm


def noisy_clipped_sum(
    updates: Sequence[np.ndarray],
    clip: float,
    noise_multiplier: float,
    noise: NoiseSource,
    dim: int | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Sum of the clipped vectors plus N(0, (noise_multiplier * clip)^2 I); also the norms.

    An empty sample still gets noise (``dim`` gives its length): whether anyone was sampled
    must not be visible in the output.
    """
    clip = _positive("clip", clip)
    noise_multiplier = _positive("noise_multiplier", noise_multiplier)
    if not updates and dim is None:
        raise ValueError("no updates and no dim: cannot size the noise")
    size = dim if dim is not None else int(np.asarray(updates[0]).size)
    total = np.zeros(size, dtype=np.float64)
    norms: list[float] = []
    for vec in updates:
        vec = np.asarray(vec, dtype=np.float64).ravel()
        if vec.size != size:
            raise PrivacyError(INVALID_PARAMETERS, f"update of {vec.size} values, expected {size}")
        clipped, norm = clip_l2(vec, clip)
        total += clipped
        norms.append(norm)
    total += noise.gaussian(noise_multiplier * clip, (size,))
    return total, norms


def adaptive_sum_noise_multiplier(z: float, count_noise_std: float) -> float:
    """``z_delta`` for the update sum when the clipped count takes noise ``sigma_b``, so that
    the round as a whole is a Gaussian mechanism with multiplier ``z`` (Andrew et al. 2021,
    Thm. 1: z^-2 = z_delta^-2 + (2 sigma_b)^-2). Needs ``2 sigma_b > z``."""
    z = _positive("z", z)
    sigma_b = _positive("count_noise_std", count_noise_std)
    rest = z**-2 - (2.0 * sigma_b) ** -2
    if rest <= 0:
        raise PrivacyError(
            INVALID_PARAMETERS, f"count_noise_std={sigma_b} too small for z={z}: need 2*sigma_b > z"
        )
    return rest**-0.5


@dataclass
class AdaptiveClipping:
    """Quantile-based clip norm (Andrew et al. 2021), updated geometrically each round:
    ``C <- C * exp(-learning_rate * (b_hat - target_quantile))`` where ``b_hat`` is the noised
    fraction of sampled clients whose update norm was at most ``C``."""

    clip: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 1.0
    expected_clients: float = 1.0

    def __post_init__(self) -> None:
        _positive("clip", self.clip)
        if not (0.0 <= self.target_quantile <= 1.0):
            raise PrivacyError(
                INVALID_PARAMETERS, f"target_quantile={self.target_quantile!r} must be in [0, 1]"
            )
        _positive("learning_rate", self.learning_rate)
        _positive("count_noise_std", self.count_noise_std)
        _positive("expected_clients", self.expected_clients)

    def update(self, norms: Sequence[float], noise: NoiseSource) -> float:
        """Move the clip norm using this round's pre-clipping norms; returns the new clip.

        The indicator is centred (b - 1/2) so its sum has add/remove sensitivity 1/2, which
        is what the z_delta split assumes."""
        below = sum(1 for n in norms if n <= self.clip)
        centred = below - 0.5 * len(norms) + float(noise.gaussian(self.count_noise_std, (1,))[0])
        b_hat = centred / self.expected_clients + 0.5
        self.clip = self.clip * math.exp(-self.learning_rate * (b_hat - self.target_quantile))
        return self.clip


@dataclass
class RoundResult:
    """What one DP-FedAvg round produced. ``mean`` is safe to release; ``norms`` are not
    (they are the clients' raw norms) and must stay inside the aggregator."""

    mean: Update
    clip: float
    sum_noise_std: float
    sampled: int
    clipped: int
    norms: list[float]


class DPFedAvg:
    """One DP-FedAvg round over the sampled clients' updates (vectors or name->tensor maps).

    ``noise_multiplier`` is the z the accountant charges. With ``adaptive`` set, the update
    sum uses the smaller :func:`adaptive_sum_noise_multiplier` and the remainder of the
    budget goes to the noised count that moves the clip norm; the charge is still ``z``.
    Every client has weight 1 (weighting by sample count would need bounded weights).
    """

    def __init__(
        self,
        clip: float,
        noise_multiplier: float,
        expected_clients: float,
        adaptive: AdaptiveClipping | None = None,
    ) -> None:
        self.clip = _positive("clip", clip)
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier)
        self.expected_clients = _positive("expected_clients", expected_clients)
        self.adaptive = adaptive
        if adaptive is not None:
            adaptive.clip = self.clip
            self.sum_noise_multiplier = adaptive_sum_noise_multiplier(
                self.noise_multiplier, adaptive.count_noise_std
            )
        else:
            self.sum_noise_multiplier = self.noise_multiplier

    def __repr__(self) -> str:
        return (
            f"DPFedAvg(clip={self.clip}, noise_multiplier={self.noise_multiplier}, "
            f"expected_clients={self.expected_clients}, adaptive={self.adaptive is not None})"
        )

    def __call__(
        self, updates: Sequence[Update], noise: NoiseSource, template: Update | None = None
    ) -> RoundResult:
        """Clip, sum, add noise, divide by the expected count. ``template`` gives the layout
        when no client was sampled (the noise is released anyway)."""
        layout_source = updates[0] if updates else template
        if layout_source is None:
            raise ValueError("no updates and no template: cannot size the noise")
        _, layout = flatten(layout_source)
        vecs = []
        for u in updates:
            vec, other = flatten(u)
            if [(n, s) for n, s, _ in other] != [(n, s) for n, s, _ in layout]:
                raise PrivacyError(INVALID_PARAMETERS, "updates have different tensor layouts")
            vecs.append(vec)
        dim = int(sum(int(np.prod(s, dtype=np.int64)) for _, s, _ in layout))
        clip = self.clip
        total, norms = noisy_clipped_sum(vecs, clip, self.sum_noise_multiplier, noise, dim=dim)
        mean = unflatten(total / self.expected_clients, layout)
        if self.adaptive is not None:
            self.clip = self.adaptive.update(norms, noise)
        return RoundResult(
            mean=mean,
            clip=clip,
            sum_noise_std=self.sum_noise_multiplier * clip,
            sampled=len(vecs),
            clipped=sum(1 for n in norms if n > clip),
            norms=norms,
        )


def local_dp_update(
    update: Update, clip: float, noise_multiplier: float, noise: NoiseSource | None = None
) -> Update:
    """What a client sends under local DP: its update clipped to ``clip`` plus
    N(0, (noise_multiplier * clip)^2 I), in the update's own layout and dtypes.

    Any two updates of one client differ by at most ``2 * clip`` after clipping, so this
    release alone is a Gaussian mechanism with multiplier ``noise_multiplier / 2`` with
    respect to everything that client holds (see :func:`local_epsilon`)."""
    noise = noise if noise is not None else NoiseSource()
    vec, layout = flatten(update)
    clipped, _ = clip_l2(vec, clip)
    return unflatten(
        clipped
        + noise.gaussian(_positive("noise_multiplier", noise_multiplier) * clip, clipped.shape),
        layout,
    )


def local_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` local-DP releases by one client (PLD, no sampling amplification:
    the client knows it took part)."""
    from qflare.privacy.accounting import epsilon  # local import: keep mechanism light

    z = _positive("noise_multiplier", noise_multiplier)
    return epsilon(1.0, z / 2.0, rounds, delta)
