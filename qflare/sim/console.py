"""Progress bar per round and the end-of-run summary table (rich)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qflare.sim.report import COVERAGE_NOTES, RoundRecord, RunResult


@contextmanager
def round_progress(
    console: Console, label: str, total: int, enabled: bool = True
) -> Iterator[Callable[[RoundRecord], None]]:
    """Yield a callback ``on_round(record)`` that advances a bar showing the last accuracy."""
    if not enabled:
        yield lambda record: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "acc {task.fields[acc]}  flagged {task.fields[flagged]}  eps {task.fields[eps]}"
        ),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(label, total=total, acc="-", flagged="-", eps="-")

        def on_round(record: RoundRecord) -> None:
            caught = len(record.stopped & set(record.byzantine))
            progress.update(
                task,
                advance=1,
                acc=f"{100 * record.accuracy:5.1f}%",
                flagged=f"{len(record.stopped)} ({caught}/{len(record.byzantine)} byz)",
                eps="off" if record.epsilon is None else f"{record.epsilon:.2f}",
            )

        yield on_round


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary_table(result: RunResult, baseline: RunResult | None = None) -> Table:
    cfg = result.config
    det = result.detection
    table = Table(title="qflare simulate: summary", show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("attack", f"{cfg['attack']} ({cfg['byzantine']} of {cfg['clients']} Byzantine)")
    table.add_row("rule", str(cfg.get("rule_resolved", cfg["rule"])))
    table.add_row("detection", "on" if cfg["detection"] else "off")
    table.add_row("rounds", f"{len(result.rounds)}/{cfg['rounds']} ({result.ended})")
    table.add_row("final accuracy", _pct(result.final_accuracy))
    if baseline is not None:
        table.add_row("no-attack baseline", _pct(baseline.final_accuracy))
    table.add_row("detection precision", _pct(det.precision))
    table.add_row("detection recall", _pct(det.recall))
    table.add_row("false-positive rate", _pct(det.false_positive_rate))
    eps = result.final_epsilon
    table.add_row("epsilon spent", "DP off" if eps is None else f"{eps:.3f} (delta={cfg['delta']})")
    if eps is not None and result.epsilon_coverage:
        # never show an epsilon without what it covers (docs/privacy.md)
        table.add_row("epsilon covers", COVERAGE_NOTES[result.epsilon_coverage])
    table.add_row("run by", result.path + (f" over {result.broker}" if result.broker else ""))
    table.add_row("wall time", f"{result.wall_s:.1f} s")
    return table
