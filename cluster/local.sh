#!/usr/bin/env bash
# A local Ray cluster for `ray job submit`: start | stop | status. Stops exactly the processes it started
# (by the process groups it recorded), never `ray stop`, so other Ray clusters on the machine are untouched.
#   cluster/local.sh start [EXTRA_WORKER_NODES]   head on 127.0.0.1 (dashboard :8265) + N worker nodes
#   cluster/local.sh status
#   cluster/local.sh stop
# Then: RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 -- python -m progrow_ray.pipeline
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${PROGROW_LOCAL_CLUSTER_DIR:-.ray-local}
RAY=${RAY:-$(command -v ray || echo .venv/bin/ray)}
GCS_PORT=${GCS_PORT:-6390}
DASH_PORT=${DASH_PORT:-8265}
CPUS=${CPUS:-4}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
# Every Ray process of this cluster inherits it: Ray Train's placement-group cleaner (and any state-API
# client) then asks this cluster's dashboard instead of guessing from /tmp/ray/ray_current_cluster, which a
# run with --temp-dir never writes and another cluster may have left stale ("Timed out while waiting for
# GCS to become available", and the run's placement groups are never removed).
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASH_PORT"
AGENT_PORT=${AGENT_PORT:-$((DASH_PORT + 1))}  # not the default 52365, which another cluster may hold

start_node() {  # name, args...
  local name=$1; shift
  setsid "$RAY" start --block "$@" >"$STATE/$name.log" 2>&1 &
  echo $! >"$STATE/$name.pid"
}

case "${1:-}" in
  start)
    if [ -f "$STATE/head.pid" ] && kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; then
      echo "already running (head pid $(cat "$STATE/head.pid"))"; exit 0
    fi
    mkdir -p "$STATE"
    tmp=$(mktemp -d /tmp/prl.XXXX)  # short: Ray's socket paths must fit in 107 bytes
    echo "$tmp" >"$STATE/tmpdir"
    start_node head --head --port="$GCS_PORT" --num-cpus="$CPUS" --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
      --node-ip-address=127.0.0.1 --temp-dir="$tmp"
    for _ in $(seq 1 60); do
      curl -sf "http://127.0.0.1:$DASH_PORT/api/version" >/dev/null && break
      sleep 1
    done
    curl -sf "http://127.0.0.1:$DASH_PORT/api/version" >/dev/null || { echo "head did not start: see $STATE/head.log"; exit 1; }
    for i in $(seq 1 "${2:-0}"); do
      start_node "worker$i" --address="127.0.0.1:$GCS_PORT" --num-cpus="$CPUS" --node-ip-address=127.0.0.1 \
        --dashboard-agent-listen-port="$((AGENT_PORT + i))"
    done
    echo "Ray head at http://127.0.0.1:$DASH_PORT (gcs 127.0.0.1:$GCS_PORT), ${2:-0} extra worker node(s)"
    ;;
  status)
    [ -d "$STATE" ] || { echo "not running"; exit 1; }
    for f in "$STATE"/*.pid; do
      [ -e "$f" ] || continue
      pid=$(cat "$f"); n=$(basename "$f" .pid)
      if kill -0 "$pid" 2>/dev/null; then echo "$n: running (pid $pid)"; else echo "$n: stopped"; fi
    done
    ;;
  stop)
    [ -d "$STATE" ] || { echo "not running"; exit 0; }
    for f in "$STATE"/worker*.pid "$STATE"/head.pid; do
      [ -e "$f" ] || continue
      pid=$(cat "$f")
      kill -TERM -- "-$pid" 2>/dev/null || true  # the whole process group this script started
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      rm -f "$f"
    done
    [ -f "$STATE/tmpdir" ] && rm -rf "$(cat "$STATE/tmpdir")" "$STATE/tmpdir"
    echo "stopped"
    ;;
  *) echo "usage: $0 start [EXTRA_WORKER_NODES] | status | stop" >&2; exit 2 ;;
esac
