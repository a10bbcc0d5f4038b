#!/usr/bin/env bash
# Test-only peers for qflare.robust's equivalence tests, benchmarks/aggregation.py and the
# Flower bridge's job test. Both without their dependencies: byzfl's pull torchvision (whose
# wheels do not load beside our CPU torch) and seaborn; flwr's pin rich<15 and a web stack.
# The tests load byzfl.aggregators/attacks (they need scipy, which scikit-learn brings),
# flwr/server/strategy/aggregate.py (NumPy only; see benchmarks/peers.py) and
# flwr.client.NumPyClient (the few dependencies below).
set -euo pipefail
PY=${1:-python3}
$PY -m pip install -q --no-deps byzfl==0.0.11 flwr==1.42.0
# `from flwr.client import NumPyClient` (tests/integration/test_flower_bridge_job.py) imports
# Flower's generated protobuf code and its CLI helpers: these of its pins, but not rich<15 or
# packaging<26, which would downgrade what the tests run with (the client does not need them).
$PY -m pip install -q "protobuf>=5.28,<7" "grpcio>=1.70,<2" "httpx>=0.28.1,<1" \
    "typer>=0.13,<0.21" "pycryptodome>=3.18,<4" "iterators>=0.0.2,<0.0.3"
$PY - <<'PYEOF'
import sys
sys.path.insert(0, "benchmarks")
import peers
peers.load_byzfl()
peers.load_flwr_aggregate()
from flwr.client import NumPyClient
print("peers: byzfl, flwr aggregate and flwr.client.NumPyClient load")
PYEOF
