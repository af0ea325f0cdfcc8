#!/usr/bin/env bash
# Builds the previous release's relay: the commit PREVIOUS pins, the last one before this release's
# wire additions (the peer codec in MeshJoin, redirects for Open). The mixed-version test
# (tests/tests/lab/fleet.rs, relays_of_the_previous_release_serve_this_builds_nodes) runs this
# build's nodes and engineers against it. Cached under ~/.cache/weft-compat/COMMIT/tunnel-relay
# (built once, about 3.5 minutes on 2 cores). Prints the binary's path; exits 3 when the clone has no
# such commit (a shallow clone), so the caller can say the test was skipped and why.
# Bump PREVIOUS when a release ships: the test then checks the next release against this one.
set -euo pipefail
PREVIOUS=4ebc2361d1d76bf76e7a96aed2fda88b74891dce
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/weft-compat/$PREVIOUS
bin=$cache/tunnel-relay
if [[ ! -x $bin ]]; then
    if ! git -C "$ROOT" cat-file -e "$PREVIOUS^{commit}" 2>/dev/null; then
        echo "previous-relay: commit $PREVIOUS is not in this clone (shallow?)" >&2
        exit 3
    fi
    src=$(mktemp -d /tmp/weft-previous.XXXXXX)
    trap 'rm -rf "$src"' EXIT
    git -C "$ROOT" archive "$PREVIOUS" | tar -x -C "$src"
    mkdir -p "$cache"
    (cd "$src" && CARGO_TARGET_DIR="$cache/target" cargo build --locked --release -q \
        -p tunnel-relay --bin tunnel-relay) >&2
    install -m 0755 "$cache/target/release/tunnel-relay" "$bin.tmp"
    mv "$bin.tmp" "$bin"
    rm -rf "$cache/target"
fi
echo "$bin"
