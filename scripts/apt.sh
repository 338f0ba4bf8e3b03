# Sourced by the install scripts: apt helpers.

# Prints those of the given Debian packages that are not installed.
apt_missing() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"
    done
}

# Installs those of the given Debian packages that are not installed yet
# (updating the package lists only when something is missing).
apt_install_missing() {
    local missing
    mapfile -t missing < <(apt_missing "$@")
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
    # Installing one package can remove another that conflicts with it in
    # the version the machine had (a backported qemu-utils goes when
    # Debian's qemu-system-x86 comes); install those again, in the versions
    # that go together.
    mapfile -t missing < <(apt_missing "$@")
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}
