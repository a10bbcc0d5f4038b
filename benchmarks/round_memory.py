"""A round's aggregation with its matrix in memory against the same round spilled to a file
(``rows_in_memory_mb``; qflare.runtime.spill), measured in one run: time and the peak
resident memory (``VmHWM``) of a fresh process for each, and the ratio of the two.

Each case runs in a process of its own that writes ``--clients`` updates of ``--params``
float32 values (random, one tensor) into the round's rows as the aggregator does, then
aggregates them with the job's rule and DP on (noise multiplier 1, clip 1). In memory:
``RoundRows`` and ``aggregate_matrix``; spilled: ``SpilledRows`` under a temporary folder
and ``aggregate_source`` with the aggregator's block (``spill_block``) for a budget of
``--budget-mb``. The two models are compared bit for bit.

    python benchmarks/round_memory.py [--clients 50] [--params 5000000] [--rule mean]
                                      [--budget-mb 256] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from qflare.messages.jobs import JobSpec
from qflare.messages.tensors import Layout, RoundRows, model_digest
from qflare.runtime.spill import SpilledRows, spill_block
from qflare.services.aggregator.core import Aggregate, aggregate_matrix, aggregate_source


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(case: str, clients: int, params: int, rule: str, budget_mb: int) -> dict[str, Any]:
    ids = [f"c{i:04d}" for i in range(clients)]
    spec = JobSpec.model_validate(
        dict(
            job_id="bench",
            rounds=1,
            participants=ids,
            rule=rule,
            f=max(1, clients // 5),
            detection=False,
            noise_multiplier=1.0,
            clip=1.0,
            seed=7,
        )
    )
    base = {"w": np.zeros(params, np.float32)}
    layout = Layout.of(base)
    refs = tuple((c, c.encode(), i) for i, c in enumerate(ids))
    command = Aggregate(1, 0, tuple(ids), (), refs, 1.0, population=clients)
    budget = budget_mb * 2**20
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        rows = (
            SpilledRows(folder, clients, ids, layout)
            if case == "spilled"
            else RoundRows(clients, ids, layout)
        )
        for i, c in enumerate(ids):
            update = {"w": np.random.default_rng(i).standard_normal(params, np.float32)}
            rows.add((c, c.encode()), update)
            del update
        wrote = time.perf_counter() - start
        keys = [(c, d) for c, d, _o in refs]
        if isinstance(rows, SpilledRows):
            chosen, src = rows.source(keys)
            result = aggregate_source(
                spec, command, base, chosen, src, spill_block(budget, clients)
            )
            rows.close()
        else:
            chosen, x = rows.matrix(keys)
            result = aggregate_matrix(spec, command, base, chosen, x)
    total = time.perf_counter() - start
    return {
        "case": case,
        "write_s": wrote,
        "total_s": total,
        "vm_hwm_mib": vm_hwm_mib(),
        "digest": model_digest(result.model).hex(),
    }


def main() -> int:
    args = parse()
    if args.case:
        print(json.dumps(one(args.case, args.clients, args.params, args.rule, args.budget_mb)))
        return 0
    matrix_mib = args.clients * args.params * 4 / 2**20
    print(
        f"{args.clients} clients x {args.params} float32 ({matrix_mib:.0f} MiB of rows), rule "
        f"{args.rule}, DP on; spilled with a {args.budget_mb} MiB budget; {args.reps} reps, "
        "each case in a fresh process"
    )
    runs: dict[str, list[dict[str, Any]]] = {"memory": [], "spilled": []}
    for _ in range(args.reps):
        for case in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--case", case, *sys.argv[1:]],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[case].append(json.loads(out.stdout))
    digests = {r["digest"] for rs in runs.values() for r in rs}
    print(f"models identical across cases and reps: {len(digests) == 1}")
    print("case     | total s (median) | write s | peak RSS MiB (median)")
    for case, rs in runs.items():
        print(
            f"{case:<8} | {statistics.median(r['total_s'] for r in rs):16.2f} | "
            f"{statistics.median(r['write_s'] for r in rs):7.2f} | "
            f"{statistics.median(r['vm_hwm_mib'] for r in rs):8.0f}"
        )
    mem = {c: statistics.median(r["vm_hwm_mib"] for r in rs) for c, rs in runs.items()}
    tot = {c: statistics.median(r["total_s"] for r in rs) for c, rs in runs.items()}
    print(
        f"spilled / memory: time {tot['spilled'] / tot['memory']:.2f}x, "
        f"peak RSS {mem['spilled'] / mem['memory']:.2f}x"
    )
    return 0 if len(digests) == 1 else 1


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--params", type=int, default=5_000_000)
    parser.add_argument("--rule", default="mean")
    parser.add_argument("--budget-mb", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--case", choices=("memory", "spilled"), help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
