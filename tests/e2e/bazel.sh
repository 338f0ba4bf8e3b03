#!/usr/bin/env bash
# Run a real Bazel client, offline and hermetically, on tests/e2e/workspace.
#
#   tests/e2e/bazel.sh 2.1|4.2 OUTPUT_ROOT COMMAND [ARGS...]
#
# OUTPUT_ROOT becomes --output_user_root (one Bazel server per root and version).
# COMMAND is any Bazel command; ARGS are appended after our flags, so they win
# (e.g. --remote_executor=grpc://127.0.0.1:PORT). `shutdown` stops the server.
#
# Environment:
#   HEARTH_BAZEL21 / HEARTH_BAZEL42  client binaries (defaults below; install
#                                    with scripts/install-bazel.sh)
#   HEARTH_E2E_WORKSPACE             workspace dir (default: ./workspace here)
#   HEARTH_BAZEL_MAX_IDLE            server idle timeout in s (default 900), so a
#                                    test that forgets `shutdown` leaves no server
#   HEARTH_BAZEL_KEEP_ENV=1          pass the caller's environment through
#                                    (default: a fixed minimal one)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ $# -lt 3 ]; then
    echo "usage: $0 2.1|4.2 OUTPUT_ROOT COMMAND [ARGS...]" >&2
    exit 2
fi
version=$1 out_root=$2 cmd=$3
shift 3

ws=${HEARTH_E2E_WORKSPACE:-$here/workspace}
stubs=$here/stubs
ws=$(realpath -m "$ws")
out_root=$(realpath -m "$out_root")
mkdir -p "$out_root"
# Both versions would use the same output base (<root>/md5(workspace)) under one
# root and fight over it: insist on one version per OUTPUT_ROOT.
marker=$out_root/.hearth-bazel-version
if [ -f "$marker" ] && [ "$(cat "$marker")" != "$version" ]; then
    echo "bazel.sh: $out_root belongs to Bazel $(cat "$marker"); use another OUTPUT_ROOT for $version" >&2
    exit 2
fi
echo "$version" > "$marker"

startup=(
    "--output_user_root=$out_root"
    --ignore_all_rc_files                        # no /etc, ~/.bazelrc, workspace rc
    "--max_idle_secs=${HEARTH_BAZEL_MAX_IDLE:-900}"
)
case $version in
2.1)
    bazel=${HEARTH_BAZEL21:-/opt/hearth-deps/bazel21/bazel}
    ;;
4.2)
    # Debian's bazel-bootstrap: /usr/bin/bazel is a bazelisk-like wrapper; the real
    # client is bazel-4 and it is not self-extracting. Debian's own system rc
    # (ignored above) supplies the install base; we pass it explicitly.
    bazel=${HEARTH_BAZEL42:-/usr/bin/bazel-4}
    startup+=(--install_base=/usr/share/bazel --trust_install_base)
    ;;
*)
    echo "bazel.sh: unknown version '$version' (want 2.1 or 4.2)" >&2
    exit 2
    ;;
esac
[ -x "$bazel" ] || { echo "bazel.sh: $bazel missing; run scripts/install-bazel.sh" >&2; exit 2; }

# The repositories Bazel would download for cc/sh rules, replaced by local stubs.
overrides=(
    "--override_repository=rules_cc=$stubs/rules_cc"
    "--override_repository=rules_java=$stubs/rules_java"
    "--override_repository=remote_coverage_tools=$stubs/remote_coverage_tools"
)
common=(--noshow_progress --color=no --curses=no)
build=(
    --symlink_prefix=/                           # no bazel-* symlinks in the workspace
    --incompatible_strict_action_env             # PATH=/bin:/usr/bin:/usr/local/bin in actions
    --test_output=errors
)

case $cmd in
build | test | run | coverage | cquery | aquery)
    flags=("${common[@]}" "${overrides[@]}" "${build[@]}") ;;
query | fetch | sync | info)
    flags=("${common[@]}" "${overrides[@]}") ;;
*)  # shutdown, version, clean, help, ...
    flags=() ;;
esac

if [ "${HEARTH_BAZEL_KEEP_ENV:-0}" != 1 ]; then
    # Fixed environment: Bazel's C toolchain autodetection (local_config_cc) and
    # the client env are then the same on every machine, so action digests are too.
    envcmd=(env -i "HOME=${HOME:-/root}" "USER=${USER:-root}" LANG=C.UTF-8
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        "TMPDIR=${TMPDIR:-/tmp}")
else
    envcmd=()
fi

cd "$ws"
exec "${envcmd[@]}" "$bazel" "${startup[@]}" "$cmd" "${flags[@]}" "$@"
