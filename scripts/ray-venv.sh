#!/usr/bin/env bash
# The pinned Ray of the cluster tests and the demo, in a virtualenv cached under
# ~/.cache/weft-ray/ray-VERSION (made once; ~50 s and ~80 MB of wheels cold). Prints the `ray` path.
# An interrupted install leaves no bin/ray (pip writes the entry points last): the next run redoes it.
set -euo pipefail
version=2.60.0
dir="${HOME:-/root}/.cache/weft-ray/ray-$version"
if [[ ! -x $dir/bin/ray ]]; then
    mkdir -p "$(dirname "$dir")"
    exec 9>"$dir.lock"
    flock 9
    if [[ ! -x $dir/bin/ray ]]; then
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q --disable-pip-version-check "ray[default]==$version" >&2
    fi
fi
echo "$dir/bin/ray"
