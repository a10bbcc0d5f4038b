"""Per-client reputation across rounds: a decayed offence score with quarantine.

Each flag adds ``penalty`` to the client's score, which decays by ``decay`` per round
elapsed (an exponentially weighted count of recent flags, cf. the reputation schemes
surveyed by Lyu et al., "Privacy and Robustness in Federated Learning", IEEE TNNLS 2022).
A score reaching ``threshold`` quarantines the client for ``quarantine_rounds`` rounds.
Pure: the state exports to and imports from plain dicts (the detector service persists it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ._core import check_float, check_int


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

    def __init__(
        self,
        decay: float = 0.8,
        penalty: float = 1.0,
        threshold: float = 2.5,
        quarantine_rounds: int = 5,
    ) -> None:
        self.decay = check_float("decay", decay)
        if self.decay > 1:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.penalty = check_float("penalty", penalty, strict=True)
        self.threshold = check_float("threshold", threshold, strict=True)
        self.quarantine_rounds = check_int("quarantine_rounds", quarantine_rounds, minimum=1)
        self.clients: dict[str, ClientRecord] = {}

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

    def to_dict(self) -> dict[str, Any]:
        params = {name: getattr(self, name) for name in self.PARAMS}
        return {**params, "clients": {c: r.to_dict() for c, r in sorted(self.clients.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reputation:
        try:
            rep = cls(**{name: data[name] for name in cls.PARAMS})
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
