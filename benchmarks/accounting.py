"""Cost of one accountant decision (decide + apply) after T granted rounds.

    python benchmarks/accounting.py                   # T = 10, 100, 1000, 5000
    python benchmarks/accounting.py --rounds 1000 --repeats 9

For each T a ledger is restored with T granted rounds (q = 0.01, z = 1.0, delta = 1e-5,
budget large enough never to bind), then the next ``--repeats`` rounds are decided and
applied one by one and the median wall time is printed, for:
  same    the next round has the job's usual (q, z) (cached single-round PLD);
  mixed   rounds alternate between two (q, z) pairs already seen (both cached);
  new     a (q, z) never seen before (pays for building its single-round PLD once).
The peer is what the decision would cost without the running composition: a fresh
dp-accounting PLDAccountant over all T + 1 rounds, at QFLARE's discretisation (1e-3) and at
dp-accounting's default (1e-4). Printed: ms per decision, peer / ours, and whether ours
stays under the 100 ms per-round target. Also the restore time (restart from the ledger),
with the job's (q, z) already cached in the process, at every T alike (the stored rounds are
copies of one real decision); what a (q, z) not cached yet adds is the ``new`` column.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

from qflare.privacy import VALUE_DISCRETIZATION, BudgetPolicy, Decision, Ledger

Q, Z, DELTA = 0.01, 1.0, 1e-5
OTHER = (0.02, 1.2)


def _stored(policy: BudgetPolicy, rounds: int) -> list[Decision]:
    """T granted rounds at (Q, Z) as a ledger stores them: the first one decided for real,
    the others copies of it with their own round (restore reads job, round, q, z and granted;
    it computes the epsilon again)."""
    first = Ledger("bench", policy).decide(0, Q, Z, 1.0)
    return [replace(first, round=r, rounds_granted=r + 1) for r in range(rounds)]


def _time_decisions(ledger: Ledger, params: list[tuple[float, float]]) -> list[float]:
    times = []
    start_round = max((d.round for d in ledger.decisions()), default=-1) + 1
    for i, (q, z) in enumerate(params):
        t0 = time.perf_counter()
        decision = ledger.decide(start_round + i, q, z, 1.0)
        ledger.apply(decision)
        times.append(time.perf_counter() - t0)
    return times


def _peer(rounds: int, vdi: float) -> float:
    t0 = time.perf_counter()
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=vdi)
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z)), rounds + 1
    )
    accountant.get_epsilon(DELTA)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, nargs="*", default=[10, 100, 1000, 5000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    policy = BudgetPolicy(1e9, DELTA)
    print(
        f"q={Q} z={Z} delta={DELTA}; ours = Ledger.decide + apply (PLD grid {VALUE_DISCRETIZATION})"
    )
    header = (
        f"{'T':>6} {'restore ms':>10} {'same ms':>8} {'mixed ms':>9} {'new ms':>8} "
        f"{'peer1e-3 ms':>11} {'peer1e-4 ms':>11} {'peer1e-3/same':>13} "
        f"{'peer1e-4/same':>13} {'<100ms':>6}"
    )
    print(header)
    for rounds in args.rounds:
        stored = _stored(policy, rounds)
        t0 = time.perf_counter()
        ledger = Ledger.restore("bench", policy, stored)
        restore = time.perf_counter() - t0
        same = statistics.median(_time_decisions(ledger, [(Q, Z)] * args.repeats))
        ledger.decide(10**9, *OTHER, 1.0)  # warm the second pair's cache, charge nothing
        mixed = statistics.median(_time_decisions(ledger, [(Q, Z), OTHER] * args.repeats))
        fresh_pair = (Q, Z + 1e-3 * (rounds % 997 + 1))  # a z not used in this process
        new = _time_decisions(ledger, [fresh_pair])[0]
        peer3 = _peer(rounds, 1e-3)
        peer4 = _peer(rounds, 1e-4)
        ok = "yes" if max(same, mixed) < 0.1 else "NO"
        print(
            f"{rounds:>6} {restore * 1e3:>10.1f} {same * 1e3:>8.1f} {mixed * 1e3:>9.1f} "
            f"{new * 1e3:>8.1f} {peer3 * 1e3:>11.1f} {peer4 * 1e3:>11.1f} "
            f"{peer3 / same:>13.1f} {peer4 / same:>13.1f} {ok:>6}"
        )


if __name__ == "__main__":
    main()
