#!/usr/bin/env bash
# Installs what criuweb and its lab need on a Debian machine, as root.
# Every step checks first, so a second run only verifies and is quick.
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "$0")" && pwd)
SELFTEST="$HERE/../migrations_app/criu_selftest.py"
CRIU_HOME=/opt/criuweb
MEMHOG_SRC="$HERE/memhog.c"
MEMHOG=$CRIU_HOME/bin/memhog
# The stamp names the content of this script and of what it builds or runs:
# an edited one runs the setup in full again.
STAMP=/var/lib/criuweb/.system-ready-$(cat "$0" "$SELFTEST" "$MEMHOG_SRC" | md5sum | cut -c1-12)

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

# `criu check` is not enough: CRIU 4.1.1 passes it on Linux >= 6.16 but
# cannot dump any TCP or UDP socket there (checkpoint-restore/criu#2705).
# The self-test dumps and restores a process holding a listening socket;
# it prints one JSON line whose "error" is CRIU's own.
selftest() {
    python3 "$SELFTEST" --criu "$1"
}

add_suite() {  # name: Debian suite to download from, never to upgrade from
    local suite=$1
    [ -f "/etc/apt/sources.list.d/criuweb-$suite.sources" ] && return
    cat > "/etc/apt/sources.list.d/criuweb-$suite.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    # Priority 1: the suite is only a place to download from; nothing on
    # this system is ever installed or upgraded from it.
    cat > "/etc/apt/preferences.d/criuweb-$suite" <<PIN
Package: *
Pin: release n=$suite
Pin-Priority: 1
PIN
}

# Debian 12's criu 3.17 fails `criu check` on kernels that map [vvar_vclock],
# Debian 13's 4.1.1 cannot dump sockets on Linux >= 6.16, and Debian forky's
# 4.2.1 (which can) needs glibc >= 2.38. So we unpack forky's criu with
# Debian 13's libc into a private prefix and point the binary at it with
# DT_RPATH: RUNPATH would not reach the libraries' own dependencies, and
# LD_LIBRARY_PATH would leak into ip/iptables/tar that criu runs. A host
# whose criu already passes the self-test keeps its own.
install_criu() {
    local result
    if criu_works && result=$(selftest "$(command -v criu)"); then
        log "criu $(criu --version | awk '/Version/ {print $2}') passes criu check and the socket self-test"
        return
    fi
    if command -v criu >/dev/null 2>&1; then
        log "criu on PATH ($(command -v criu)) fails: ${result:-criu check fails}"
    fi
    local prefix
    prefix=$(unpack_criu)
    local bin="$prefix/usr/sbin/criu"
    "$bin" check >/dev/null 2>&1 || { log "criu check fails with $bin:"; "$bin" check; exit 1; }
    result=$(selftest "$bin") || { log "the socket self-test fails with $bin: $result"; exit 1; }
    # /usr/local/sbin comes before /usr/sbin in root's PATH, for SSH sessions
    # and for the Docker engines (runc looks criu up on PATH). Swapped with a
    # rename, so a criu starting meanwhile finds the old or the new one.
    ln -sfn "$bin" /usr/local/sbin/criu.new
    mv -T /usr/local/sbin/criu.new /usr/local/sbin/criu
    hash -r
    # Earlier unpacked versions; a criu still running from one keeps its files open.
    for old in "$CRIU_HOME"/criu "$CRIU_HOME"/criu-*; do
        [ -e "$old" ] && [ "$old" != "$prefix" ] && rm -rf "$old"
    done
    log "criu $(criu --version | awk '/Version/ {print $2}') installed in $prefix: criu check and the socket self-test pass"
}

