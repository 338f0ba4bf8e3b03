# Sourced by the benchmark scripts: one `hearth up` at a time on its own
# data dir, with microVMs under emulation.
bin=target/release

# hearth_start PORT ARGS...: starts `hearth up` on 127.0.0.1:PORT and waits
# until it offers microVMs; sets hearth_pid and hearth_dir.
hearth_start() {
    local port=$1
    shift
    hearth_dir=$(mktemp -d)
    "$bin/hearth" up --listen "127.0.0.1:$port" --data-dir "$hearth_dir" --vm tcg "$@" \
        >"$hearth_dir/log" 2>&1 &
    hearth_pid=$!
    until "$bin/hearth" status --server "grpc://127.0.0.1:$port" 2>/dev/null | grep -q firecracker; do
        kill -0 "$hearth_pid" 2>/dev/null || { cat "$hearth_dir/log" >&2; return 1; }
        sleep 0.5
    done
}

# hearth_stop: stops the server hearth_start started and removes its data.
hearth_stop() {
    kill "$hearth_pid"
    wait "$hearth_pid" || true
    rm -rf "$hearth_dir"
}

# on_off_rounds N: calls the script's `run LABEL ARGS...` N times with clean
# snapshots on, then off, alternating (A B A B) so drift cancels.
on_off_rounds() {
    local i=0
    while [ "$i" -lt "$1" ]; do
        run on
        run off --vm-clean-snapshots off
        i=$((i + 1))
    done
}
