#!/usr/bin/env bash
# A whole federation on one machine, over RabbitMQ: provision, initial model, ten
# participants (examples/participant.py), the five services (`qflare up`, one process
# each), wait for the job to end, then `qflare status`, and remove the broker topology.
#
#   examples/run_federation.sh [WORK_DIR]         # default: a fresh temporary folder
#
# Environment: QFLARE_BROKER (default amqp://guest:guest@127.0.0.1:5672/), QFLARE_PREFIX
# (default example-<pid>-: exchanges, queues and streams of this run, deleted at the end),
# ROUNDS (default: the 5 of examples/federation.toml), KEEP_TOPOLOGY=1 keeps them.
#
# Why RabbitMQ and not memory://: `qflare up` on memory:// runs the services in one process
# on an embedded bus that no other process can reach, so separate participant processes
# need a broker. Nothing is declared beforehand: the services declare the exchanges and their
# queues, the aggregator declares the job's streams (updates.digits, models.digits,
# broadcast.digits) when it starts the job, and a participant reads the broadcast stream from
# its newest message, so one that starts before or after the round opened joins it.
# Everyone connects as guest here; the definitions file (defs.json: per-client and per-role
# users and permissions, a participant's limited to the streams of its jobs in
# federation.toml) is written but not imported, since importing it (`rabbitmqctl
# import_definitions`) changes the whole broker's users.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${1:-$(mktemp -d -t qflare-federation-XXXXXX)}
BROKER=${QFLARE_BROKER:-amqp://guest:guest@127.0.0.1:5672/}
PREFIX=${QFLARE_PREFIX:-example-$$-}
CLIENTS=10
mkdir -p "$WORK"
cd "$WORK"
echo "work folder: $WORK   broker prefix: $PREFIX"

pids=()
up_pid=""
cleanup() {
    local rc=$?
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ -n "$up_pid" ]] && kill -0 "$up_pid" 2>/dev/null; then
        kill -TERM "$up_pid"           # qflare up forwards SIGTERM to its children
        wait "$up_pid" 2>/dev/null || true
    fi
    if [[ "${KEEP_TOPOLOGY:-0}" != 1 ]]; then
        python "$HERE/teardown.py" --broker "$BROKER" --prefix "$PREFIX" --job digits || true
    fi
    exit $rc
}
trap cleanup EXIT

# 1. identities: a CA, one per service, a kit per client
[[ -d pki ]] || qflare provision --out pki --clients "$CLIENTS"

# 2. the job and its round-0 model; broker users and permissions for a real broker (the
#    participants of each [[jobs]] may read its streams and publish its updates); unused here
cp "$HERE/federation.toml" federation.toml
if [[ -n "${ROUNDS:-}" ]]; then
    sed -i "s/^rounds = .*/rounds = $ROUNDS/" federation.toml
fi
python "$HERE/make_model.py" --out digits-mlp.safetensors
qflare broker-definitions --kit pki --config federation.toml --prefix "$PREFIX" --out defs.json
echo "[$(date -u +%T)] kits, model and broker definitions ready"

# 3. the five services, one process each (logs: up.log), and ten participants, each in
#    its own process with its own kit and share of digits (logs: client-<i>.log)
qflare up --config federation.toml --broker "$BROKER" --prefix "$PREFIX" > up.log 2>&1 &
up_pid=$!
for i in $(seq 0 $((CLIENTS - 1))); do
    id=$(printf 'client-%03d' "$i")
    python "$HERE/participant.py" --kit "pki/clients/$id" --broker "$BROKER" --prefix "$PREFIX" \
        --job digits --clients "$CLIENTS" --timeout 600 > "$id.log" 2>&1 &
    pids+=($!)
done
echo "[$(date -u +%T)] qflare up and $CLIENTS participants started"

# 4. the job ends when every participant has received job.ended
failed=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed=1
done
pids=()
echo "[$(date -u +%T)] the job ended"
tail -n 1 -q client-*.log
[[ $failed == 0 ]] || { echo "a participant failed; see $WORK/client-*.log and up.log"; exit 1; }

# 5. what the services stored
qflare status --config federation.toml
qflare alerts --config federation.toml --limit 10