# Prints the prefix of an unpacked forky criu, reusing one unpacked earlier.
unpack_criu() {
    local existing
    for existing in "$CRIU_HOME"/criu-[0-9]*[0-9]/usr/sbin/criu; do
        if [ -x "$existing" ] && selftest "$existing" >/dev/null; then
            dirname "$(dirname "$(dirname "$existing")")"
            return
        fi
    done
    log "downloading criu from Debian forky" >&2
    add_suite trixie
    add_suite forky
    apt-get update -qq
    local dl
    dl=$(mktemp -d)
    chmod 755 "$dl"
    # criu and what needs a newer version than trixie has from forky; the
    # rest (libc included) from trixie, the suite 4.1.1 came from.
    if ! (cd "$dl" && apt-get download -qq \
        criu/forky libcompel1/forky libnet9/forky libnl-3-200/forky \
        libc6/trixie libgnutls30t64/trixie libnftables1/trixie libprotobuf-c1/trixie \
        libbsd0/trixie libuuid1/trixie libunistring5/trixie libidn2-0/trixie \
        libp11-kit0/trixie libtasn1-6/trixie libnettle8t64/trixie \
        libhogweed6t64/trixie libgmp10/trixie libffi8/trixie libmd0/trixie \
        libnftnl11/trixie libmnl0/trixie libjansson4/trixie libxtables12/trixie >"$dl/log" 2>&1); then
        cat "$dl/log" >&2
        exit 1
    fi
    local version
    version=$(dpkg-deb -f "$dl"/criu_*.deb Version | cut -d- -f1)
    local prefix="$CRIU_HOME/criu-$version"
    rm -rf "$prefix.new"
    mkdir -p "$prefix.new"
    for deb in "$dl"/*.deb; do dpkg -x "$deb" "$prefix.new"; done
    rm -rf "$dl"
    local lib="$prefix/usr/lib/x86_64-linux-gnu"
    patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$lib" \
        "$prefix.new/usr/sbin/criu"
    rm -rf "$prefix"
    mv "$prefix.new" "$prefix"
    echo "$prefix"
}

# The benchmark workload, static so that the same binary runs on the lab
# hosts (which share this filesystem) and in the lab's busybox-based image.
build_memhog() {
    local sum
    sum=$(md5sum < "$MEMHOG_SRC" | cut -c1-32)
    if [ -x "$MEMHOG" ] && [ "$(cat "$MEMHOG.md5" 2>/dev/null)" = "$sum" ]; then
        return
    fi
    mkdir -p "$(dirname "$MEMHOG")"
    gcc -static -O2 -Wall -Wextra -Werror -o "$MEMHOG.new" "$MEMHOG_SRC"
    mv "$MEMHOG.new" "$MEMHOG"
    echo "$sum" > "$MEMHOG.md5"
    log "built $MEMHOG"
}

# criuweb's OCI runtime wrapper for the fast container path (a Docker engine
# lists it under "runtimes" in daemon.json; the lab's engines use the
# checkout's copy). Installed whenever it changed: it is a small script.
RUNTIME_SRC="$HERE/criuweb-runtime"
RUNTIME=/usr/local/sbin/criuweb-runtime
install_runtime() {
    cmp -s "$RUNTIME_SRC" "$RUNTIME" && return
    install -m 0755 "$RUNTIME_SRC" "$RUNTIME.new"
    mv "$RUNTIME.new" "$RUNTIME"
    log "installed $RUNTIME"
}

main() {
    if [ "$(id -u)" != 0 ]; then
        echo "setup: must run as root (it installs system packages and runs CRIU)" >&2
        exit 1
    fi
    install_runtime
    if [ -f "$STAMP" ] && [ -x "$MEMHOG" ] && criu_works; then
        return
    fi
    # postgresql: the binaries of the throwaway servers that `make test` and
    # scripts/bench-pages.sh --postgres start (criuweb/throwaway_postgres.py).
    need_packages docker.io containerd runc openssh-server openssh-client busybox-static \
        iproute2 iptables patchelf tar procps util-linux ca-certificates python3 python3-venv chromium \
        gcc libc6-dev postgresql
    install_criu
    build_memhog
    mkdir -p "$(dirname "$STAMP")"
    rm -f /var/lib/criuweb/.system-ready-*
    touch "$STAMP"
}

main "$@"
