#!/usr/bin/env bash
# Per-order cost as the shop ages (issue 16): the same load on the same
# catalog, measured on a young database and again after AGE events
# (default 1,000,000) were added to the hot products' inventory streams.
#
#   kernel/benches/aging.sh [KERNEL_BINARY]   (default: this tree's release build)
#
# Postgres only (the events are added with SQL). Each measured run starts a
# fresh kernel process, so both pay a cold cache: the aged one replays each
# hot stream once, in its warm-up. Writes results/aging-{young,aged}.json.
set -euo pipefail
cd "$(dirname "$0")/../.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/commerce-kernel-target}"
PG="${PG:-postgres://postgres@127.0.0.1:5432}"
REDIS="${REDIS:-redis://127.0.0.1:6379}"
AGE="${AGE:-1000000}" DURATION="${DURATION:-20}" CLIENTS="${CLIENTS:-8}"
binary="${1:-$CARGO_TARGET_DIR/release/commerce-kernel}"
guests="$CARGO_TARGET_DIR/release/plugin-guests/wasm32-wasip2/release"
[ -x "$binary" ] || { echo "aging.sh: no kernel at $binary" >&2; exit 1; }
results="$CARGO_TARGET_DIR/results"
mkdir -p "$results"

db=bench_aging port=18420 stub_port=18421 data=$(mktemp -d)
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
env=(COMMERCE_JWT_SECRET="$secret" COMMERCE_DATA_DIR="$data" COMMERCE_LOG=warn
     COMMERCE_PLUGINS_DIR="$data/plugins" COMMERCE_DATABASE_URL="$PG/$db"
     COMMERCE_REDIS_URL="$REDIS" COMMERCE_REDIS_KEY_PREFIX="aging$(date +%s%N):"
     COMMERCE_LISTEN_ADDR="127.0.0.1:$port")
pid=""
start_kernel() {
  env "${env[@]}" "$binary" >>"$data/kernel.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && return 0
    sleep 0.2
  done
  echo "aging.sh: the kernel did not get ready" >&2
  exit 1
}
stop_kernel() {
  if [ -n "$pid" ]; then
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=""
  fi
}
trap stop_kernel EXIT
loadtest() {
  env "${env[@]}" "$binary" loadtest --url "http://127.0.0.1:$port" --clients "$CLIENTS" \
    --stub-port "$stub_port" "$@"
}
measure() {
  start_kernel
  echo "== $1"
  loadtest --use-catalog --duration "$DURATION" --warmup 5 \
    --json "$results/aging-$1.json" || true
  stop_kernel
}

echo "== set-up: catalog and plugins (the plugins call the stub on port $stub_port)"
start_kernel
loadtest --duration 3 --warmup 0 --payment-plugin "$guests/payment_http.wasm" \
  --shipping-plugin "$guests/shipping_http.wasm" >/dev/null
stop_kernel

measure young

echo "== adding $AGE events to the hot inventory streams"
# StockAdjusted by 0: the stock stays as it is, every stream gets longer.
psql "$PG/$db" -q <<SQL
INSERT INTO events (id, aggregate_id, aggregate_type, event_type, schema_version,
                    event_data, version, actor, created_at)
SELECT gen_random_uuid(), s.aggregate_id, 'inventory', 'StockAdjusted', 1,
       jsonb_build_object('product_id', s.product_id, 'delta', 0, 'reason', 'aging'),
       s.version + g, 'aging.sh', now()
FROM (SELECT aggregate_id, max(version) AS version,
             (array_agg(event_data->>'product_id'))[1]::uuid AS product_id
        FROM events WHERE aggregate_type = 'inventory' GROUP BY aggregate_id) s,
     generate_series(1, $AGE / (SELECT count(DISTINCT aggregate_id) FROM events
                                 WHERE aggregate_type = 'inventory')) g;
ANALYZE events;
SQL
psql "$PG/$db" -Atc "SELECT 'inventory events now: ' || count(*) FROM events WHERE aggregate_type = 'inventory'"

echo "== the projections catch up on the added events"
start_kernel
for _ in $(seq 1 900); do
  lag=$(psql "$PG/$db" -Atc "SELECT count(*) FROM events e, projection_checkpoints c
    WHERE c.name = 'inventory' AND e.aggregate_type = 'inventory'
      AND (e.transaction_id, e.sequence) > (c.transaction_id, c.sequence)")
  [ "$lag" = 0 ] && break
  sleep 1
done
stop_kernel

measure aged
