"""What a simulation leaves behind: per-round records, detection scores, report files, plots.

``report.json`` is the machine-readable record (configuration, one entry per round, the
summary); ``report.md`` says the same for a person; ``accuracy.png`` and ``epsilon.png`` plot
accuracy (with the no-attack baseline when one was run) and epsilon spent per round.

Every epsilon is reported with its coverage (``qflare.privacy.policy.privacy_charge``, the
function the aggregator charges with; docs/privacy.md): with detection on and no
``dp_filter_bound``, or a rule other than ``mean``, the epsilon is that of the noise added,
not a DP guarantee, and both files say so next to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RoundRecord:
    """One published round as the simulator observed it."""

    round: int
    accuracy: float
    loss: float
    participants: tuple[str, ...]
    flagged: tuple[str, ...]
    byzantine: tuple[str, ...]
    epsilon: float | None
    latency_s: float
    #: clients whose update ingest refused (e.g. NON_FINITE); they never reached the detector
    rejected: tuple[str, ...] = ()
    #: flagged by the detector but kept in the round: the job's dp_filter_bound k lets the
    #: aggregator remove only the k highest-scored
    kept_flagged: tuple[str, ...] = ()
    #: the clip norm the round ran at (it moves from round to round with adaptive clipping)
    clip: float | None = None

    @property
    def stopped(self) -> set[str]:
        """Clients kept out of the round, by ingest or by the detector."""
        return (set(self.flagged) - set(self.kept_flagged)) | set(self.rejected)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["participants"] = list(self.participants)
        data["flagged"] = list(self.flagged)
        data["byzantine"] = list(self.byzantine)
        data["rejected"] = list(self.rejected)
        data["kept_flagged"] = list(self.kept_flagged)
        data["loss"] = _finite_or_none(self.loss)
        return data


@dataclass(frozen=True)
class DetectionScore:
    """Detection over all rounds, counting (client, round) pairs."""

    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int

    @property
    def precision(self) -> float | None:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else None

    @property
    def recall(self) -> float | None:
        positives = self.true_positives + self.false_negatives
        return self.true_positives / positives if positives else None

    @property
    def false_positive_rate(self) -> float | None:
        negatives = self.false_positives + self.true_negatives
        return self.false_positives / negatives if negatives else None

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "precision": self.precision,
            "recall": self.recall,
            "false_positive_rate": self.false_positive_rate,
        }


def score_detection(
    rounds: Sequence[RoundRecord], attackers: Collection[str] | None = None
) -> DetectionScore:
    """A Byzantine client counts as caught when ingest rejected its update or the detector
    flagged it (also when a dp_filter_bound then kept it: this scores the detector); an
    honest client caught either way is a false positive. ``attackers``: who attacked, when
    not each round's ``byzantine`` (a run with no attack has none)."""
    tp = fp = fn = tn = 0
    for r in rounds:
        byz = set(r.byzantine if attackers is None else attackers)
        flagged = set(r.flagged) | set(r.rejected)
        for client in r.participants:
            if client in byz:
                tp += client in flagged
                fn += client not in flagged
            else:
                fp += client in flagged
                tn += client not in flagged
    return DetectionScore(tp, fp, fn, tn)


