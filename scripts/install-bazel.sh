#!/usr/bin/env bash
# Install the two real Bazel clients used by Hearth's end-to-end tests.
#   Bazel 4.2.x : Debian package bazel-bootstrap -> /usr/bin/bazel-4
#   Bazel 2.1.0 : npm @bazel/bazel-linux_x64@2.1.0 -> /opt/hearth-deps/bazel21/...
# Idempotent: each step is skipped when its result already exists.
# Run as root on Debian 12. Prints the path of each bazel binary at the end.
set -euo pipefail

DEPS=${HEARTH_DEPS:-/opt/hearth-deps}
B21_DIR="$DEPS/bazel21"
B21_BIN="$B21_DIR/node_modules/@bazel/bazel-linux_x64/bazel-2.1.0-linux-x86_64"

# --- Bazel 4.2 (Debian) ------------------------------------------------------
if ! dpkg-query -W -f='${Status}' bazel-bootstrap 2>/dev/null | grep -q 'ok installed'; then
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends bazel-bootstrap; then
        apt-get update
        apt-get install -y --no-install-recommends bazel-bootstrap
    fi
fi
# /usr/bin/bazel is a bazelisk-like wrapper script; bazel-4 is the real client.
B42_BIN=$(command -v bazel-4 || true)
[ -x "$B42_BIN" ] || { echo "install-bazel: bazel-bootstrap installed but no bazel-4 on PATH" >&2; exit 1; }

# --- Bazel 2.1 (npm) ---------------------------------------------------------
if [ ! -x "$B21_BIN" ]; then
    command -v npm >/dev/null || {
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends npm || { apt-get update; apt-get install -y --no-install-recommends npm; }
    }
    mkdir -p "$B21_DIR"
    [ -f "$B21_DIR/package.json" ] || echo '{"name":"hearth-bazel21","private":true}' > "$B21_DIR/package.json"
    (cd "$B21_DIR" && npm install --no-audit --no-fund --loglevel=error @bazel/bazel-linux_x64@2.1.0)
    if [ ! -x "$B21_BIN" ]; then
        found=$(find "$B21_DIR/node_modules/@bazel" -maxdepth 2 -type f -name 'bazel-*linux*' | head -n1)
        [ -n "$found" ] || { echo "install-bazel: no bazel binary under $B21_DIR/node_modules/@bazel" >&2; exit 1; }
        chmod +x "$found"
        B21_BIN=$found
    fi
fi
# Stable symlink so callers need not know the npm layout.
ln -sfn "$B21_BIN" "$B21_DIR/bazel"

echo "bazel 4.2: $B42_BIN"
echo "bazel 2.1: $B21_DIR/bazel -> $B21_BIN"
