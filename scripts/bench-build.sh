#!/usr/bin/env bash
# The build benchmark: a generated C workspace built by real Bazel 4.2 locally
# (linux-sandbox) and remotely on `hearth up` (host runner, sandbox on), in
# turns (local, remote, remote with --remote_download_minimal; A B C A B C) so
# drift cancels. Every build is clean: `bazel clean` first, and each remote
# build gets a fresh `hearth up` (empty CAS and action cache). Prints each
# wall time, the medians and the ratios, then where the last remote build's
# time went (Bazel's profile and the server's /metrics).
#
#   scripts/bench-build.sh [ROUNDS] [LIBRARIES] [LAYERS]    # default 3 60 6
#
# The last round's profiles, logs and /metrics pages are kept in
# target/bench-build/. Environment: JOBS (Bazel --jobs, default 4, both modes), CAPACITY (the
# executor's slots, default the number of cores), HEARTH_ARGS (more flags for
# `hearth up`), PORT (default 19871).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} libraries=${2:-60} layers=${3:-6}
jobs=${JOBS:-4} port=${PORT:-19871} capacity=${CAPACITY:-$(nproc)}
bin=target/release
modes=${MODES:-local remote minimal}
[ -z "${BEFORE:-}" ] || modes+=" before"

scratch=$(mktemp -d /tmp/hearth-build-bench.XXXXXX)
ws=$scratch/workspace
"$bin/hearth-bench" --generate-workspace "$ws" --libraries "$libraries" --layers "$layers"
export HEARTH_E2E_WORKSPACE=$ws

bazel() { # bazel ROOT COMMAND ARGS...
    local root=$1
    shift
    tests/e2e/bazel.sh 4.2 "$scratch/$root" "$@"
}

hearth_pid=
start_hearth() {
    # A new data dir each time, the old ones deleted only at the end: deleting
    # a store of thousands of files just before a build slows the next
    # seconds' file creation (ext4 without a journal steps over recently
    # freed inodes), which would be the benchmark's artefact, not Hearth's.
    local data
    data=$(mktemp -d "$scratch/hearth-data.XXXXXX")
    local hearth=$bin/hearth
    [ "$1" = before ] && hearth=$BEFORE
    # shellcheck disable=SC2086
    "$hearth" up --listen "127.0.0.1:$port" --data-dir "$data" --vm off \
        --capacity "$capacity" --web-listen off --metrics-listen "127.0.0.1:$((port + 1))" \
        ${HEARTH_ARGS:-} >"$scratch/hearth.log" 2>&1 &
    hearth_pid=$!
    until "$bin/hearth" status --server "grpc://127.0.0.1:$port" 2>/dev/null | grep -q " busy "; do
        kill -0 "$hearth_pid" 2>/dev/null || { cat "$scratch/hearth.log" >&2; exit 1; }
        sleep 0.2
    done
}
stop_hearth() {
    [ -n "$hearth_pid" ] || return 0
    kill "$hearth_pid" 2>/dev/null || true
    wait "$hearth_pid" 2>/dev/null || true
    hearth_pid=
}
keep=target/bench-build
cleanup() {
    stop_hearth
    mkdir -p "$keep"
    cp "$scratch"/*.json "$scratch"/*.log "$scratch"/*.metrics "$keep"/ 2>/dev/null || true
    for root in $modes; do
        [ -d "$scratch/$root" ] && bazel "$root" shutdown >/dev/null 2>&1 || true
    done
    rm -rf "$scratch"
}
trap cleanup EXIT

remote=(
    "--remote_executor=grpc://127.0.0.1:$port" --spawn_strategy=remote
    --remote_local_fallback=false --remote_default_exec_properties=OSFamily=Linux
    --remote_timeout=60
)
declare -A flags=(
    [local]="--spawn_strategy=linux-sandbox"
    [remote]="${remote[*]}"
    [minimal]="${remote[*]} --remote_download_minimal"
    [before]="${remote[*]}"
)
declare -A times=() cpus=()

# fetch_metrics PORT FILE: the /metrics page, body only, over bash's own TCP
# (no curl on a minimal Debian).
fetch_metrics() {
    exec 3<>"/dev/tcp/127.0.0.1/$1"
    printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    sed '1,/^\r$/d' <&3 >"$2"
    exec 3<&-
}

# One clean build of every target and test; prints its wall time and the
# CPU time the hearth process used (threads, not the actions), in seconds.
build() { # MODE
    local mode=$1 t0 t1 cpu=0
    # shellcheck disable=SC2086
    bazel "$mode" clean >/dev/null 2>&1
    [ "$mode" = local ] || start_hearth "$mode"
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    if ! bazel "$mode" test //... --jobs="$jobs" --profile="$scratch/$mode.profile.json" \
        ${flags[$mode]} >"$scratch/$mode.log" 2>&1; then
        cat "$scratch/$mode.log" >&2
        echo "bench-build: the $mode build failed" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    if [ "$mode" != local ]; then
        fetch_metrics "$((port + 1))" "$scratch/$mode.metrics"
        cpu=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$hearth_pid/stat")
        stop_hearth
    fi
    awk -v a="$t0" -v b="$t1" -v c="$cpu" 'BEGIN { printf "%.2f %s", b - a, c }'
}

# A first build of each mode starts the Bazel servers and warms the disk;
# not counted.
for mode in $modes; do build "$mode" >/dev/null; done
grep -hE 'processes|Executed' "$scratch"/*.log | sed 's/^/warm-up: /'

for r in $(seq "$rounds"); do
    for mode in $modes; do
        out=$(build "$mode")
        read -r t c <<<"$out"
        times[$mode]+="$t "
        cpus[$mode]+="$c "
        echo "round $r: $mode ${t} s (hearth CPU ${c} s)"
    done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
l=$(median <<<"${times[local]:-1}")
echo
printf '| build (%s libraries, %s layers, --jobs=%s, capacity %s) | wall times (s) | median (s) | / local | hearth CPU, median (s) |\n' \
    "$libraries" "$layers" "$jobs" "$capacity"
echo '|---|---|---|---|---|'
for mode in $modes; do
    m=$(median <<<"${times[$mode]}")
    printf '| %s | %s | %s | %s | %s |\n' "$mode" "${times[$mode]% }" "$m" \
        "$(awk -v a="$m" -v b="$l" 'BEGIN { printf "%.2f", a / b }')" \
        "$(median <<<"${cpus[$mode]}")"
done
echo
grep -hE '[0-9]+ processes' "$scratch"/*.log | sed 's/^/spawns: /'
for mode in $modes; do
    echo
    if [ "$mode" = local ]; then
        "$bin/hearth-bench" --bazel-profile "$scratch/local.profile.json"
    else
        "$bin/hearth-bench" --bazel-profile "$scratch/$mode.profile.json" \
            --metrics-file "$scratch/$mode.metrics"
    fi
done
