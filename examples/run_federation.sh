#!/usr/bin/env bash
# A whole federation on one machine, over RabbitMQ: provision, initial model, broker users,
# ten participants (examples/participant.py), the five services (`qflare up`, one process
# each), wait for the job to end, then `qflare status`, and remove the run's vhost and users.
#
#   examples/run_federation.sh [WORK_DIR]         # default: a fresh temporary folder
#
# Environment: BROKER_HOST (default 127.0.0.1:5672), QFLARE_MANAGEMENT_URL (an administrator
# of RabbitMQ's management API, default http://guest:guest@127.0.0.1:15672/; without the API,
# rabbitmqctl on this machine), VHOST (default qflare-example-<pid>), QFLARE_PREFIX (default
# example-<pid>-: the names of this run's exchanges, queues, streams, service users and
# client ids), ROUNDS (default: the 5 of examples/federation.toml), KEEP_TOPOLOGY=1 keeps the
# vhost and its users.
#
# Why RabbitMQ and not memory://: `qflare up` on memory:// runs the services in one process
# on an embedded bus that no other process can reach, so separate participant processes
# need a broker. Nobody runs as an administrator (guest) but the two administrator steps:
# `qflare broker-definitions --kit` writes the run's definitions (a vhost of its own, the
# exchanges, the services' durable queues, one user per service role, <prefix>qflare-<role>,
# and per client, with a random password kept beside each identity), broker_vhost.py loads
# them before the run and deletes the vhost and those users after it. The services and the
# participants get a broker URL without user:password, so each logs in as its own user with
# the password from its identity folder or kit, and may do only what its role needs (a
# participant: read its job's streams, publish its updates). The services run with
# QFLARE_BROKER_DECLARE=passive: they check the exchanges and their queues, which their
# users may not create; the aggregator declares the job's streams (updates.digits,
# models.digits, broadcast.digits) when it starts the job, and a participant reads the
# broadcast stream from its newest message, so one that starts before or after the round
# opened joins it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${1:-$(mktemp -d -t qflare-federation-XXXXXX)}
HOSTPORT=${BROKER_HOST:-127.0.0.1:5672}
export QFLARE_MANAGEMENT_URL=${QFLARE_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672/}
VHOST=${VHOST:-qflare-example-$$}
BROKER="amqp://$HOSTPORT/$VHOST"   # no user: each process fills in its own login
CLIENTS=10
mkdir -p "$WORK"
cd "$WORK"
# the client ids carry the prefix: a folder used again keeps its kits, so its prefix too
PREFIX=${QFLARE_PREFIX:-$(cat prefix 2>/dev/null || echo "example-$$-")}
[[ -d pki ]] || echo "$PREFIX" > prefix
echo "work folder: $WORK   broker: $BROKER   prefix: $PREFIX"

pids=()
up_pid=""
loaded=0
cleanup() {
    local rc=$?
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ -n "$up_pid" ]] && kill -0 "$up_pid" 2>/dev/null; then
        kill -TERM "$up_pid"           # qflare up forwards SIGTERM to its children
        wait "$up_pid" 2>/dev/null || true
    fi
    if [[ $loaded == 1 && "${KEEP_TOPOLOGY:-0}" != 1 ]]; then
        python "$HERE/broker_vhost.py" remove defs.json || true
    fi
    exit $rc
}
trap cleanup EXIT

# 1. identities: a CA, one per service, a kit per client (ids <prefix>client-000, ...)
[[ -d pki ]] || qflare provision --out pki --clients "$CLIENTS" --client-prefix "${PREFIX}client"

# 2. the job (its participants: this run's client ids) and its round-0 model; the broker
#    definitions (a participant of each [[jobs]] may read its streams and publish its
#    updates), loaded into the run's own vhost by an administrator
sed "s/\"client-/\"${PREFIX}client-/g" "$HERE/federation.toml" > federation.toml
if [[ -n "${ROUNDS:-}" ]]; then
    sed -i "s/^rounds = .*/rounds = $ROUNDS/" federation.toml
fi
python "$HERE/make_model.py" --out digits-mlp.safetensors
qflare broker-definitions --kit pki --config federation.toml --prefix "$PREFIX" \
    --vhost "$VHOST" --out defs.json
loaded=1   # from here on the cleanup removes the vhost and the users (also a partial load)
python "$HERE/broker_vhost.py" load defs.json
echo "[$(date -u +%T)] kits, model and broker users ready"

# 3. the five services, one process each (logs: up.log), and ten participants, each in
#    its own process with its own kit and share of digits (logs: <client id>.log)
QFLARE_BROKER_DECLARE=passive \
    qflare up --config federation.toml --broker "$BROKER" --prefix "$PREFIX" > up.log 2>&1 &
up_pid=$!
for i in $(seq 0 $((CLIENTS - 1))); do
    id=$(printf '%sclient-%03d' "$PREFIX" "$i")
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
tail -n 1 -q "$PREFIX"client-*.log
[[ $failed == 0 ]] || { echo "a participant failed; see $WORK/${PREFIX}client-*.log and up.log"; exit 1; }

# 5. what the services stored
qflare status --config federation.toml
qflare alerts --config federation.toml --limit 10
