#!/usr/bin/env bash
# Every test of the project, as CI runs it (.ci/run execs this):
#   apt packages -> stale lab namespaces -> fmt -> clippy -> release build -> the previous release's
#   relay (scripts/previous-relay.sh, cached) -> all tests (unit + namespace
#   end-to-end tests, which find the binaries in target/release; the rekey soak runs beside them in the
#   background) -> the loopback relay suite over the
#   TCP/TLS fallback -> mixed versions (this build on the previous release's relays) -> the fleet benchmark -> the Ray cluster benchmark -> stale lab
#   namespaces again.
#
# Run as root on a Debian machine with a Rust toolchain (rustfmt, clippy):
#   sudo scripts/test-all.sh                 # everything
#   sudo scripts/test-all.sh -- --nocapture  # arguments after `--` go to the test binaries
#
# Environment: WEFT_SKIP_APT=1 skips apt-get (an offline box that already has the packages).
# Note: the stale-namespace cleanup removes every namespace named wft-*; do not run two of these at once.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

require_root
find_cargo

test_args=()
if [[ ${1:-} == -- ]]; then
    shift
    test_args=("$@")
elif [[ $# -gt 0 ]]; then
    die "usage: $0 [-- TEST-BINARY-ARGS...]"
fi

on_exit() {
    local rc=$?
    if [[ -n ${soak_pid:-} ]] && kill -0 "$soak_pid" 2>/dev/null; then
        kill "$soak_pid" 2>/dev/null || true
    fi
    banner "cleanup: stale ${WEFT_NS_PREFIX}* network namespaces"
    delete_weft_namespaces "$WEFT_NS_PREFIX"
    if [[ $rc -eq 0 ]]; then
        banner "all checks passed"
    else
        banner "FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap on_exit EXIT

banner "apt packages"
apt_install_lab_packages

banner "stale ${WEFT_NS_PREFIX}* network namespaces from earlier runs"
delete_weft_namespaces "$WEFT_NS_PREFIX"

banner "toolchain"
note "$(cargo --version)"
note "$(rustc --version)"

banner "cargo fmt --all --check"
cargo fmt --all --check

banner "cargo clippy --locked --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

banner "crate graph: the libraries build alone; mesh and worker-agent link no relay server"
# Built alone, so features are not unified with the relay binary's: a module that needs a
# `server`-only dependency fails here, not on a user's `cargo build -p mesh`.
cargo check --locked -p weft-proto -p mesh -p worker-agent
for crate in weft-proto mesh worker-agent; do
    case $crate in
        weft-proto) banned='tokio|quinn|rusqlite|axum|rcgen' ;;
        mesh) banned='rusqlite|axum|rcgen|prometheus-client' ;;
        worker-agent) banned='rcgen|prometheus-client' ;;
    esac
    if found=$(cargo tree --locked -p "$crate" -e normal --prefix none | grep -E "^($banned) " | sort -u) && [[ -n $found ]]; then
        die "$crate links what it must not: $found"
    fi
    note "$crate: none of $banned"
done

banner "cargo build --locked --release --bins"
cargo build --locked --release --bins

banner "the previous release's relay, for the mixed-version test (cached under ~/.cache/weft-compat; ~3.5 min once)"
previous_rc=0
previous_relay=$(scripts/previous-relay.sh) || previous_rc=$?
case $previous_rc in
    0) note "previous relay: $previous_relay" ;;
    3) note "no previous release in this clone (shallow): the mixed-version test is skipped" ;;
    *) die "could not build the previous release's relay (exit $previous_rc)" ;;
esac

banner "Ray 2.60.0 for the cluster tests (cached virtualenv under ~/.cache/weft-ray)"
note "$(scripts/ray-venv.sh)"

banner "the rekey soak (tests/tests/rekey_soak.rs, 6.5 min) starts in the background"
# It is one slow, light test (2 Mbit/s for 6.5 minutes): run alongside the rest,
# it costs the command no time and shows rekeys survive a busy machine.
# --workspace: the features of the workspace build below, so what this builds is reused there
# (with -p weft-tests the shared crates are compiled twice, a minute more).
# The test's own artifact (kind "test", name rekey_soak): the crate's bins (weft-flood, ...) are
# artifacts of the same build and come in any order.
soak_bin=$(cargo test --locked --release --workspace --test rekey_soak --no-run --message-format=json \
    | grep -F '"kind":["test"]' | grep -F '"name":"rekey_soak"' \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[[ -x $soak_bin ]] || die "could not build the rekey soak"
soak_log=$(mktemp /tmp/weft-soak.XXXXXX)
"$soak_bin" --ignored --test-threads=1 "${test_args[@]}" >"$soak_log" 2>&1 &
soak_pid=$!
note "rekey soak: pid $soak_pid, output in $soak_log"

banner "cargo test --locked --release --workspace (unit + network-namespace end-to-end)"
cargo test --locked --release --workspace -- "${test_args[@]}"

banner "the loopback relay suite again, every client on the TCP/TLS fallback (WEFT_RELAY_TRANSPORT=tcp)"
# --workspace: the workspace build's features, so nothing is compiled again.
WEFT_RELAY_TRANSPORT=tcp cargo test --locked --release --workspace --test relay loopback:: -- "${test_args[@]}"

if [[ $previous_rc -eq 0 ]]; then
    banner "mixed versions: this build's nodes and engineers on the previous release's relays"
    WEFT_PREVIOUS_RELAY=$previous_relay cargo test --locked --release --workspace --test lab \
        fleet::relays_of_the_previous_release_serve_this_builds_nodes -- --ignored "${test_args[@]}"
fi

banner "the rekey soak's result"
soak_rc=0
wait "$soak_pid" || soak_rc=$?
cat "$soak_log"
[[ $soak_rc -eq 0 ]] || die "the rekey soak failed (exit $soak_rc)"

banner "fleet benchmark (tests/bench/fleet: 3 relays on PostgreSQL, 1,000 simulated nodes, a relay killed; ~40 s)"
# It asserts only that everything worked; the table it prints is what BENCHMARKS.md records.
tests/bench/fleet

banner "Ray cluster benchmark (tests/bench/ray: cluster up and object transfer against Ray by hand over veth; ~70 s)"
# It asserts only that everything worked; the table it prints is what BENCHMARKS.md records.
tests/bench/ray
