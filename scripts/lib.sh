# shellcheck shell=bash
# Helpers shared by scripts/test-all.sh and deploy/lab/demo.sh. Source it; do not run it.
#
# Everything here is careful about one rule of the lab (see LAB.md): the root network namespace is
# never touched. The only network objects these helpers remove are namespaces whose names start with
# the project's prefix `wft-`.

# Debian packages the lab, the demo and the namespace tests need.
WEFT_APT_PACKAGES=(
    nftables iproute2 iputils-ping iperf3 socat curl python3 python3-venv procps gcc
    wireguard-go wireguard-tools openssh-server openssh-client haproxy openssl postgresql
    chromium chromium-driver
)

# Every network namespace the project creates starts with this.
WEFT_NS_PREFIX="wft-"

_weft_t0=$SECONDS

# A step banner: `banner "cargo fmt"`.
banner() {
    local elapsed=$((SECONDS - _weft_t0))
    printf '\n\033[1m==> [%02d:%02d] %s\033[0m\n' $((elapsed / 60)) $((elapsed % 60)) "$*"
}

# A note under a banner.
note() {
    printf '    %s\n' "$*"
}

die() {
    printf '\033[1;31merror:\033[0m %s\n' "$*" >&2
    exit 1
}

require_root() {
    if [[ $EUID -ne 0 ]]; then
        die "$(basename "$0") needs root (network namespaces, TUN, nftables): run it with sudo"
    fi
}

# apt-get update && apt-get install the lab packages. WEFT_SKIP_APT=1 skips it (an offline dev box
# that already has them).
apt_install_lab_packages() {
    if [[ ${WEFT_SKIP_APT:-0} == 1 ]]; then
        note "WEFT_SKIP_APT=1: not running apt-get"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install by hand: ${WEFT_APT_PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${WEFT_APT_PACKAGES[@]}" >/dev/null
    note "installed: ${WEFT_APT_PACKAGES[*]}"
}

# Put a Rust toolchain on PATH. Under sudo, root's PATH usually lacks ~/.cargo/bin: try root's, then the
# invoking user's rustup install (pointing CARGO_HOME/RUSTUP_HOME at it so the rustup proxies work).
find_cargo() {
    if command -v cargo >/dev/null; then
        return
    fi
    local home
    for home in "${HOME:-/root}" "$(getent passwd "${SUDO_USER:-}" 2>/dev/null | cut -d: -f6)"; do
        [[ -n $home && -x $home/.cargo/bin/cargo ]] || continue
        export PATH="$home/.cargo/bin:$PATH"
        export CARGO_HOME="${CARGO_HOME:-$home/.cargo}"
        [[ -d $home/.rustup ]] && export RUSTUP_HOME="${RUSTUP_HOME:-$home/.rustup}"
        return
    done
    die "cargo not found: install Rust >= 1.85 with rustfmt and clippy (https://rustup.rs)"
}

# The project's namespaces that exist right now, one per line.
weft_namespaces() {
    local prefix=$1
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}" || true
}

# Delete every stale network namespace whose name starts with PREFIX (default `wft-`; a caller may narrow it,
# e.g. `wft-demo-`, never widen it). Processes still inside one (a lab daemon a crashed test left behind,
# which would otherwise keep its UAPI socket busy) get SIGTERM, then SIGKILL; they are found by pid
# with `ip netns pids`, so nothing outside those namespaces is ever signalled.
delete_weft_namespaces() {
    local prefix=${1:-$WEFT_NS_PREFIX}
    [[ $prefix == "$WEFT_NS_PREFIX"* ]] || die "refusing to delete namespaces matching '$prefix'"
    local ns pids pid n=0
    while read -r ns; do
        [[ -n $ns ]] || continue
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        # Only stale ones: a namespace whose name carries its creator's pid
        # (wft-<tag>-<pid>-<n>) is live while that pid runs; one without a pid
        # (the demo's) is live while processes run inside it. Another
        # developer's or test run's lab on this machine is left alone.
        local owner
        owner=$(sed -nE 's/^[a-z]+-[a-z-]*-([0-9]+)(-.*)?$/\1/p' <<<"$ns")
        if [[ -n $owner ]] && kill -0 "$owner" 2>/dev/null; then
            continue
        fi
        if [[ -z $owner && -n $pids ]]; then
            continue
        fi
        if [[ -n $pids ]]; then
            # shellcheck disable=SC2086 # one pid per word
            kill -TERM $pids 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                pids=$(ip netns pids "$ns" 2>/dev/null || true)
                [[ -z $pids ]] && break
                sleep 0.2
            done
            for pid in $pids; do
                kill -KILL "$pid" 2>/dev/null || true
            done
        fi
        ip netns delete "$ns" 2>/dev/null || true
        n=$((n + 1))
    done < <(weft_namespaces "$prefix")
    note "removed $n namespace(s) named ${prefix}*"
}
