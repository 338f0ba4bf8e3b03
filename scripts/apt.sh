# Sourced by the install scripts: apt helpers.

# Installs those of the given Debian packages that are not installed yet
# (updating the package lists only when something is missing).
apt_install_missing() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}
