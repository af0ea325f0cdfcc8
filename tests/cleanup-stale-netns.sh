#!/usr/bin/env bash
# Deletes every lab network namespace (name starts with "wft-") left by a killed
# test or benchmark run, after killing the processes inside it. Never touches
# namespaces with other names; also removes dead lab UAPI sockets. Usage: tests/cleanup-stale-netns.sh
set -u
for ns in $(ip netns list | awk '{print $1}' | grep '^wft-'); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
        kill -KILL "$pid" 2>/dev/null
    done
    ip netns del "$ns" && echo "deleted stale namespace $ns"
done
# UAPI sockets of lab interfaces (wf*) whose process is gone: connection refused.
for sock in /var/run/wireguard/wf*.sock; do
    [ -S "$sock" ] || continue
    if ! socat -u OPEN:/dev/null "UNIX-CONNECT:$sock" 2>/dev/null; then
        rm -f "$sock" && echo "removed dead UAPI socket $sock"
    fi
done
exit 0
