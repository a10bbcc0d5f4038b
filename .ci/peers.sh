#!/usr/bin/env bash
# Test-only peers for qflare.robust's equivalence tests and benchmarks/aggregation.py.
# Both without their dependencies: byzfl's pull torchvision (whose wheels do not load
# beside our CPU torch) and seaborn; flwr's pin rich<15 and a web stack. The tests load
# only byzfl.aggregators/attacks (they need scipy, which scikit-learn brings) and the single file
# flwr/server/strategy/aggregate.py (NumPy only); see benchmarks/peers.py.
set -euo pipefail
PY=${1:-python3}
$PY -m pip install -q --no-deps byzfl==0.0.11 flwr==1.42.0
$PY - <<'PYEOF'
import sys
sys.path.insert(0, "benchmarks")
import peers
peers.load_byzfl()
peers.load_flwr_aggregate()
print("peers: byzfl and flwr aggregate load")
PYEOF
