#!/usr/bin/env bash
# The scale-out benchmark: `hearth-bench --tiers` against the embedded store
# and state (one `hearth up`), and against an S3 bucket (SeaweedFS) with
# Redis state (`hearth up` as replica A, where blobs go up and no-op actions
# run, and `hearth server` as replica B with an empty disk, where they are
# looked up and read: first from the bucket, then from B's disk), in turns
# (A B A B) so drift cancels. Prints every run's table, then the medians.
#
#   scripts/bench-scale-out.sh [ROUNDS]          # default 3
#
# Needs a release build (scripts/install.sh) and the test servers
# (scripts/install-test-servers.sh). Environment: PORT (default 19881; uses
# the next nine ports too), ACTIONS (no-op actions per run, default 300),
# BEFORE (an earlier `hearth` binary: its embedded figures are taken in the
# same turns, for "the embedded default is no slower than before"), MODES
# (default "embedded s3"; "embedded" alone with BEFORE for that comparison;
# "embedded redis" for Redis state and queue on the disk CAS, one replica:
# its figures land in the S3 + Redis column).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} port=${PORT:-19881} actions=${ACTIONS:-300}
bin=target/release
scratch=$(mktemp -d /tmp/hearth-scale-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

s3_port=$((port + 2)) redis_port=$((port + 3))
cat >"$scratch/identities.json" <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
mkdir -p "$scratch/weed"
weed mini -dir="$scratch/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port=$((port + 4)) -master.port.grpc=$((port + 14)) \
    -volume.port=$((port + 5)) -volume.port.grpc=$((port + 15)) \
    -filer.port=$((port + 6)) -filer.port.grpc=$((port + 16)) \
    -s3.port=$s3_port -s3.port.grpc=$((port + 12)) \
    -admin.port=$((port + 7)) -admin.port.grpc=$((port + 17)) -admin.ui=false \
    -master.telemetry=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.config="$scratch/identities.json" -bucket=bench >"$scratch/weed.log" 2>&1 &
pids+=($!)
redis-server --bind 127.0.0.1 --port $redis_port --save "" --appendonly no \
    --dir "$scratch" --logfile "$scratch/redis.log" &
pids+=($!)
until curl -s "http://127.0.0.1:$s3_port/bench/" | grep -q AccessDenied; do sleep 0.2; done
export AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port AWS_ACCESS_KEY_ID=bench \
    AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true

wait_ready() { # wait_ready PORT PID
    until "$bin/hearth" status --server "grpc://127.0.0.1:$1" >/dev/null 2>&1; do
        kill -0 "$2" 2>/dev/null || { cat "$scratch"/*.log >&2; exit 1; }
        sleep 0.2
    done
}

run() { # run MODE ROUND
    local a=$port b=$((port + 1)) shared=() read_at=()
    if [ "$1" = s3 ]; then
        shared=(--cas-store "s3://bench/round$2" --state "redis://127.0.0.1:$redis_port/0")
    elif [ "$1" = redis ]; then
        shared=(--state "redis://127.0.0.1:$redis_port/0")
    fi
    local hearth=$bin/hearth
    [ "$1" = before ] && hearth=$BEFORE
    "$hearth" up --listen "127.0.0.1:$a" --data-dir "$(mktemp -d "$scratch/a.XXXX")" \
        --vm off --web-listen off "${shared[@]}" >"$scratch/a.log" 2>&1 &
    local up_pid=$!
    wait_ready $a $up_pid
    local server_pid=
    if [ "$1" = s3 ]; then
        "$bin/hearth" server --listen "127.0.0.1:$b" --data-dir "$(mktemp -d "$scratch/b.XXXX")" \
            "${shared[@]}" >"$scratch/b.log" 2>&1 &
        server_pid=$!
        wait_ready $b $server_pid
        read_at=(--read-server "grpc://127.0.0.1:$b")
    fi
    "$bin/hearth-bench" --server "grpc://127.0.0.1:$a" "${read_at[@]}" --tiers \
        --actions "$actions" | tee -a "$scratch/$1.txt"
    kill $up_pid $server_pid 2>/dev/null || true
    wait $up_pid $server_pid 2>/dev/null || true
}

modes=${MODES:-embedded s3}
[ -z "${BEFORE:-}" ] || modes+=" before"
for i in $(seq 1 "$rounds"); do
    for mode in $modes; do
        echo "== round $i: $mode"
        run "$mode" "$i"
    done
done

echo
echo "== medians over $rounds rounds"
other=s3
[[ " $modes " == *" redis "* ]] && other=redis
python3 - "$scratch/embedded.txt" "$scratch/$other.txt" "$scratch/before.txt" <<'PY'
import re, statistics, sys
def rows(path):
    out = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0].startswith("benchmark") or set(cells[0]) <= {"-"}:
            continue
        for k, (label, num, unit) in enumerate(re.findall(r"(p50 |p99 )?([\d.]+) ?(\S+)", cells[1])):
            out.setdefault((cells[0], label.strip(), unit.strip(",")), []).append(float(num))
    return out
import os
emb = rows(sys.argv[1])
s3 = rows(sys.argv[2]) if os.path.exists(sys.argv[2]) else {}
before = rows(sys.argv[3]) if os.path.exists(sys.argv[3]) else {}
med = lambda d, k: statistics.median(d[k]) if k in d else float("nan")
head = f"| {'benchmark':<62} | {'embedded':>18} | {'S3 + Redis':>18} | {'ratio':>6} |"
print(head + (f" {'embedded before':>18} | {'now/before':>10} |" if before else ""))
print("|" + "|".join("-" * (len(c) + 2) for c in head.strip("|").split("|")) + "|" + ("-" * 20 + "|" + "-" * 12 + "|" if before else ""))
for key in emb:
    name, label, unit = key
    e, s = med(emb, key), med(s3, key)
    title = f"{name} {label}".strip()
    line = f"| {title:<62} | {e:>10.2f} {unit:<7} | {s:>10.2f} {unit:<7} | {s / e:>5.2f}x |"
    if before:
        b = med(before, key)
        line += f" {b:>10.2f} {unit:<7} | {e / b:>9.2f}x |"
    print(line)
PY
