"""Per-client reputation across rounds: a decayed offence score with quarantine.

Each flag adds ``penalty`` to the client's score, which decays by ``decay`` per round
elapsed (an exponentially weighted count of recent flags, cf. the reputation schemes
surveyed by Lyu et al., "Privacy and Robustness in Federated Learning", IEEE TNNLS 2022).
A score reaching ``threshold`` quarantines the client for ``quarantine_rounds`` rounds.
Pure: the state exports to and imports from plain dicts (the detector service persists it).

Evidence across rounds (:meth:`Reputation.review`): a per-client memory of the direction in
which its updates leave the round's consensus, kept on a fixed subset of ``sketch``
coordinates (512 by default: a random coordinate subset, as DnC samples coordinates;
Shejwalkar and Houmansadr, NDSS 2021; small enough to persist with the state, ~10 kB per
client as JSON). An honest client with unusual data (strongly non-IID: one or two
classes) sends large updates far from the others, round after round, in the *same*
direction relative to the consensus (its label skew does not change), while still pointing
with the consensus; the per-round scores flag it every round (``krum``, ``distance``,
``norm``). FLDetector (Zhang et al., KDD 2022) checks that a client's update is consistent
with what its history predicts, and FoolsGold (Fung et al., RAID 2020) keeps a per-client
aggregate of its updates over time; here a client flagged *only* for being far or large is
let back in when its residual direction agrees with its own history (cosine at least
``consistency``, after ``min_history`` rounds of history) and its update has a positive
cosine with the consensus. Flags on direction (``cosine``, ``neighbourhood``), copies
(``duplicate``), clusters and non-finite values are never pardoned, so a coalition that
pushes against the consensus stays out; random or noisy attack updates are not consistent
with their own history. The detector core is to call it between ``detect`` and
:meth:`observe` (``verdict = reputation.review(round_no, clients, x, verdict)``), so that a
pardoned client is neither excluded nor penalised.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ._core import F64, FloatArray, check_float, check_int, finite_rows
from .detection import Verdict

#: reasons a consistent history may pardon: position and magnitude, not direction
PARDONABLE = frozenset({"krum", "distance", "norm"})


@dataclass
class ClientRecord:
    score: float = 0.0
    last_round: int = 0
    offences: int = 0
    quarantined_until: int = -1  # last round of the quarantine; -1 when never

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reputation:
    #: The tunables, by name: what :meth:`to_dict` exports besides the clients and what a
    #: service reads from its configuration.
    PARAMS = ("decay", "penalty", "threshold", "quarantine_rounds")
    #: The tunables of the evidence across rounds (:meth:`review`), with their defaults
    #: where a saved state lacks them.
    HISTORY_PARAMS = ("consistency", "memory", "min_history", "sketch")

    def __init__(
        self,
        decay: float = 0.8,
        penalty: float = 1.0,
        threshold: float = 2.5,
        quarantine_rounds: int = 5,
        *,
        consistency: float = 0.9,
        memory: float = 0.5,
        min_history: int = 2,
        sketch: int = 512,
    ) -> None:
        self.decay = check_float("decay", decay)
        if self.decay > 1:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.penalty = check_float("penalty", penalty, strict=True)
        self.threshold = check_float("threshold", threshold, strict=True)
        self.quarantine_rounds = check_int("quarantine_rounds", quarantine_rounds, minimum=1)
        self.clients: dict[str, ClientRecord] = {}
        self.consistency = check_float("consistency", consistency)
        self.memory = check_float("memory", memory)
        if self.memory >= 1:
            raise ValueError(f"memory must be in [0, 1), got {memory!r}")
        self.min_history = check_int("min_history", min_history, minimum=1)
        self.sketch = check_int("sketch", sketch, minimum=1)
        #: client -> (rounds of history, unit residual direction on the sketch coordinates)
        self.history: dict[str, tuple[int, F64]] = {}

    def score(self, client: str, round_: int) -> float:
        rec = self.clients.get(client)
        if rec is None:
            return 0.0
        return rec.score * self.decay ** max(0, round_ - rec.last_round)

    def is_quarantined(self, client: str, round_: int) -> bool:
        rec = self.clients.get(client)
        return rec is not None and round_ <= rec.quarantined_until

    def quarantined(self, round_: int) -> set[str]:
        return {c for c in self.clients if self.is_quarantined(c, round_)}

    def observe(self, round_: int, flagged: Iterable[str]) -> list[str]:
        """Record one round's flagged clients; returns the newly quarantined ones."""
        round_ = check_int("round", round_)
        newly: list[str] = []
        for client in sorted(set(map(str, flagged))):
            rec = self.clients.setdefault(client, ClientRecord(last_round=round_))
            if round_ < rec.last_round:
                raise ValueError(
                    f"round {round_} for client {client!r} is older than its "
                    f"last recorded round {rec.last_round}"
                )
            rec.score = self.score(client, round_) + self.penalty
            rec.last_round = round_
            rec.offences += 1
            if rec.score >= self.threshold and not self.is_quarantined(client, round_):
                rec.quarantined_until = round_ + self.quarantine_rounds
                newly.append(client)
        return newly

    @staticmethod
    def _columns(d: int, m: int) -> Any:
        """The sketch's coordinates for rows of length ``d``: fixed for a given ``d``."""
        if d <= m:
            return slice(None)
        return np.sort(np.random.default_rng([d, 13]).choice(d, size=m, replace=False))

    def review(self, round_: int, ids: Sequence[str], x: FloatArray, verdict: Verdict) -> Verdict:
        """``verdict`` (of ``detect(x, f, ids=ids)``) with the consistently honest outliers
        let back in (class docstring), and every finite row's residual direction added to
        its client's history; each scored client gains a ``consistency`` score. A verdict
        without scores (``insufficient``) is returned as it is."""
        check_int("round", round_)
        names = [str(i) for i in ids]
        if x.shape[0] != len(names):
            raise ValueError(f"{x.shape[0]} rows for {len(names)} ids")
        if not verdict.scores:
            return verdict
        finite = finite_rows(x)
        cols = self._columns(int(x.shape[1]), self.sketch)
        sub = np.asarray(x[:, cols], np.float64)
        kept = np.array([n in set(verdict.kept) for n in names]) & finite
        base = kept if kept.any() else finite
        centre = sub[base].mean(axis=0)
        res = sub - centre
        res_norm = np.linalg.norm(res, axis=1)
        unit = res / np.maximum(res_norm, 1e-30)[:, None]
        cos_centre = (sub @ centre) / np.maximum(
            np.linalg.norm(sub, axis=1) * float(np.linalg.norm(centre)), 1e-30
        )
        pardoned: list[str] = []
        scores = {k: dict(v) for k, v in verdict.scores.items()}
        for i, name in enumerate(names):
            if not finite[i] or name not in scores:
                continue
            seen, past = self.history.get(name, (0, np.zeros(0)))
            agree = float(unit[i] @ past) if seen and past.shape == unit[i].shape else 0.0
            scores[name]["consistency"] = agree
            why = set(verdict.reasons.get(name, ()))
            if (
                why
                and why <= PARDONABLE
                and seen >= self.min_history
                and agree >= self.consistency
                and cos_centre[i] > 0
            ):
                pardoned.append(name)
            mixed = (
                unit[i]
                if not seen or past.shape != unit[i].shape
                else (self.memory * past + (1 - self.memory) * unit[i])
            )
            self.history[name] = (seen + 1, mixed / max(float(np.linalg.norm(mixed)), 1e-30))
        if not pardoned:
            return Verdict(
                verdict.status,
                verdict.kept,
                verdict.flagged,
                verdict.reasons,
                scores,
                verdict.message,
                verdict.n,
                verdict.f,
            )
        back = set(pardoned)
        reasons = {k: v for k, v in verdict.reasons.items() if k not in back}
        return Verdict(
            verdict.status,
            tuple(n for n in names if n not in reasons),
            tuple(n for n in names if n in reasons),
            reasons,
            scores,
            f"{verdict.message}; let back in on a consistent history: {', '.join(sorted(back))}",
            verdict.n,
            verdict.f,
        )

    def to_dict(self) -> dict[str, Any]:
        params = {name: getattr(self, name) for name in (*self.PARAMS, *self.HISTORY_PARAMS)}
        history = {
            c: {"rounds": seen, "direction": [float(v) for v in d]}
            for c, (seen, d) in sorted(self.history.items())
        }
        return {
            **params,
            "clients": {c: r.to_dict() for c, r in sorted(self.clients.items())},
            "history": history,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reputation:
        try:
            extra = {name: data[name] for name in cls.HISTORY_PARAMS if name in data}
            rep = cls(**{name: data[name] for name in cls.PARAMS}, **extra)
            for c, h in data.get("history", {}).items():
                d = np.asarray(h["direction"], np.float64)
                if d.ndim != 1 or not np.isfinite(d).all():
                    raise ValueError(f"history of {c!r} is not a finite vector")
                rep.history[str(c)] = (check_int("rounds", h["rounds"]), d)
            for c, r in data.get("clients", {}).items():
                rep.clients[str(c)] = ClientRecord(
                    score=check_float("score", r["score"]),
                    last_round=check_int("last_round", r["last_round"]),
                    offences=check_int("offences", r["offences"]),
                    quarantined_until=check_int(
                        "quarantined_until", r["quarantined_until"], minimum=-1
                    ),
                )
        except KeyError as exc:
            raise ValueError(f"reputation state lacks {exc.args[0]!r}") from None
        return rep
