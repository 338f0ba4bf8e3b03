#!/usr/bin/env bash
# Installs what Hearth needs on Debian 12 (run as root) and builds it.
# Idempotent: steps whose result exists are skipped.
#   scripts/install.sh            # packages, microVM prerequisites, release build
set -euo pipefail
# shellcheck source=scripts/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

# Build tools: a C compiler for crates with C parts, and git; OpenSSL headers for
# hearth-image's HTTPS client (native-tls); e2fsprogs (mkfs.ext4) to turn
# container images into disk images (debugfs: hearth-image's tests); docker-registry for hearth-image's tests;
# passwd (useradd) for the host-action sandbox's user.
pkgs=(gcc libc6-dev git ca-certificates pkg-config libssl-dev e2fsprogs docker-registry
      passwd)
apt_install_missing "${pkgs[@]}"

# Sandboxed host actions run as this unprivileged user (--run-as); it owns
# nothing of the data or work directories.
if ! id -u hearth-action >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin hearth-action
fi

if ! command -v cargo >/dev/null; then
    echo "install.sh: cargo not found. Hearth needs a Rust toolchain (1.85 or newer, e.g. from rustup)." >&2
    exit 1
fi

# QEMU, the guest kernel and the default guest image.
./scripts/install-vm.sh

cargo build --release --locked -p hearth -p hearth-bench
# The guest agent runs as PID 1 inside the VMs, and hearth-sandbox as PID 1 of
# each host-action sandbox (forking once per action): small static binaries.
RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" \
    cargo build --release --locked -p hearth-guest -p hearth-sandbox --target x86_64-unknown-linux-gnu
echo "built: $(pwd)/target/release/hearth"
