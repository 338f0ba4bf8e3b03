#!/usr/bin/env bash
# Runs Hearth's whole test suite: lint, unit and integration tests, and the
# end-to-end tests with real Bazel 2.1 and 4.2, SeaweedFS and Redis
# (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

./scripts/install-bazel.sh
# The scale-out tests run a real S3 server (SeaweedFS) and redis-server.
./scripts/install-test-servers.sh
# The web view's browser test drives Debian's Chromium.
. scripts/apt.sh
DEBIAN_FRONTEND=noninteractive apt_install_missing chromium
cargo fmt --all --check
cargo clippy --release --locked --all-targets -- -D warnings
cargo test --release --locked --workspace
