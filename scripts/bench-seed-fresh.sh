#!/bin/bash
# The seed's `docker run` in a fresh VM with init-dockerd=true, clean
# snapshots on and off, alternating servers (A B A B) so drift cancels.
# Each server is `hearth up` on its own data dir, run alone; the image
# (busybox standing in for ubuntu:20.04) comes from a local docker-registry
# that is dockerd's mirror. The first action of each server is not counted
# (with clean snapshots on, it makes the snapshot the others clone).
# Usage: scripts/bench-seed-fresh.sh [ROUNDS] [ACTIONS] (default 2 2)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
actions=${2:-2}
cargo build --release --locked -q -p hearth -p hearth-bench -p hearth-testkit
. scripts/bench-lib.sh
port=19891
tmp=$(mktemp -d)
trap 'exec 3>&-; rm -rf "$tmp"' EXIT
# The registry stops when fd 3 closes.
exec 3> >("$bin/hearth-test-registry" >"$tmp/registry")
until [ -s "$tmp/registry" ]; do sleep 0.2; done
registry=$(cat "$tmp/registry")
run() {
    label=$1
    shift
    hearth_start $port --insecure-registry "$registry" --docker-mirror "http://$registry" "$@"
    echo "== clean snapshots $label"
    "$bin/hearth-bench" --server grpc://127.0.0.1:$port --vm-actions "$actions" --vm-start docker-run |
        grep MicroVM
    hearth_stop
}
on_off_rounds "$rounds"
