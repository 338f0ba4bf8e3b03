#!/bin/sh
# MicroVM start figures with clean snapshots on and off, alternating
# servers (A B A B) so drift cancels: fresh VMs, fresh VMs with dockerd,
# bursts of three equal-key actions, and recycled ones. Each server is
# `hearth up` on its own data dir, run alone (never two at once).
# Usage: scripts/bench-vm-starts.sh [ROUNDS] (default 2)
set -eu
cd "$(dirname "$0")/.."
rounds=${1:-2}
. scripts/bench-lib.sh
port=19890
run() {
    label=$1
    shift
    hearth_start $port --capacity 3 "$@"
    echo "== clean snapshots $label"
    for mode in "cold 10" "dockerd 3" "burst 3" "recycled 10"; do
        set -- $mode
        "$bin/hearth-bench" --server grpc://127.0.0.1:$port --vm-actions "$2" --vm-start "$1" |
            grep MicroVM
    done
    hearth_stop
}
on_off_rounds "$rounds"
