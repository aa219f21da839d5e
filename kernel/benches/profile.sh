#!/usr/bin/env bash
# What one order costs the database: a kernel binary under
# `commerce-kernel loadtest` on a fresh Postgres database, with
# pg_stat_statements and the database's counters reset once the kernel is
# ready. Prints the load test's report, then per order: statements and
# their execution time, WAL bytes, committed transactions (reads
# included), and the 30 most frequent statements.
#
#   kernel/benches/profile.sh BINARY GUESTS_DIR LEVEL SECONDS
#
# LEVEL is c<N> (closed loop) or r<N> (open loop), as in orders.sh;
# GUESTS_DIR holds payment_http.wasm and shipping_http.wasm (for a release
# build: $CARGO_TARGET_DIR/release/plugin-guests/wasm32-wasip2/release).
#
# Needs Postgres on 127.0.0.1:5432 with pg_stat_statements loaded
# (shared_preload_libraries = 'pg_stat_statements' and
# pg_stat_statements.track = all, then CREATE EXTENSION pg_stat_statements
# in database postgres), Redis on 127.0.0.1:6379, and port 18499 free.
# PG_PARAMS is appended to the kernel's database URL (for example
# '?sslmode=disable' to see what TLS to the database costs).
set -euo pipefail
[ $# -eq 4 ] || { sed -n '2,20p' "$0" >&2; exit 2; }
binary=$1 guests=$2 level=$3 seconds=$4
PG="${PG:-postgres://postgres@127.0.0.1:5432}"
db=bench_profile
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
data=$(mktemp -d)
export COMMERCE_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export COMMERCE_DATA_DIR=$data COMMERCE_LOG=warn COMMERCE_PLUGINS_DIR=$data/plugins \
  COMMERCE_DATABASE_URL=$PG/$db${PG_PARAMS:-} COMMERCE_REDIS_URL=redis://127.0.0.1:6379 \
  COMMERCE_REDIS_KEY_PREFIX="profile$(date +%s%N):"
COMMERCE_LISTEN_ADDR=127.0.0.1:18499 "$binary" >"$data/kernel.log" 2>&1 &
kernel=$!
trap 'kill $kernel 2>/dev/null || true; wait $kernel 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18499/ready >/dev/null && break; sleep 0.2; done
psql "$PG/postgres" -qAtc "SELECT pg_stat_statements_reset()" >/dev/null
psql "$PG/$db" -qAtc "SELECT pg_stat_reset()" >/dev/null
wal_before=$(psql "$PG/postgres" -Atc "SELECT pg_current_wal_lsn()")
case "$level" in
  c*) shape=(--clients "${level#c}") ;;
  r*) shape=(--rate "${level#r}") ;;
  *) echo "profile.sh: LEVEL is c<N> or r<N>" >&2; exit 2 ;;
esac
"$binary" loadtest --url http://127.0.0.1:18499 "${shape[@]}" --duration "$seconds" \
  --payment-plugin "$guests/payment_http.wasm" --shipping-plugin "$guests/shipping_http.wasm" || true
wal_after=$(psql "$PG/postgres" -Atc "SELECT pg_current_wal_lsn()")
orders=$(psql "$PG/$db" -Atc "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'order'")
[ "$orders" -gt 0 ] || { echo "profile.sh: no orders" >&2; exit 1; }
this_db="dbid = (SELECT oid FROM pg_database WHERE datname = '$db')"
echo "orders (warm-up included): $orders"
psql "$PG/postgres" -Atc "SELECT 'statements per order: ' || round(sum(calls)::numeric / $orders, 1) \
  || ', execution ms per order: ' || round((sum(total_exec_time) / $orders)::numeric, 3) \
  FROM pg_stat_statements WHERE $this_db"
psql "$PG/postgres" -Atc "SELECT 'WAL bytes per order: ' || round(pg_wal_lsn_diff('$wal_after', '$wal_before') / $orders)"
psql "$PG/$db" -Atc "SELECT 'commits per order: ' || round(xact_commit::numeric / $orders, 1) \
  FROM pg_stat_database WHERE datname = '$db'"
psql "$PG/postgres" -c "SELECT round(calls::numeric / $orders, 2) AS per_order, \
  round(mean_exec_time::numeric, 3) AS mean_ms, left(regexp_replace(query, '\s+', ' ', 'g'), 150) AS statement \
  FROM pg_stat_statements WHERE $this_db ORDER BY calls DESC LIMIT 30"
