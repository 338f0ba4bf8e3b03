#!/usr/bin/env bash
# Installs what Hearth needs on Debian 12 (run as root) and builds it.
# Idempotent: steps whose result exists are skipped.
#   scripts/install.sh            # packages + release build of `hearth`
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

# Build tools: a C compiler for crates with C parts, and git.
pkgs=(gcc libc6-dev git ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "install.sh: cargo not found. Hearth needs a Rust toolchain (1.85 or newer, e.g. from rustup)." >&2
    exit 1
fi

cargo build --release --locked -p hearth -p hearth-bench
echo "built: $(pwd)/target/release/hearth"
