"""User-level DP-FedAvg: Poisson client sampling, per-client L2 clipping, Gaussian noise.

McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private Recurrent
Language Models" (ICLR): each round samples every client independently with probability
``q``, clips each sampled client's update to L2 norm ``C``, sums, adds N(0, (z C)^2 I) and
divides by the *expected* number of clients ``q * N`` (their fixed-denominator estimator:
the denominator does not depend on who was sampled, so it leaks nothing and the clipped sum
keeps sensitivity ``C`` under adding or removing one client's whole data). With DP off the
mean divides by the number of updates kept instead (docs/privacy.md, "Fixed denominator").

:func:`dp_fedavg` is the one implementation: the aggregator (``services/aggregator/core.py``)
calls it on the round's float32 matrix with the job's robust rule as ``combine`` (``mean``
gives DP-FedAvg exactly; docs/architecture.md, "DP with a robust rule or detection").

Adaptive clipping follows Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially
Private Learning with Adaptive Clipping" (NeurIPS): the server adds N(0, sigma_b^2) to the
(centred) count of kept updates whose norm was at most ``C``, estimates that fraction and
moves ``C`` geometrically towards a target quantile (:func:`next_clip`). The two noisy sums
of a round together are one Gaussian mechanism with multiplier ``z`` when the update sum
uses ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (their Theorem 1), so the accountant
charges ``z`` and nothing else.

Local DP (:func:`local_dp_update`) lets a client clip and noise its own update before it
leaves the device, for clients that do not trust the server to add the noise. The Laplace
mechanism (Dwork, McSherry, Nissim and Smith 2006, "Calibrating Noise to Sensitivity in
Private Data Analysis", TCC) gives such a client pure epsilon per release
(:func:`local_laplace_update`, :class:`LocalLaplace`): L1 clipping to ``C``, then
Laplace(b = 2C / epsilon) per coordinate; releases add up by basic composition
(Dwork and Roth 2014, Theorem 3.14).

Noise comes from :class:`NoiseSource`, a NumPy generator seeded from the operating system's
CSPRNG (``secrets``); an explicit seed is accepted for reproducible simulations and is
never shown in ``repr`` or logged. What all this guarantees is in ``docs/privacy.md``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from qflare.messages.tensors import Array, Layout, Tensors
from qflare.privacy.errors import INVALID_PARAMETERS, PrivacyError

Floats = npt.NDArray[np.floating[Any]]
F64 = npt.NDArray[np.float64]

#: A robust rule as :func:`dp_fedavg` sees it: the clipped rows in, one combined vector out.
Combine = Callable[[Floats], npt.ArrayLike]


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise PrivacyError(INVALID_PARAMETERS, f"{name}={value!r} must be a finite number > 0")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise PrivacyError(INVALID_PARAMETERS, f"{name}={value!r} must be a finite number >= 0")
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

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("NoiseSource is not picklable: its state would reveal the noise")

    def gaussian(self, std: float, shape: tuple[int, ...]) -> F64:
        """float64 N(0, std^2) samples."""
        return self._generator.normal(0.0, std, size=shape)

    def uniform(self, n: int) -> F64:
        return self._generator.random(n)

    def laplace(self, scale: float, shape: tuple[int, ...]) -> F64:
        """float64 Laplace(0, scale) samples (density exp(-|x| / scale) / (2 scale))."""
        return self._generator.laplace(0.0, scale, size=shape)


def poisson_sample(clients: Sequence[str], q: float, noise: NoiseSource) -> list[str]:
    """Each client independently with probability ``q`` (Poisson sampling), order kept.

    The accounting assumes the server samples exactly this way; see docs/privacy.md.
    """
    _rate("q", q)
    if not clients:
        return []
    coins = noise.uniform(len(clients))
    return [c for c, u in zip(clients, coins, strict=True) if u < q]


#: The column grid of every L2 norm here: squares are summed per chunk of this many
#: coordinates (NumPy's pairwise summation, float64), then the chunks' sums (pairwise
#: again). A block-wise aggregator reading a row in any blocks reproduces the same sums
#: chunk by chunk, so a norm, and the clip it decides, does not depend on the block size;
#: a row of at most this many values is one chunk, the plain pairwise sum.
NORM_CHUNK = 1 << 16


def square_sums(block: Floats) -> F64:
    """Per row of ``block`` ([n, w], w at most :data:`NORM_CHUNK`: one chunk of the norm
    grid), the sum of its squares in float64 (exact squares of float32 values, then
    NumPy's pairwise summation)."""
    if block.ndim != 2 or block.shape[1] > NORM_CHUNK:
        raise ValueError(f"one chunk of at most {NORM_CHUNK} columns needed, got {block.shape}")
    r = np.array(block, dtype=np.float64, order="C")
    np.square(r, out=r)
    sums: F64 = np.add.reduce(r, axis=1)
    return sums


def norm_of_sums(sums: Floats) -> float:
    """The L2 norm from a row's chunk sums (:func:`square_sums`, in grid order)."""
    return float(np.sqrt(np.add.reduce(np.ascontiguousarray(sums, dtype=np.float64))))


def l2_norm(row: Floats) -> float:
    """L2 norm of a vector accumulated in float64 by NumPy's pairwise summation over the
    chunks of :data:`NORM_CHUNK` values: the same bits on every run (a BLAS dot product
    may split the sum by its thread count) and whatever blocks the row is read in."""
    flat = row.reshape(1, -1)
    sums = [
        square_sums(flat[:, a : a + NORM_CHUNK])[0] for a in range(0, flat.shape[1], NORM_CHUNK)
    ]
    return norm_of_sums(np.array(sums, dtype=np.float64))


def clip_factor(norm: float, clip: float, dtype: npt.DTypeLike) -> float | None:
    """What a row of ``dtype`` with L2 norm ``norm`` is multiplied by to be clipped to
    ``clip`` (a float32 row by the float32 factor), None when it is inside. A non-finite
    norm would escape the bound, so it is refused."""
    if not math.isfinite(norm):
        raise PrivacyError(INVALID_PARAMETERS, "the update has non-finite values")
    if norm <= clip:
        return None
    return float(np.float32(clip / norm)) if np.dtype(dtype) == np.float32 else clip / norm


def clip_rows(x: Floats, clip: float) -> F64:
    """Scale each row of ``x`` in place to L2 norm at most ``clip`` (rows already inside
    are untouched; a float32 row is scaled by the float32 factor, :func:`clip_factor`);
    returns the norms before clipping. A non-finite row would escape the bound, so it is
    refused."""
    clip = _positive("clip", clip)
    if x.ndim != 2:
        raise ValueError(f"clip_rows needs one row per update, got shape {x.shape}")
    norms = np.empty(x.shape[0], dtype=np.float64)
    for i in range(x.shape[0]):
        norm = l2_norm(x[i])
        if not math.isfinite(norm):
            raise PrivacyError(INVALID_PARAMETERS, f"update {i} has non-finite values")
        norms[i] = norm
        factor = clip_factor(norm, clip, x.dtype)
        if factor is not None:
            x[i] *= np.float32(factor) if x.dtype == np.float32 else factor
    return norms


def fedavg_denominator(kept: int, expected_clients: float, noise_multiplier: float) -> float:
    """What the round's contribution is divided by: with DP on the expected count ``q*N``
    (DP-FedAvg's fixed denominator: it does not depend on who took part, so it costs no
    privacy), with DP off (``noise_multiplier`` 0) the number of updates kept, so a round
    whose filter dropped updates still averages what it kept (docs/privacy.md)."""
    if noise_multiplier > 0:
        return _positive("expected_clients", expected_clients)
    return float(max(kept, 1))


def adaptive_sum_noise_multiplier(z: float, count_noise_std: float) -> float:
    """``z_delta`` for the update sum when the clipped count takes noise ``sigma_b``, so that
    the round as a whole is a Gaussian mechanism with multiplier ``z`` (Andrew et al. 2021,
    Thm. 1: z^-2 = z_delta^-2 + (2 sigma_b)^-2). Needs ``2 sigma_b > z``."""
    z = _positive("z", z)
    sigma_b = _positive("count_noise_std", count_noise_std)
    rest = z**-2 - (2.0 * sigma_b) ** -2
    if rest <= 0:
        raise PrivacyError(
            INVALID_PARAMETERS,
            f"count_noise_std={sigma_b} too small for z={z}: need 2*count_noise_std > z "
            f"(raise count_noise_std above {z / 2})",
        )
    return float(rest**-0.5)


def default_count_noise_std(expected_clients: float) -> float:
    """Andrew et al.'s recommended noise on the clipped count: ``sigma_b = m / 20`` for
    ``m`` expected clients per round."""
    return _positive("expected_clients", expected_clients) / 20.0


@dataclass(frozen=True)
class AdaptiveClipping:
    """Quantile-tracking clip norm (Andrew et al. 2021): after each round
    ``C <- C * exp(-learning_rate * (b_hat - target_quantile))``, where ``b_hat`` is the
    (noised, with DP on) fraction of kept updates whose norm was at most ``C``.
    ``count_noise_std`` is sigma_b, the std of the noise on the count (unit sensitivity 1/2:
    the indicators are centred)."""

    count_noise_std: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        _positive("count_noise_std", self.count_noise_std)
        if not (0.0 < self.target_quantile < 1.0):
            raise PrivacyError(
                INVALID_PARAMETERS, f"target_quantile={self.target_quantile!r} must be in (0, 1)"
            )
        _positive("learning_rate", self.learning_rate)

    def sum_noise_multiplier(self, noise_multiplier: float) -> float:
        """The multiplier of the update sum's noise when ``noise_multiplier`` is charged (0
        with DP off)."""
        if noise_multiplier == 0:
            return 0.0
        return adaptive_sum_noise_multiplier(noise_multiplier, self.count_noise_std)


def next_clip(
    clip: float,
    norms: Sequence[float] | F64,
    *,
    adaptive: AdaptiveClipping | None,
    expected_clients: float,
    noise_multiplier: float,
    noise: NoiseSource,
) -> float:
    """The clip norm of the next round, from this round's ``clip`` and the pre-clipping
    ``norms`` of the updates it kept (a pure function of them and ``noise``); ``clip``
    itself without ``adaptive`` clipping (nothing drawn).

    With DP on, the centred count ``sum(1[norm <= C] - 1/2)`` gets N(0, sigma_b^2) and is
    divided by the fixed denominator, as the update sum is; the result depends on the
    updates only through that noised count, so publishing the clip norm is post-processing.
    With DP off the fraction is exact (and a round with nothing kept leaves ``clip``
    unchanged)."""
    if adaptive is None:
        return clip
    clip = _positive("clip", clip)
    z = _non_negative("noise_multiplier", noise_multiplier)
    values = np.asarray(norms, dtype=np.float64)
    below = int(np.count_nonzero(values <= clip))
    if z > 0:
        centred = (
            below - 0.5 * values.size + float(noise.gaussian(adaptive.count_noise_std, (1,))[0])
        )
        b_hat = centred / fedavg_denominator(values.size, expected_clients, z) + 0.5
    elif values.size == 0:
        return clip
    else:
        b_hat = below / values.size
    return clip * math.exp(-adaptive.learning_rate * (b_hat - adaptive.target_quantile))


@dataclass(frozen=True)
class DPStep:
    """One round of :func:`dp_fedavg`. ``step`` is the noised mean update (safe to release);
    ``norms`` are the kept updates' pre-clipping norms, which are not, and stay inside the
    aggregator; ``next_clip`` is the clip norm of the next round (``clip`` unless adaptive)."""

    step: F64
    norms: F64
    next_clip: float


@dataclass(frozen=True)
class Release:
    """How :func:`dp_fedavg` turns the clipped combined vector of ``n`` rows into the step:
    times ``n``, plus N(0, ``std``^2) per coordinate, divided by ``denominator``. Every
    coordinate on its own, so a block-wise aggregator applies it block by block with the
    noise drawn block by block from the same source: a NumPy generator's normal draws of
    sizes a and b are its draw of size a + b:
    tests/unit/services/test_aggregate_blocks.py)."""

    n: int
    std: float
    denominator: float

    @classmethod
    def of(
        cls,
        n: int,
        *,
        clip: float,
        noise_multiplier: float,
        expected_clients: float,
        adaptive: AdaptiveClipping | None = None,
    ) -> Release:
        clip = _positive("clip", clip)
        z = _non_negative("noise_multiplier", noise_multiplier)
        _positive("expected_clients", expected_clients)
        sum_z = adaptive.sum_noise_multiplier(z) if adaptive is not None else z
        return cls(n, sum_z * clip, fedavg_denominator(n, expected_clients, z))

    def step(self, combined: F64 | None, width: int, noise: NoiseSource) -> F64:
        """The step over ``width`` coordinates of the clipped ``combined`` vector (None when
        no row was kept: noise only), drawing their noise from ``noise`` (none when
        ``std`` is 0)."""
        step = np.zeros(width, dtype=np.float64)
        if combined is not None:
            step += combined * self.n
        if self.std > 0:
            step += noise.gaussian(self.std, (width,))
        step /= self.denominator
        return step


def dp_fedavg(
    rows: Floats,
    combine: Combine,
    *,
    clip: float,
    noise_multiplier: float,
    expected_clients: float,
    noise: NoiseSource,
    adaptive: AdaptiveClipping | None = None,
    clip_noise: NoiseSource | None = None,
) -> DPStep:
    """One DP-FedAvg round over ``rows`` (one kept update per row, modified in place).

    Each row is clipped to ``clip`` (:func:`clip_rows`); ``combine`` maps the clipped rows
    to one vector (the mean for DP-FedAvg, or a robust rule), which is clipped to ``clip``
    as well, since a robust rule can leave the ball; that vector times the number of rows
    stands for the clipped sum. N(0, (z C)^2) is added with ``z = noise_multiplier``
    (``z_delta`` with ``adaptive``, the rest of the budget going to the count of
    :func:`next_clip`, drawn from ``clip_noise``), also when no row was kept, and the
    total is divided by :func:`fedavg_denominator` (:class:`Release`). With
    ``noise_multiplier`` 0 no noise is drawn.
    """
    clip = _positive("clip", clip)
    z = _non_negative("noise_multiplier", noise_multiplier)
    _positive("expected_clients", expected_clients)
    if rows.ndim != 2:
        raise ValueError(f"dp_fedavg needs one row per update, got shape {rows.shape}")
    if adaptive is not None and z > 0 and clip_noise is None:
        raise ValueError("adaptive clipping with DP on needs clip_noise for the count")
    n, dim = rows.shape
    release = Release.of(
        n, clip=clip, noise_multiplier=z, expected_clients=expected_clients, adaptive=adaptive
    )
    norms = clip_rows(rows, clip)
    combined = None
    if n:
        combined = np.array(combine(rows), dtype=np.float64)  # our own copy: clipped in place
        if combined.shape != (dim,):
            raise ValueError(f"combine returned shape {combined.shape}, expected ({dim},)")
        clip_rows(combined.reshape(1, dim), clip)
    step = release.step(combined, dim, noise)
    following = next_clip(
        clip,
        norms,
        adaptive=adaptive,
        expected_clients=expected_clients,
        noise_multiplier=z,
        noise=clip_noise if clip_noise is not None else noise,
    )
    return DPStep(step, norms, following)


def local_dp_update(
    update: Tensors, clip: float, noise_multiplier: float, noise: NoiseSource | None = None
) -> dict[str, Array]:
    """What a client sends under local DP: its update clipped to ``clip`` plus
    N(0, (noise_multiplier * clip)^2 I), in the update's own layout and dtypes.

    Any two updates of one client differ by at most ``2 * clip`` after clipping, so this
    release alone is a Gaussian mechanism with multiplier ``noise_multiplier / 2`` with
    respect to everything that client holds (see :func:`local_epsilon`)."""
    z = _positive("noise_multiplier", noise_multiplier)
    noise = noise if noise is not None else NoiseSource()
    layout = Layout.of(update)
    vec = layout.flatten(update, dtype=np.float64).reshape(1, layout.size)
    clip_rows(vec, clip)
    return layout.unflatten(vec[0] + noise.gaussian(z * clip, (layout.size,)))


def local_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` local-DP releases by one client (PLD, no sampling amplification:
    the client knows it took part)."""
    from qflare.privacy.accounting import epsilon  # local import: keep mechanism light

    z = _positive("noise_multiplier", noise_multiplier)
    return epsilon(1.0, z / 2.0, rounds, delta)


# -- local DP by the Laplace mechanism (pure epsilon) -------------------------------------


def l1_norm(row: Floats) -> float:
    """L1 norm of a vector, accumulated in float64 by NumPy's pairwise summation."""
    return float(np.add.reduce(np.abs(row.astype(np.float64))))


def clip_l1(vec: Floats, clip: float) -> float:
    """Scale the vector ``vec`` in place to L1 norm at most ``clip`` (unchanged when
    already inside); returns its norm before. A non-finite vector is refused."""
    clip = _positive("clip", clip)
    norm = l1_norm(vec)
    if not math.isfinite(norm):
        raise PrivacyError(INVALID_PARAMETERS, "the update has non-finite values")
    if norm > clip:
        vec *= clip / norm
    return norm


def laplace_scale(clip: float, epsilon: float) -> float:
    """The Laplace scale ``b = 2 C / epsilon`` of one local release.

    Local DP treats the client as the whole database: two neighbouring inputs are any two
    of its data sets, so their updates, each clipped to the L1 ball of radius C, differ by
    at most 2C in L1 (the triangle inequality). Laplace noise of scale Delta_1 / epsilon on
    every coordinate is epsilon-DP (Dwork et al. 2006), with Delta_1 = 2C."""
    return 2.0 * _positive("clip", clip) / _positive("epsilon", epsilon)


def local_laplace_update(
    update: Tensors, clip: float, epsilon: float, noise: NoiseSource | None = None
) -> dict[str, Array]:
    """What a client sends under local Laplace DP: its update (all tensors as one vector)
    clipped to L1 norm ``clip``, plus Laplace(``laplace_scale(clip, epsilon)``) on every
    coordinate, in the update's own layout and dtypes. Pure ``epsilon``-DP with respect to
    everything that client holds, against anyone who sees the release (the server too)."""
    scale = laplace_scale(clip, epsilon)
    noise = noise if noise is not None else NoiseSource()
    layout = Layout.of(update)
    vec = layout.flatten(update, dtype=np.float64)
    clip_l1(vec, clip)
    return layout.unflatten(vec + noise.laplace(scale, (layout.size,)))


def laplace_epsilon(epsilons: Sequence[float]) -> float:
    """Total epsilon of pure-DP releases by basic composition: their sum (Dwork and Roth
    2014, Theorem 3.14). Delta stays 0. An upper bound: advanced composition or the PLD
    accountant give less at some delta > 0, which pure DP does not need."""
    total = 0.0
    for i, eps in enumerate(epsilons):
        total += _positive(f"epsilons[{i}]", eps)
    return total


@dataclass(frozen=True)
class LaplaceRelease:
    """One local Laplace release: the (job, round) it was made for and its epsilon."""

    job: str
    round: int
    epsilon: float


@dataclass(frozen=True)
class LaplaceAccount:
    """What a participant's local Laplace releases cost it, by basic composition."""

    epsilon_per_release: float
    clip: float
    releases: tuple[LaplaceRelease, ...]

    @property
    def epsilon(self) -> float:
        """The sum over the releases (pure DP: delta is 0)."""
        return laplace_epsilon([r.epsilon for r in self.releases])

    def epsilon_of(self, job: str) -> float:
        """The sum over the releases made for ``job``."""
        return laplace_epsilon([r.epsilon for r in self.releases if r.job == job])

    def report(
        self, central_epsilon: float | None = None, central_delta: float | None = None
    ) -> dict[str, Any]:
        """The local guarantee beside the job's central one (``central_epsilon`` and
        ``central_delta`` as the aggregator reports them, e.g. ``qflare status --json``).
        Two separate guarantees against different adversaries; neither is added to the
        other (docs/privacy.md, "Local DP with the Laplace mechanism")."""
        central = None
        if central_epsilon is not None:
            central = {
                "mechanism": "gaussian",
                "epsilon": float(central_epsilon),
                "delta": None if central_delta is None else float(central_delta),
                "composition": "pld",
                "protects_against": "everyone who sees the released models",
            }
        return {
            "local": {
                "mechanism": "laplace",
                "epsilon_per_release": self.epsilon_per_release,
                "releases": len(self.releases),
                "epsilon": self.epsilon,
                "delta": 0.0,
                "clip_l1": self.clip,
                "composition": "basic",
                "protects_against": "everyone who sees the updates, the server included",
            },
            "central": central,
        }


class LocalLaplace:
    """A participant's local DP with the Laplace mechanism:
    ``Participant(..., local_dp=LocalLaplace(epsilon=1.0, clip=0.1))``.

    Each update, just before it is signed and sealed, is clipped to L1 norm ``clip`` and
    gets Laplace(2 clip / epsilon) noise per coordinate (:func:`local_laplace_update`):
    pure ``epsilon`` per release. Every release is recorded (also one that was made but,
    say, not delivered: counting it is the safe side) and :meth:`account` sums them.
    ``seed`` is for reproducible tests and simulations only."""

    def __init__(self, epsilon: float, clip: float, *, seed: int | None = None) -> None:
        self.epsilon = _positive("epsilon", epsilon)
        self.clip = _positive("clip", clip)
        self._noise = NoiseSource(seed)
        self._releases: list[LaplaceRelease] = []

    def __repr__(self) -> str:
        return f"LocalLaplace(epsilon={self.epsilon!r}, clip={self.clip!r})"

    @property
    def scale(self) -> float:
        """The Laplace scale b = 2 clip / epsilon of every release."""
        return laplace_scale(self.clip, self.epsilon)

    def __call__(self, update: Tensors, *, job: str = "", round: int = 0) -> dict[str, Array]:
        """The noised update to send in place of ``update`` (recorded as one release)."""
        released = local_laplace_update(update, self.clip, self.epsilon, self._noise)
        self._releases.append(LaplaceRelease(job, round, self.epsilon))
        return released

    def account(self) -> LaplaceAccount:
        return LaplaceAccount(self.epsilon, self.clip, tuple(self._releases))
