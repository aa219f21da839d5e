#!/usr/bin/env bash
# Whole orders through GraphQL to CONFIRMED, measured the way a storefront
# sees them: `commerce-kernel loadtest` against a release kernel on the
# machine's Postgres and Redis, with the payment-http and shipping-http
# plugins calling the load test's provider stub on loopback.
#
#   kernel/benches/orders.sh [--baseline REV] [--prebuilt NAME=BINARY] [--sqlite]
#                            [--kernels N] [LEVEL ...]
#
# A LEVEL is `c<N>` (closed loop, N clients) or `r<N>` (open loop, N orders/s);
# default: c1 c8 c32 c64. Each level runs on a fresh database and a fresh
# kernel, for DURATION seconds (default 20) after a 2 s warm-up.
#
# --baseline REV also builds the kernel at REV (in a git worktree under the
# target directory) and runs every level on it first, with the same load
# generator (this tree's), so before and after come from one run.
# --prebuilt NAME=BINARY measures a kernel binary built earlier (say, a copy
# of a baseline's; the file must be named commerce-kernel), named NAME in
# the results, instead of building REV again.
# --kernels N starts N kernel processes on the one database, the load spread
# over them by customer (Postgres only).
# --sqlite runs the embedded default instead (SQLite file, in-process carts).
#
# Needs: Postgres on 127.0.0.1:5432 (trust auth, may create databases) and,
# unless --sqlite, Redis on 127.0.0.1:6379. Writes results/*.json under the
# target directory and prints each report.
set -euo pipefail
cd "$(dirname "$0")/../.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/commerce-kernel-target}"
DURATION="${DURATION:-20}"
PG="${PG:-postgres://postgres@127.0.0.1:5432}"
REDIS="${REDIS:-redis://127.0.0.1:6379}"
baseline="" backend=postgres kernels=1 levels=() variants=()
while [ $# -gt 0 ]; do
  case "$1" in
    --baseline) baseline="$2"; shift 2 ;;
    --prebuilt) variants+=("${2%%=*}:${2#*=}"); shift 2 ;;
    --sqlite) backend=sqlite; shift ;;
    --kernels) kernels="$2"; shift 2 ;;
    c[0-9]*|r[0-9]*) levels+=("$1"); shift ;;
    *) echo "orders.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ ${#levels[@]} -gt 0 ] || levels=(c1 c8 c32 c64)

if [ -n "$baseline" ]; then
  # The same target directory: dependencies compiled once serve both trees.
  tree="$CARGO_TARGET_DIR/baseline-tree"
  rev=$(git rev-parse "$baseline")
  [ -d "$tree" ] || git worktree add --detach "$tree" "$rev"
  git -C "$tree" checkout --quiet --detach "$rev"
  echo "== building the baseline kernel at $rev (release)"
  # Both trees share the target directory, and cargo decides freshness by
  # the sources' times: without a clean it may take one tree's kernel for
  # the other's.
  (cd "$tree" && cargo clean --release -p commerce-kernel -p commerce-plugin-host \
    && cargo build --release -p commerce-kernel)
  mkdir -p "$CARGO_TARGET_DIR/bench/baseline"
  cp "$CARGO_TARGET_DIR/release/commerce-kernel" "$CARGO_TARGET_DIR/bench/baseline/"
  variants+=("baseline:$CARGO_TARGET_DIR/bench/baseline/commerce-kernel")
fi
echo "== building this tree's kernel and the guest plugins (release)"
if [ -n "$baseline" ]; then
  cargo clean --release -p commerce-kernel -p commerce-plugin-host
fi
cargo build --release -p commerce-kernel -p commerce-plugin-artifacts
guests="$CARGO_TARGET_DIR/release/plugin-guests/wasm32-wasip2/release"
# Copies keep the name commerce-kernel: the load test finds kernel processes
# by name for its CPU accounting.
mkdir -p "$CARGO_TARGET_DIR/bench/current"
cp "$CARGO_TARGET_DIR/release/commerce-kernel" "$CARGO_TARGET_DIR/bench/current/"
loadtest_bin="$CARGO_TARGET_DIR/bench/current/commerce-kernel"
variants+=("current:$loadtest_bin")
for variant in "${variants[@]}"; do
  name=${variant%%:*} other=${variant#*:}
  [ "$name" = current ] && continue
  if [ ! -x "$other" ]; then
    echo "orders.sh: $name: no kernel at $other" >&2
    exit 1
  fi
  if [ "$other" -ef "$loadtest_bin" ] || cmp -s "$other" "$loadtest_bin"; then
    echo "orders.sh: $name is the same binary as this tree's kernel" >&2
    exit 1
  fi
done

results="$CARGO_TARGET_DIR/results"
mkdir -p "$results"
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
pids=()
stop_kernels() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap stop_kernels EXIT

for variant in "${variants[@]}"; do
  name=${variant%%:*} binary=${variant#*:}
  for level in "${levels[@]}"; do
    data=$(mktemp -d)
    env=(COMMERCE_JWT_SECRET="$secret" COMMERCE_DATA_DIR="$data" COMMERCE_LOG=warn
         COMMERCE_PLUGINS_DIR="$data/plugins")
    if [ "$backend" = postgres ]; then
      db="bench_orders"
      psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
      env+=(COMMERCE_DATABASE_URL="$PG/$db" COMMERCE_REDIS_URL="$REDIS"
            COMMERCE_REDIS_KEY_PREFIX="bench$(date +%s%N):")
    fi
    urls=()
    for k in $(seq 1 "$kernels"); do
      port=$((18400 + k))
      env "${env[@]}" COMMERCE_LISTEN_ADDR="127.0.0.1:$port" "$binary" >"$data/kernel$k.log" 2>&1 &
      pids+=($!)
      for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
        sleep 0.2
      done
      urls+=(--url "http://127.0.0.1:$port")
    done
    case "$level" in
      c*) shape=(--clients "${level#c}") ;;
      r*) shape=(--rate "${level#r}") ;;
    esac
    out="$results/$name-$backend-k$kernels-$level.json"
    echo "== $name ($backend, $kernels kernel(s)), $level"
    env "${env[@]}" "$loadtest_bin" loadtest "${urls[@]}" "${shape[@]}" \
      --duration "$DURATION" --payment-plugin "$guests/payment_http.wasm" \
      --shipping-plugin "$guests/shipping_http.wasm" --json "$out" || true
    stop_kernels
    rm -rf "$data"
  done
done