@dataclass
class RunResult:
    """A finished run: what was asked, what happened each round, and how it ended."""

    config: dict[str, Any]
    rounds: list[RoundRecord]
    byzantine_clients: tuple[str, ...]
    path: str
    broker: str | None
    wall_s: float
    ended: str = "completed"
    notes: list[str] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1].accuracy if self.rounds else None

    @property
    def detection(self) -> DetectionScore:
        return score_detection(self.rounds)

    @property
    def final_epsilon(self) -> float | None:
        return self.rounds[-1].epsilon if self.rounds else None

    @property
    def epsilon_coverage(self) -> str | None:
        """``clipped_sum`` / ``filter_bounded`` / ``noise_only``; None with DP off."""
        return coverage_of(self.config)

    def summary(self) -> dict[str, Any]:
        coverage = self.epsilon_coverage
        return {
            "rounds_completed": len(self.rounds),
            "final_accuracy": self.final_accuracy,
            "best_accuracy": max((r.accuracy for r in self.rounds), default=None),
            "final_loss": _finite_or_none(self.rounds[-1].loss) if self.rounds else None,
            "final_epsilon": self.final_epsilon,
            "epsilon_coverage": coverage,
            "epsilon_note": COVERAGE_NOTES.get(coverage or "", "DP off: no privacy guarantee"),
            "detection": self.detection.to_json(),
            "ended": self.ended,
            "wall_s": round(self.wall_s, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "broker": self.broker,
            "config": self.config,
            "byzantine_clients": list(self.byzantine_clients),
            "rounds": [r.to_json() for r in self.rounds],
            "summary": self.summary(),
            "notes": list(self.notes),
        }


COVERAGE_NOTES = {
    "clipped_sum": "DP guarantee (rule mean, nothing filtered before the noisy sum)",
    "filter_bounded": "DP guarantee for a filter removing at most k updates per round "
    "(charged at z/(2k+1), q=1)",
    "noise_only": "epsilon of the noise added; NOT a DP guarantee: a data-dependent filter "
    "or robust rule ran before the noisy sum",
}


def coverage_of(cfg: dict[str, Any]) -> str | None:
    """What a run's epsilon covers, from its configuration (None with DP off)."""
    from qflare.privacy.policy import privacy_charge

    if not _dp_on(cfg):
        return None
    return privacy_charge(
        rule=str(cfg.get("rule_resolved", cfg.get("rule"))),
        detection=bool(cfg.get("detection")),
        sample_rate=float(cfg.get("sample_rate", 1.0)),
        noise_multiplier=float(cfg["noise_multiplier"]),
        dp_filter_bound=cfg.get("dp_filter_bound"),
    ).coverage


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ``report.json`` that must not depend on the transport or timing:
    per-round accuracy, loss, participants, flags, truth and epsilon."""
    return {
        "config": {k: v for k, v in report["config"].items() if k != "broker"},
        "byzantine_clients": report["byzantine_clients"],
        "rounds": [{k: v for k, v in r.items() if k != "latency_s"} for r in report["rounds"]],
    }


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return value


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _eps(value: float | None) -> str:
    if value is None:
        return "off"
    return "inf" if not math.isfinite(value) else f"{value:.3f}"


def write_report(out: Path, result: RunResult, baseline: RunResult | None = None) -> list[Path]:
    """Write report.json, report.md and the plots into ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    if baseline is not None:
        data["baseline"] = baseline.to_json()
    written = [out / "report.json", out / "report.md"]
    (out / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(render_markdown(result, baseline))
    written += write_plots(out, result, baseline)
    return written


def render_markdown(result: RunResult, baseline: RunResult | None = None) -> str:
    cfg = result.config
    det = result.detection
    lines = [
        "# QFLARE simulation report",
        "",
        f"- data set: {cfg.get('dataset')}, model: {cfg.get('model')}, "
        f"split: {'IID' if cfg.get('alpha') is None else 'Dirichlet alpha=' + str(cfg.get('alpha'))}",
        f"- clients: {cfg.get('clients')}, Byzantine: {cfg.get('byzantine')} "
        f"({', '.join(result.byzantine_clients) or 'none'}), attack: {cfg.get('attack')}",
        f"- rule: {cfg.get('rule_resolved', cfg.get('rule'))}, detection: "
        f"{'on' if cfg.get('detection') else 'off'}",
        f"- rounds: {len(result.rounds)}/{cfg.get('rounds')} ({result.ended}), local epochs: "
        f"{cfg.get('local_epochs')}, lr: {cfg.get('lr')}, batch: {cfg.get('batch_size')}",
        f"- DP: {_dp_line(cfg)}",
        f"- run by: {result.path}" + (f" over {result.broker}" if result.broker else ""),
        f"- wall time: {result.wall_s:.1f} s",
        "",
        "## Summary",
        "",
        "| measure | value |",
        "|---|---|",
        f"| final accuracy | {_pct(result.final_accuracy)} |",
    ]
    if baseline is not None:
        lines.append(f"| no-attack baseline accuracy | {_pct(baseline.final_accuracy)} |")
    lines += [
        f"| detection precision | {_pct(det.precision)} |",
        f"| detection recall | {_pct(det.recall)} |",
        f"| detection false-positive rate | {_pct(det.false_positive_rate)} |",
        f"| epsilon spent | {_eps(result.final_epsilon)}"
        + (
            f" ({result.epsilon_coverage}: {COVERAGE_NOTES[result.epsilon_coverage]})"
            if result.epsilon_coverage
            else ""
        )
        + " |",
        "",
        "## Rounds",
        "",
        "| round | accuracy | loss | flagged | rejected at ingest | Byzantine stopped | "
        f"epsilon{' (noise only, not a DP guarantee)' if result.epsilon_coverage == 'noise_only' else ''} "
        "| latency (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rounds:
        caught = len(r.stopped & set(r.byzantine))
        lines.append(
            f"| {r.round} | {_pct(r.accuracy)} | "
            f"{'inf' if not math.isfinite(r.loss) else f'{r.loss:.4f}'} | {len(r.flagged)} | {len(r.rejected)} | "
            f"{caught}/{len(r.byzantine)} | {_eps(r.epsilon)} | {r.latency_s:.3f} |"
        )
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    lines += [
        "",
        "Plots: `accuracy.png`"
        + (", `epsilon.png`" if _dp_on(cfg) else " (DP off: no epsilon plot)"),
        "",
    ]
    return "\n".join(lines)


def _dp_on(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("noise_multiplier"))


def _dp_line(cfg: dict[str, Any]) -> str:
    clip = f"C={cfg.get('clip')}"
    if cfg.get("adaptive_clip"):
        clip += (
            f" in round 1, then adaptive (target quantile {cfg.get('clip_target_quantile')}, "
            f"learning rate {cfg.get('clip_learning_rate')})"
        )
    if not _dp_on(cfg):
        return f"off (updates clipped to {clip}, no noise, no privacy guarantee)"
    target = cfg.get("target_epsilon")
    return (
        f"noise multiplier z={cfg.get('noise_multiplier'):.4g}, clip {clip}, "
        f"delta={cfg.get('delta')}" + (f", planned for epsilon={target}" if target else "")
    )


def write_plots(out: Path, result: RunResult, baseline: RunResult | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(
        [r.round for r in result.rounds],
        [100 * r.accuracy for r in result.rounds],
        marker="o",
        markersize=3,
        label=f"{result.config.get('attack')} / {result.config.get('rule_resolved', result.config.get('rule'))}",
    )
    if baseline is not None:
        ax.plot(
            [r.round for r in baseline.rounds],
            [100 * r.accuracy for r in baseline.rounds],
            linestyle="--",
            label="no-attack baseline",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("accuracy per round")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    written.append(out / "accuracy.png")

    if _dp_on(result.config):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        points = [(r.round, r.epsilon) for r in result.rounds if r.epsilon is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_xlabel("round")
        ax.set_ylabel(f"epsilon spent (delta={result.config.get('delta')})")
        ax.grid(alpha=0.3)
        ax.set_title("privacy spent per round")
        fig.tight_layout()
        fig.savefig(out / "epsilon.png", dpi=110)
        plt.close(fig)
        written.append(out / "epsilon.png")
    return written
