#!/usr/bin/env bash
# Installs what criuweb and its lab need on a Debian machine, as root.
# Every step checks first, so a second run only verifies and is quick.
set -euo pipefail

CRIU_PREFIX=/opt/criuweb/criu
# The stamp names this script's content: an edited script runs in full again.
STAMP=/var/lib/criuweb/.system-ready-$(md5sum "$0" | cut -c1-12)

log() { printf 'setup: %s\n' "$*"; }

need_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

criu_works() {
    command -v criu >/dev/null 2>&1 && criu check >/dev/null 2>&1
}

# Debian 12's criu 3.17 fails `criu check` on kernels that map [vvar_vclock]
# (it learned that layout in 4.x), and Debian 13's criu needs glibc >= 2.38.
# So we unpack Debian 13's criu with its own libc into a private prefix and
# point the binary at it with DT_RPATH: RUNPATH would not reach the libraries'
# own dependencies, and LD_LIBRARY_PATH would leak into ip/iptables/tar that
# criu runs. A host whose criu already passes keeps its own.
install_criu() {
    if criu_works; then
        log "criu $(criu --version | awk '/Version/ {print $2}') passes criu check"
        return
    fi
    log "installing criu 4.1.1 from Debian 13 into $CRIU_PREFIX"
    if [ ! -f /etc/apt/sources.list.d/criuweb-trixie.sources ]; then
        cat > /etc/apt/sources.list.d/criuweb-trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        # Priority 1: the suite is only a place to download from; nothing
        # on this system is ever upgraded from it.
        cat > /etc/apt/preferences.d/criuweb-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 1
PIN
    fi
    apt-get update -qq
    local dl
    dl=$(mktemp -d)
    chmod 755 "$dl"
    (cd "$dl" && apt-get download -qq \
        criu/trixie libcompel1/trixie libc6/trixie libgnutls30t64/trixie \
        libnftables1/trixie libnl-3-200/trixie libprotobuf-c1/trixie libnet1/trixie \
        libbsd0/trixie libuuid1/trixie libunistring5/trixie libidn2-0/trixie \
        libp11-kit0/trixie libtasn1-6/trixie libnettle8t64/trixie \
        libhogweed6t64/trixie libgmp10/trixie libffi8/trixie libmd0/trixie \
        libnftnl11/trixie libmnl0/trixie libjansson4/trixie libxtables12/trixie)
    rm -rf "$CRIU_PREFIX"
    mkdir -p "$CRIU_PREFIX"
    for deb in "$dl"/*.deb; do dpkg -x "$deb" "$CRIU_PREFIX"; done
    rm -rf "$dl"
    local lib="$CRIU_PREFIX/usr/lib/x86_64-linux-gnu"
    patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$lib" \
        "$CRIU_PREFIX/usr/sbin/criu"
    # /usr/local/sbin comes before /usr/sbin in root's PATH, for SSH sessions
    # and for the Docker engines (runc looks criu up on PATH).
    ln -sf "$CRIU_PREFIX/usr/sbin/criu" /usr/local/sbin/criu
    hash -r
    criu check >/dev/null 2>&1 || { log "criu check still fails:"; criu check; exit 1; }
    log "criu $(criu --version | awk '/Version/ {print $2}') installed, criu check passes"
}

main() {
    if [ "$(id -u)" != 0 ]; then
        echo "setup: must run as root (it installs system packages and runs CRIU)" >&2
        exit 1
    fi
    if [ -f "$STAMP" ] && criu_works; then
        return
    fi
    need_packages docker.io containerd runc openssh-server openssh-client busybox-static \
        iproute2 iptables patchelf tar procps util-linux ca-certificates python3 python3-venv chromium
    install_criu
    mkdir -p "$(dirname "$STAMP")"
    rm -f /var/lib/criuweb/.system-ready-*
    touch "$STAMP"
}

main "$@"
