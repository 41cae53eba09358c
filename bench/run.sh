#!/usr/bin/env bash
# Measures securechat against the Node `ws` tutorial server and Bun's
# built-in pub/sub, side by side on this machine, and writes
# docs/benchmarks.md and docs/benchmarks/*.png.
#
#   bench/run.sh              the full comparison (about 30 minutes)
#   QUICK=1 bench/run.sh      small counts and rates (about 3 minutes)
#
# Knobs (environment variables):
#   QUICK=1                 small loads, one repetition
#   REPS=N                  repetitions of each run (default 3, quick 1)
#   SERVERS=a,b             which servers (default securechat,ws,bun)
#   SCENARIOS=a,b           which scenarios (default idle,capacity,fanout,handshake,slow,pair)
#   PAIR_REPS=N             repetitions of the pair scenario with each peer (default 9, quick 2)
#   PAIR_RATES=a,b          the pair scenario's loads, both servers together (default: the lowest fan-out load and 40000)
#   IDLE_CONNECTIONS=N      idle scenario (default 10000)
#   CAPACITY_CONNECTIONS=N  capacity scenario (default 19500)
#   FANOUT_MEMBERS=N        members of the fan-out room (default 1000)
#   FANOUT_RATES=a,b        offered deliveries/s (default 100000,800000)
#   DURATION=S              seconds per measured window (default 10)
#   SERVER_CPU=0 LOAD_CPU=1 the cores the servers and the load generator get
#   UPDATE=1                keep the other runs of the last results, replace these (of these servers)
#   SKIP_BUILD=1            use the binaries already in target/release
#   SKIP_INSTALL=1          do not run bench/peers/install.sh
#
# Every run is bounded in time and connections and only targets 127.0.0.0/8.
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."

command -v taskset >/dev/null || { echo "run.sh: taskset is missing (apt-get install util-linux)" >&2; exit 1; }
if [ "$(nproc)" -lt 2 ]; then
  echo "run.sh: needs 2 cores (server and load generator on their own)" >&2
  exit 1
fi
if [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  echo "== installing fonts-dejavu-core for the charts"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fonts-dejavu-core >/dev/null
fi
if [ "${SKIP_BUILD:-}" != 1 ]; then
  echo "== cargo build --release (securechat, securechat-bench)"
  cargo build --release --quiet --bin securechat
  cargo build --release --quiet -p securechat-bench
fi
if [ "${SKIP_INSTALL:-}" != 1 ]; then
  echo "== peers"
  bench/peers/install.sh
fi
# 20,000 connections need 20,000 descriptors in the server and in the load generator.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

args=()
[ "${QUICK:-}" = 1 ] && args+=(--quick)
[ -n "${REPS:-}" ] && args+=(--reps "$REPS")
[ -n "${SERVERS:-}" ] && args+=(--servers "$SERVERS")
[ -n "${SCENARIOS:-}" ] && args+=(--scenarios "$SCENARIOS")
[ -n "${PAIR_REPS:-}" ] && args+=(--pair-reps "$PAIR_REPS")
[ -n "${PAIR_RATES:-}" ] && args+=(--pair-rates "$PAIR_RATES")
[ -n "${IDLE_CONNECTIONS:-}" ] && args+=(--idle-connections "$IDLE_CONNECTIONS")
[ -n "${CAPACITY_CONNECTIONS:-}" ] && args+=(--capacity-connections "$CAPACITY_CONNECTIONS")
[ -n "${FANOUT_MEMBERS:-}" ] && args+=(--fanout-members "$FANOUT_MEMBERS")
[ -n "${FANOUT_RATES:-}" ] && args+=(--fanout-rates "$FANOUT_RATES")
[ -n "${DURATION:-}" ] && args+=(--duration "$DURATION")
[ "${UPDATE:-}" = 1 ] && args+=(--update)
echo "== suite ${args[*]:-}"
exec taskset -c "${LOAD_CPU:-1}" target/release/securechat-bench suite \
  --server-cpu "${SERVER_CPU:-0}" --load-cpu "${LOAD_CPU:-1}" "${args[@]}"
