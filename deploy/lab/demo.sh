#!/usr/bin/env bash
# The Weft local lab: a relay, two GPU workers each behind its own home router's NAT, and an engineer
# who SSHes into both, first over the WireGuard mesh overlay (`mesh`), then through reverse tunnels on
# the relay (`tunnel-relay`). Nothing on the internet can reach a worker; in both paths the worker dials out.
# A third engineer on guest Wi-Fi that passes no UDP reaches a worker through the relay's TLS-over-TCP
# fallback.
# Then the GPU pool: `worker-agent run` on both workers (simulated GPUs: a stub NVML library), `weft pool`,
# a job placed by requirement, its logs and the usage record it left.
# With --ray, then a Ray cluster on the pool: the agents run with `--ray` (and join the mesh
# themselves), the engineer makes the two NATed workers one Ray cluster (`weft cluster up`), runs a
# Ray job across both over the mesh and takes the cluster down.
#
#   sudo deploy/lab/demo.sh            # build, run the demo, tear everything down
#   sudo deploy/lab/demo.sh --ray      # ... and end with a 2-node Ray cluster across both NATs
#   sudo deploy/lab/demo.sh --keep     # ... and keep the lab up until Ctrl-C, to poke at it
#
# Options:  --keep        keep the lab running until Ctrl-C (prints how to get in)
#           --no-build    use the binaries already in target/release
#           --ray         add the Ray cluster part (the pinned Ray in a virtualenv that
#                         scripts/ray-venv.sh makes once under ~/.cache/weft-ray: ~50 s the first time)
# Env:      WEFT_DEMO_WG=wireguard-go   run Debian's wireguard-go + wg instead of our `mesh` for the mesh
#                                       path (a reference to compare against); the default is `mesh`
#           WEFT_SKIP_APT=1             skip apt-get (the packages are already installed)
#           WEFT_LOG                    every binary's log level (default info)
#           (logs go to the lab's temp dir)
#
# Topology (every process and address lives in a namespace this script creates; names start with
# wft-demo-; the root namespace is never touched):
#
#                          wft-demo-inet: bridge "internet" 203.0.113.1/24
#     ┌───────────────────┬─────────────┴───────────┬────────────────────────────────┐
#   wft-demo-relay      wft-demo-eng              wft-demo-home1 (NAT)             wft-demo-home2 (NAT)
#   relay 203.0.113.2   engineer 203.0.113.10     wan 203.0.113.21                 wan 203.0.113.22
#   tunnel-relay serve  overlay 10.77.0.1         lan 192.0.2.1/27                 lan 192.0.2.33/27
#   on UDP 4433                                     │                                │
#                                                 wft-demo-gpu1                    wft-demo-gpu2
#                                                 192.0.2.2                        192.0.2.34
#                                                 overlay 10.77.0.11               overlay 10.77.0.12
#                                                 sshd on the overlay and          sshd on the overlay and
#                                                 on 127.0.0.1 (for expose)        on 127.0.0.1 (for expose)
#
# The home routers masquerade (endpoint-independent "easy" NAT) and drop unsolicited inbound packets,
# as real home routers do; nothing on the internet can reach a worker unless the worker dials out.
#
# Mesh overlay path: the workers' wg-quick configs name the engineer as a peer with an Endpoint and
# PersistentKeepalive = 25, so they dial out, the engineer learns their NATed address from the handshake,
# and the tunnel stays open; the engineer runs `ssh root@10.77.0.11`.
#
# Relay tunnel path: the operator runs `tunnel-relay serve` on 203.0.113.2:4433 (QUIC on UDP, and TLS on
# TCP at the same port for networks that block UDP) and creates join tokens;
# each worker runs `tunnel-relay expose --service ssh=127.0.0.1:22`, which keeps a QUIC connection out to
# the relay; the engineer logs in with a token (`weft login`) and runs
# `ssh -o ProxyCommand='weft connect %h %p' root@gpu-worker-1`. The relay only splices streams
# that its policy allows (default: tag engineer -> tag worker); a worker opening another worker is refused.
# Guest Wi-Fi: carol sits behind a router (wft-demo-guest, wan 203.0.113.31) whose firewall drops every
# forwarded UDP packet except DNS, as many guest and hotel networks do. Nothing changes for her: `weft`
# tries QUIC, falls back to TLS over TCP 250 ms later, and her `ssh` through `weft connect` works; its log
# and `weft status` say transport tcp.
#
# Managed mesh (the control plane): the same relay also runs the coordinator. The workers run
# `mesh up --token ... --state-dir ...`, the engineers `weft up` (no config files, no keys to exchange); a second
# engineer, bob, sits behind a hotel's hard NAT (masquerade random) in wft-demo-hotel/wft-demo-bob.
# Nodes get overlay addresses from 100.64.0.0/10, their peer maps from the coordinator, and find
# direct paths through the NATs (alice: direct to both workers) or use the relay (bob: hard NAT on his
# side, easy on the workers': relayed). MagicDNS answers NAME.weft.internal; the engineer SSHes by name.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

keep=0
build=1
ray=0
for arg in "$@"; do
    case $arg in
        --keep) keep=1 ;;
        --no-build) build=0 ;;
        --ray) ray=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

wg_impl=${WEFT_DEMO_WG:-mesh}
case $wg_impl in
    mesh | wireguard-go) ;;
    *) die "WEFT_DEMO_WG must be 'mesh' or 'wireguard-go', not '$wg_impl'" ;;
esac
mesh_bin="$repo/target/release/mesh"
relay_bin="$repo/target/release/tunnel-relay"
weft_bin="$repo/target/release/weft"

# ---------------------------------------------------------------------------------------------------
# The lab's names and addresses.
P=wft-demo-
NS_INET=${P}inet
NS_ENG=${P}eng
NS_R1=${P}home1
NS_W1=${P}gpu1
NS_R2=${P}home2
NS_W2=${P}gpu2
NS_RELAY=${P}relay
NS_HOTEL=${P}hotel
NS_BOB=${P}bob
NS_GUEST=${P}guest
NS_CAROL=${P}carol

ULA=fd57:6566:7400 # a ULA /48 for the overlay ("Weft" in hex)
ENG_PUB=203.0.113.10
ENG_IP4=10.77.0.1
ENG_IP6=$ULA::1
W1_IP4=10.77.0.11
W1_IP6=$ULA::11
W2_IP4=10.77.0.12
W2_IP6=$ULA::12
WG_PORT=51820
RELAY_IP=203.0.113.2
RELAY_ADDR=$RELAY_IP:4433

# Interface names double as UAPI socket names in the shared /var/run/wireguard, so they are unique to
# this demo (two namespaces with one name would collide there).
IF_ENG=wftd-eng
IF_W1=wftd-gpu1
IF_W2=wftd-gpu2

lab=""                 # temp dir: keys, configs, sshd files, tunnel-relay state dirs, logs
declare -a pids=()     # every process this script started, in start order
declare -A pid_label=()
declare -A pid_log=()
declare -A pid_ns=()   # mesh pids: namespace and interface, to check `mesh up` cleaned up after itself
declare -A pid_if=()
declare -a teardown_warnings=()
declare -a ray_agent_pids=() # worker-agent pids run with --ray (their members' temp dirs are theirs)
last_pid=""

# ---------------------------------------------------------------------------------------------------
# Helpers.

# `in_ns NS cmd...`: run a command inside a lab namespace.
in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

# `print_cmd LABEL cmd...`: print a command as the person at that machine would type it (a last
# argument `&` marks one that keeps running in the background).
print_cmd() {
    local label=$1
    shift
    local arg line=""
    for arg in "$@"; do
        if [[ $arg =~ ^[][A-Za-z0-9@%+=:,./_-]+$ || $arg == '&' ]]; then
            line+=" $arg"
        else
            line+=" '${arg//\'/\'\\\'\'}'"
        fi
    done
    printf '\n\033[36m[%s]$%s\033[0m\n' "$label" "$line"
}

# `show LABEL NS cmd...`: print a command as the person at that machine would type it, then run it there.
show() {
    local label=$1 ns=$2
    shift 2
    print_cmd "$label" "$@"
    in_ns "$ns" "$@"
}

# `start LABEL NS cmd...`: start a long-running command in a namespace; its output goes to LABEL.log.
# `ip netns exec` execs the command, so $! is the daemon's own pid.
start() {
    local label=$1 ns=$2
    shift 2
    local log="$lab/$label.log"
    ip netns exec "$ns" "$@" >"$log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    pid_label[$pid]=$label
    pid_log[$pid]=$log
    note "started $label (pid $pid) in $ns; log: $log"
    last_pid=$pid
}

# `wait_for WHAT SECONDS PID cmd...`: poll cmd until it succeeds; fail if PID died or time ran out.
wait_for() {
    local what=$1 secs=$2 pid=$3
    shift 3
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "${pid_log[$pid]}" >&2 || true
            die "${pid_label[$pid]} exited while waiting for $what"
        fi
        ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
        sleep 0.2
    done
}

# Stop one started process: SIGTERM, up to 10 s, then SIGKILL. Prints the exit status.
stop_pid() {
    local pid=$1 label=${pid_label[$1]}
    local rc
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            note "$label (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    note "$label (pid $pid) exited with status $rc"
    if [[ ($label == mesh-* || $label == tunnel-relay-*) && $rc -ne 0 ]]; then
        teardown_warnings+=("$label exited with status $rc after SIGTERM (expected 0)")
    fi
}

# `stop_started LABEL`: stop one process this script started, before the teardown (which then
# skips it); a `mesh up` must have removed its interface.
stop_started() {
    local label=$1 i pid
    for i in "${!pids[@]}"; do
        pid=${pids[$i]}
        [[ ${pid_label[$pid]} == "$label" ]] || continue
        stop_pid "$pid"
        unset 'pids[i]'
        pids=("${pids[@]}")
        if [[ $label == mesh-* ]] && ip -n "${pid_ns[$pid]}" link show "${pid_if[$pid]}" >/dev/null 2>&1; then
            die "$label left interface ${pid_if[$pid]} behind in ${pid_ns[$pid]}"
        fi
        return
    done
    die "no running process labelled $label"
}

teardown() {
    local rc=$?
    # A second Ctrl-C (or SIGTERM) must not cut the teardown short and leave the lab running.
    trap - EXIT
    trap '' INT TERM
    set +e
    banner "teardown"
    if [[ $rc -ne 0 && -n $lab ]]; then
        local log
        for log in "$lab"/*.log; do
            [[ -s $log ]] || continue
            printf '\n--- last lines of %s ---\n' "$log"
            tail -n 15 "$log"
        done
    fi
    local i pid
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[$i]}
        stop_pid "$pid"
        # `mesh up` must remove its interface on SIGTERM: check before the namespace goes away.
        if [[ ${pid_label[$pid]} == mesh-* ]]; then
            local ns=${pid_ns[$pid]} ifname=${pid_if[$pid]}
            if ip -n "$ns" link show "$ifname" >/dev/null 2>&1; then
                teardown_warnings+=("${pid_label[$pid]} left interface $ifname behind in $ns")
            fi
        fi
    done
    if [[ $ray == 1 ]]; then
        # Ray members are the agents' jobs, stopped with them (Ray's --block stops its processes).
        # Anything still in a worker's namespace would keep it from being deleted: say so, stop it.
        local ns left
        for ns in "$NS_W1" "$NS_W2"; do
            left=$(ip netns pids "$ns" 2>/dev/null | xargs)
            [[ -n $left ]] || continue
            teardown_warnings+=("processes left in $ns after its agent stopped: $(ps -o pid=,args= -p "${left// /,}" |
                cut -c1-100 | paste -sd ';')")
            # shellcheck disable=SC2086 # one pid per word
            kill -TERM $left 2>/dev/null
            sleep 2
            # shellcheck disable=SC2086
            kill -KILL $(ip netns pids "$ns" 2>/dev/null) 2>/dev/null
        done
        # Ray's temp dirs (logs, sockets): one per member, named after the agent that ran it.
        for pid in "${ray_agent_pids[@]}"; do
            rm -rf /tmp/weft-ray-*-"$pid"
        done
    fi
    delete_weft_namespaces "$P"
    # MagicDNS resolv.conf files for the engineers' namespaces (ip netns exec bind-mounts them).
    rm -rf "/etc/netns/$NS_ENG" "/etc/netns/$NS_BOB"
    local ifname
    for ifname in "$IF_ENG" "$IF_W1" "$IF_W2"; do
        rm -f "/var/run/wireguard/$ifname.sock"
    done
    [[ -n $lab ]] && rm -rf "$lab"
    for w in "${teardown_warnings[@]}"; do
        printf '\033[1;33mwarning:\033[0m %s\n' "$w" >&2
    done
    if [[ $rc -eq 0 ]]; then
        banner "done: lab removed"
    else
        banner "demo FAILED (exit $rc); lab removed"
    fi
    exit "$rc"
}

# ---------------------------------------------------------------------------------------------------
require_root

banner "apt packages"
apt_install_lab_packages

if [[ $build == 1 ]]; then
    banner "cargo build --locked --release --bins"
    find_cargo
    cargo build --locked --release --bins
fi
if [[ $wg_impl == mesh ]]; then
    [[ -x $mesh_bin ]] || die "$mesh_bin not found: build it (cargo build --release --bins)"
else
    note "WEFT_DEMO_WG=wireguard-go: using Debian's wireguard-go + wg as the WireGuard peer, not mesh"
fi
[[ -x $relay_bin ]] || die "$relay_bin not found: build it (cargo build --release --bins)"
[[ -x $weft_bin ]] || die "$weft_bin not found: build it (cargo build --release --bins)"
agent_bin="$repo/target/release/worker-agent"
[[ -x $agent_bin ]] || die "$agent_bin not found: build it (cargo build --release --bins)"
command -v gcc >/dev/null || die "gcc not found (it builds the stub NVML library for the simulated GPUs)"
if [[ $ray == 1 ]]; then
    banner "Ray: the pinned Ray in a virtualenv (scripts/ray-venv.sh: made once, then cached)"
    ray_bin=$(scripts/ray-venv.sh) || die "scripts/ray-venv.sh could not make Ray's virtualenv"
    [[ -x $ray_bin ]] || die "scripts/ray-venv.sh printed '$ray_bin', not a ray command"
    note "$("$ray_bin" --version 2>/dev/null | head -n 1): $ray_bin"
fi

banner "remove a previous demo's leftovers (${P}* namespaces)"
delete_weft_namespaces "$P"
for ifname in "$IF_ENG" "$IF_W1" "$IF_W2"; do
    rm -f "/var/run/wireguard/$ifname.sock"
done

lab=$(mktemp -d /tmp/wft-demo.XXXXXX)
chmod 700 "$lab"
trap teardown EXIT
trap 'exit 130' INT TERM
# `tunnel-relay` (operator, providers) and `weft` (engineers) on PATH, as after `install` into
# /usr/local/bin/: the commands
# below (and ssh's ProxyCommand) read as a person would type them.
mkdir -m 755 "$lab/bin"
ln -s "$relay_bin" "$lab/bin/tunnel-relay"
ln -s "$weft_bin" "$lab/bin/weft"
ln -s "$agent_bin" "$lab/bin/worker-agent"
export PATH="$lab/bin:$PATH"

# ---------------------------------------------------------------------------------------------------
banner "network: an internet, a relay, an engineer, two home routers with NAT, two GPU workers behind them"

for ns in "$NS_INET" "$NS_RELAY" "$NS_ENG" "$NS_R1" "$NS_W1" "$NS_R2" "$NS_W2"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done

# The internet: a bridge in its own namespace; every public host plugs a veth into it. Each veth pair
# is created directly inside the two namespaces that own it.
ip -n "$NS_INET" link add internet type bridge
ip -n "$NS_INET" addr add 203.0.113.1/24 dev internet
ip -n "$NS_INET" link set internet up
plug_into_internet() { # NS PORT-NAME ADDRESS
    local ns=$1 port=$2 addr=$3
    ip link add wan netns "$ns" type veth peer name "$port" netns "$NS_INET"
    ip -n "$NS_INET" link set "$port" master internet up
    ip -n "$ns" addr add "$addr/24" dev wan
    ip -n "$ns" link set wan up
    ip -n "$ns" route add default via 203.0.113.1
}
plug_into_internet "$NS_RELAY" relay "$RELAY_IP"
note "relay          $NS_RELAY wan $RELAY_IP (the operator's public relay)"
plug_into_internet "$NS_ENG" eng "$ENG_PUB"
note "engineer       $NS_ENG   wan $ENG_PUB (a public address)"

# A home router: WAN on the internet, a /27 LAN slice of 192.0.2.0/24 behind it, masquerade NAT and the
# usual home-router firewall (drop unsolicited inbound; see LAB.md for why that matters).
home_router() { # ROUTER-NS WORKER-NS PORT-NAME WAN-ADDR LAN-GW LAN-HOST [random]
    local r=$1 w=$2 port=$3 wan=$4 gw=$5 host=$6 random=${7:-}
    plug_into_internet "$r" "$port" "$wan"
    ip link add lan netns "$r" type veth peer name lan netns "$w"
    ip -n "$r" addr add "$gw/27" dev lan
    ip -n "$r" link set lan up
    ip -n "$w" addr add "$host/27" dev lan
    ip -n "$w" link set lan up
    ip -n "$w" route add default via "$gw"
    in_ns "$r" sysctl -qw net.ipv4.ip_forward=1
    in_ns "$r" nft -f - <<NFT
table ip nat {
    chain post {
        type nat hook postrouting priority 100;
        oifname "wan" masquerade $random
    }
}
table inet fw {
    chain input {
        type filter hook input priority 0; policy accept;
        iifname "wan" ct state new drop
    }
    chain forward {
        type filter hook forward priority 0; policy accept;
        iifname "wan" ct state new drop
    }
}
NFT
}
home_router "$NS_R1" "$NS_W1" home1 203.0.113.21 192.0.2.1 192.0.2.2
note "home router 1  $NS_R1 wan 203.0.113.21, lan 192.0.2.0/27, NAT + firewall"
note "gpu worker 1   $NS_W1  lan 192.0.2.2 (private, behind home router 1)"
home_router "$NS_R2" "$NS_W2" home2 203.0.113.22 192.0.2.33 192.0.2.34
note "home router 2  $NS_R2 wan 203.0.113.22, lan 192.0.2.32/27, NAT + firewall"
note "gpu worker 2   $NS_W2  lan 192.0.2.34 (private, behind home router 2)"

show engineer "$NS_ENG" ping -c 1 -W 1 192.0.2.2 ||
    note "(as expected: a worker's private address is unreachable from the internet)"

# ---------------------------------------------------------------------------------------------------
banner "mesh overlay path (1/6): keys and wg-quick configs"

if [[ $wg_impl == mesh ]]; then
    genkey() { "$mesh_bin" genkey; }
    pubkey() { "$mesh_bin" pubkey; }
    note "keys from: mesh genkey | mesh pubkey"
else
    genkey() { wg genkey; }
    pubkey() { wg pubkey; }
    note "keys from: wg genkey | wg pubkey"
fi
umask 077
for who in eng gpu1 gpu2; do
    genkey >"$lab/$who.key"
    pubkey <"$lab/$who.key" >"$lab/$who.pub"
    for f in "$lab/$who.key" "$lab/$who.pub"; do
        [[ $(<"$f") =~ ^[A-Za-z0-9+/]{43}=$ ]] || die "key generation wrote no base64 key to $f"
    done
done
key() { cat "$lab/$1.key"; }
pub() { cat "$lab/$1.pub"; }

# The engineer listens on a public address; the workers are behind NAT and dial the engineer. The config
# file's stem is the interface name (as with wg-quick).
cat >"$lab/$IF_ENG.conf" <<EOF
# The engineer's machine: public address $ENG_PUB.
[Interface]
PrivateKey = $(key eng)
Address = $ENG_IP4/24, $ENG_IP6/48
ListenPort = $WG_PORT
MTU = 1420

# gpu-worker-1, behind home router 1's NAT. No Endpoint: it dials us, and we answer the address its
# packets came from (its router's public address and mapped port).
[Peer]
PublicKey = $(pub gpu1)
AllowedIPs = $W1_IP4/32, $W1_IP6/128

# gpu-worker-2, behind home router 2's NAT.
[Peer]
PublicKey = $(pub gpu2)
AllowedIPs = $W2_IP4/32, $W2_IP6/128
EOF

worker_config() { # WHO IFACE IP4 IP6 LABEL
    cat >"$lab/$2.conf" <<EOF
# $5: a GPU worker behind a home router's NAT.
[Interface]
PrivateKey = $(key "$1")
Address = $3/24, $4/48
ListenPort = $WG_PORT
MTU = 1420

# The engineer. PersistentKeepalive keeps the NAT mapping (and so the path back to us) open.
[Peer]
PublicKey = $(pub eng)
Endpoint = $ENG_PUB:$WG_PORT
AllowedIPs = $ENG_IP4/32, $ENG_IP6/128
PersistentKeepalive = 25
EOF
}
worker_config gpu1 "$IF_W1" "$W1_IP4" "$W1_IP6" gpu-worker-1
worker_config gpu2 "$IF_W2" "$W2_IP4" "$W2_IP6" gpu-worker-2
umask 022 # the configs hold private keys: 0600, as mesh asks (it warns about a config others can read)
note "$lab/$IF_ENG.conf:"
sed 's/^\(PrivateKey = \).*/\1(secret)/; s/^/      /' "$lab/$IF_ENG.conf"
note "$lab/$IF_W1.conf:"
sed 's/^\(PrivateKey = \).*/\1(secret)/; s/^/      /' "$lab/$IF_W1.conf"

# ---------------------------------------------------------------------------------------------------
# Bring one node's WireGuard interface up from its wg-quick config, in its namespace.

# wireguard-go: the daemon only does WireGuard; addresses, MTU and routes are ours to set (what wg-quick
# would do), and `wg setconf` takes the config without the wg-quick-only fields.
# Every value of FIELD in a wg-quick config, one per line: `conf_values AllowedIPs FILE`.
conf_values() {
    sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*//p" "$2" | tr ',' '\n' | tr -d ' '
}

up_wireguard_go() { # LABEL NS IFACE CONF
    local label=$1 ns=$2 ifname=$3 conf=$4
    start "$label" "$ns" env WG_PROCESS_FOREGROUND=1 wireguard-go -f "$ifname"
    local pid=$last_pid
    wait_for "$ifname's UAPI socket" 10 "$pid" test -S "/var/run/wireguard/$ifname.sock"
    wait_for "$ifname to exist" 10 "$pid" ip -n "$ns" link show "$ifname"
    grep -Ev '^[[:space:]]*(Address|MTU|DNS|Table|PreUp|PostUp|PreDown|PostDown|SaveConfig)[[:space:]]*=' \
        "$conf" >"$conf.wg"
    in_ns "$ns" wg setconf "$ifname" "$conf.wg"
    local value
    for value in $(conf_values Address "$conf"); do
        ip -n "$ns" addr add "$value" dev "$ifname"
    done
    ip -n "$ns" link set "$ifname" mtu "$(conf_values MTU "$conf" | head -n 1)" up
    for value in $(conf_values AllowedIPs "$conf"); do
        ip -n "$ns" route replace "$value" dev "$ifname"
    done
}

up_mesh() { # LABEL NS IFACE CONF
    local label=$1 ns=$2 ifname=$3 conf=$4
    start "$label" "$ns" env WEFT_LOG="${WEFT_LOG:-info}" "$mesh_bin" up --wg-config "$conf"
    local pid=$last_pid
    pid_ns[$pid]=$ns
    pid_if[$pid]=$ifname
    wait_for "$ifname's UAPI socket" 15 "$pid" test -S "/var/run/wireguard/$ifname.sock"
}

# Wait until a node's interface is up and carries its overlay address.
wait_overlay_ready() { # NS IFACE IP4
    local ns=$1 ifname=$2 ip4=$3
    wait_for "$ifname to carry $ip4" 15 "$last_pid" \
        sh -c "ip -n '$ns' -4 -o addr show dev '$ifname' | grep -q ' $ip4/'"
}

banner "mesh overlay path (2/6): WireGuard up in every node ($wg_impl)"
for node in "eng:$NS_ENG:$IF_ENG:$ENG_IP4" "gpu1:$NS_W1:$IF_W1:$W1_IP4" "gpu2:$NS_W2:$IF_W2:$W2_IP4"; do
    IFS=: read -r who ns ifname ip4 <<<"$node"
    if [[ $wg_impl == mesh ]]; then
        printf '\n\033[36m[%s]$ mesh up --wg-config %s &\033[0m\n' "$who" "$lab/$ifname.conf"
        up_mesh "mesh-$who" "$ns" "$ifname" "$lab/$ifname.conf"
    else
        printf '\n\033[36m[%s]$ wireguard-go -f %s; wg setconf ...; ip addr/route ...\033[0m\n' "$who" "$ifname"
        up_wireguard_go "wireguard-go-$who" "$ns" "$ifname" "$lab/$ifname.conf"
    fi
    wait_overlay_ready "$ns" "$ifname" "$ip4"
    in_ns "$ns" ip -brief addr show dev "$ifname" | sed 's/^/    /'
done

# ---------------------------------------------------------------------------------------------------
banner "mesh overlay path (3/6): the workers dial out through their NATs; both handshakes reach the engineer"

# Unix time of the latest handshake with PEER-KEY on the engineer's interface (0: none yet). `wg` speaks
# the UAPI, so this works against mesh and wireguard-go alike.
handshake_time() {
    in_ns "$NS_ENG" wg show "$IF_ENG" latest-handshakes 2>/dev/null |
        awk -v k="$1" '$1 == k { print $2; found = 1 } END { if (!found) print 0 }'
}
deadline=$((SECONDS + 30))
nudged=0
nudge_pids=()
while :; do
    h1=$(handshake_time "$(pub gpu1)")
    h2=$(handshake_time "$(pub gpu2)")
    [[ ${h1:-0} != 0 && ${h2:-0} != 0 ]] && break
    ((SECONDS < deadline)) || die "no handshake from both workers within 30 s (gpu1: $h1, gpu2: $h2)"
    if ((nudged == 0 && SECONDS > deadline - 27)); then
        # A keepalive may only be due 25 s after start. Any packet toward the engineer starts the
        # handshake at once; a worker's agent would send one on start.
        note "no handshake yet: each worker pings the engineer once (the first keepalive may be 25 s away)"
        in_ns "$NS_W1" ping -c 1 -W 2 "$ENG_IP4" >/dev/null 2>&1 &
        nudge_pids+=($!)
        in_ns "$NS_W2" ping -c 1 -W 2 "$ENG_IP4" >/dev/null 2>&1 &
        nudge_pids+=($!)
        nudged=1
    fi
    sleep 0.5
done
for pid in "${nudge_pids[@]}"; do wait "$pid" || true; done
note "handshakes done: gpu1 at $(date -d "@$h1" +%T), gpu2 at $(date -d "@$h2" +%T)"
show engineer "$NS_ENG" wg show "$IF_ENG" endpoints
note "(the workers appear at their home routers' public addresses: 203.0.113.21 and .22, i.e. via NAT)"

# ---------------------------------------------------------------------------------------------------
banner "both paths: sshd in each worker, on the overlay addresses (mesh path) and 127.0.0.1 (relay path)"

ssh-keygen -q -t ed25519 -N '' -C engineer@weft-demo -f "$lab/engineer_id"
# sshd's privilege-separation directory (the openssh-server package normally creates it at boot).
[[ -d /run/sshd ]] || install -d -m 0755 /run/sshd
# Without PAM, sshd refuses a locked account ("!" password); with PAM it asks PAM instead.
use_pam=no
[[ $(getent shadow root | cut -d: -f2) == '!'* ]] && use_pam=yes

start_sshd() { # LABEL NS HOSTNAME IP4 IP6
    local label=$1 ns=$2 host=$3 ip4=$4 ip6=$5
    local d="$lab/sshd-$label"
    mkdir -m 700 "$d"
    ssh-keygen -q -t ed25519 -N '' -C "$host" -f "$d/ssh_host_ed25519_key"
    install -m 600 "$lab/engineer_id.pub" "$d/authorized_keys"
    cat >"$d/sshd_config" <<EOF
# The overlay addresses, for the mesh path; loopback, for the relay path (tunnel-relay expose connects
# to 127.0.0.1:22 from inside the worker, so sshd need not listen on any LAN or public address).
ListenAddress $ip4:22
ListenAddress [$ip6]:22
ListenAddress 127.0.0.1:22
HostKey $d/ssh_host_ed25519_key
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM $use_pam
StrictModes no
PrintMotd no
Subsystem sftp internal-sftp
EOF
    # Its own UTS namespace, so `hostname` over SSH names the worker, not this machine.
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
    start "sshd-$label" "$ns" unshare --uts /bin/sh -c 'hostname "$1" && exec /usr/sbin/sshd -D -e -f "$2"' \
        sh "$host" "$d/sshd_config"
    wait_for "sshd on $ip4:22 and 127.0.0.1:22" 10 "$last_pid" sh -c \
        "ip netns exec '$ns' ss -Hltn 'sport = :22' | grep -q '$ip4:22' &&
         ip netns exec '$ns' ss -Hltn 'sport = :22' | grep -q '127.0.0.1:22'"
}
start_sshd gpu1 "$NS_W1" gpu-worker-1 "$W1_IP4" "$W1_IP6"
start_sshd gpu2 "$NS_W2" gpu-worker-2 "$W2_IP4" "$W2_IP6"

# ---------------------------------------------------------------------------------------------------
banner "mesh overlay path (4/6): the engineer SSHes into each worker over the overlay, through both NATs"

ssh_opts=(-i "$lab/engineer_id" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
    -o LogLevel=ERROR -o BatchMode=yes -o ConnectTimeout=10)
show engineer "$NS_ENG" ssh "${ssh_opts[@]}" "root@$W1_IP4" 'hostname; uname -a'
show engineer "$NS_ENG" ssh "${ssh_opts[@]}" "root@$W2_IP4" 'hostname; uname -a'
# shellcheck disable=SC2016 # expanded by the worker's shell
show engineer "$NS_ENG" ssh "${ssh_opts[@]}" "root@$W1_IP6" 'echo "$(hostname) over IPv6: $SSH_CONNECTION"'

# ---------------------------------------------------------------------------------------------------
banner "mesh overlay path (5/6): the engineer's view of the mesh"
if [[ $wg_impl == mesh ]]; then
    show engineer "$NS_ENG" "$mesh_bin" status --interface "$IF_ENG"
fi
show engineer "$NS_ENG" wg show "$IF_ENG"

# ---------------------------------------------------------------------------------------------------
banner "mesh overlay path (6/6): iperf3 engineer -> gpu-worker-1 over the overlay (3 s; 2 shared cores: a smoke test)"
start iperf3-gpu1 "$NS_W1" iperf3 -s -1 -B "$W1_IP4"
wait_for "iperf3 server on $W1_IP4:5201" 10 "$last_pid" \
    sh -c "ip netns exec '$NS_W1' ss -Hltn 'sport = :5201' | grep -q 5201"
show engineer "$NS_ENG" iperf3 -c "$W1_IP4" -t 3 -f m

# ---------------------------------------------------------------------------------------------------
# The relay tunnel path. The same workers, NATs and sshds; nothing here uses the overlay. Every
# tunnel-relay state dir lives in the lab's temp dir: on real machines these are /var/lib/weft-relay
# (operator), /var/lib/weft-expose/NAME (provider) and ~/.config/weft (engineer).
RELAY_STATE=$lab/relay-state
W1_STATE=$lab/gpu1-expose-state
W2_STATE=$lab/gpu2-expose-state
ENG_STATE=$lab/engineer-weft
METRICS_ADDR=127.0.0.1:9464

# Whether the engineer's `tunnel-relay ssh-config` lists every NAME given (i.e. the relay has them
# connected and the policy lets the engineer open their ssh service).
engineer_sees() {
    local cfg name
    cfg=$(in_ns "$NS_ENG" weft ssh-config --state-dir "$ENG_STATE" 2>/dev/null) || return 1
    for name in "$@"; do
        grep -qx "Host $name" <<<"$cfg" || return 1
    done
}

# ---------------------------------------------------------------------------------------------------
banner "relay tunnel path (1/7): the operator starts the relay on $RELAY_ADDR (QUIC on UDP, TLS on TCP)"

# The mesh ACL as the defaults have it, written out so that the operator can edit it later (5/5).
RELAY_CONFIG=$lab/relay.toml
cat >"$RELAY_CONFIG" <<'TOML'
# The web view (explorer), for `weft web`'s links: on this host, 127.0.0.1:8443 reaches it (--keep).
web_listen = "0.0.0.0:8443"
web_url = "https://127.0.0.1:8443"

# Engineers reach workers' ssh and agent API over the mesh; nothing else (the default, written out).
[[mesh.acl.rule]]
from = "engineer"
to = "worker"
proto = "tcp"
ports = [22, 7070]
TOML
print_cmd operator tunnel-relay serve --listen "$RELAY_ADDR" --state-dir "$RELAY_STATE" --config "$RELAY_CONFIG" \
    --metrics "$METRICS_ADDR" '&'
start tunnel-relay-serve "$NS_RELAY" env WEFT_LOG="${WEFT_LOG:-info}" \
    tunnel-relay serve --listen "$RELAY_ADDR" --state-dir "$RELAY_STATE" --config "$RELAY_CONFIG" \
    --metrics "$METRICS_ADDR"
relay_pid=$last_pid
wait_for "the relay on UDP $RELAY_ADDR" 10 "$relay_pid" \
    sh -c "ip netns exec '$NS_RELAY' ss -Hlun 'sport = :4433' | grep -q '$RELAY_ADDR'"
wait_for "the relay's TLS fallback on TCP $RELAY_ADDR" 10 "$relay_pid" \
    sh -c "ip netns exec '$NS_RELAY' ss -Hltn 'sport = :4433' | grep -q '$RELAY_ADDR'"
sed -n 's/^relay /    relay /p' "${pid_log[$relay_pid]}"
note "state: identity.key (0600), cert.der/cert.key, registry.sqlite, listen.addr:"
in_ns "$NS_RELAY" ls -l "$RELAY_STATE" | sed 's/^/      /'

# ---------------------------------------------------------------------------------------------------
banner "relay tunnel path (2/7): the operator creates join tokens: tag worker for providers, tag engineer"

token_create() { # TAG USES: print the command, run it at the relay; the token on stdout (stderr shown)
    local cmd=(tunnel-relay token create --state-dir "$RELAY_STATE" --tag "$1" --uses "$2" --ttl 1h
        --relay-addr "$RELAY_ADDR")
    print_cmd operator "${cmd[@]}" >&2
    in_ns "$NS_RELAY" "${cmd[@]}"
}
worker_token=$(token_create worker 2)
[[ $worker_token == wft1_* ]] || die "token create printed no wft1_ token"
note "-> a wft1_ token (${#worker_token} characters, printed once) for the providers: it names the relay,"
note "   pins the relay's key and carries the join secret (the relay keeps only its hash)"
engineer_token=$(token_create engineer 1)
[[ $engineer_token == wft1_* ]] || die "token create printed no wft1_ token"
note "-> a wft1_ token (${#engineer_token} characters) for the engineer"
show operator "$NS_RELAY" tunnel-relay token list --state-dir "$RELAY_STATE"

# ---------------------------------------------------------------------------------------------------
banner "relay tunnel path (3/7): each provider runs expose; the worker dials out through its NAT to the relay"

expose() { # NS STATE NAME LABEL
    local ns=$1 state=$2 name=$3 label=$4
    print_cmd "$name" tunnel-relay expose --token "${worker_token:0:12}..." --state-dir "$state" --name "$name" \
        --service ssh=127.0.0.1:22 '&'
    start "tunnel-relay-expose-$label" "$ns" env WEFT_LOG="${WEFT_LOG:-info}" \
        tunnel-relay expose --token "$worker_token" --state-dir "$state" --name "$name" --service ssh=127.0.0.1:22
    local pid=$last_pid
    wait_for "$name to be exposed via the relay" 15 "$pid" grep -q "exposed via relay" "${pid_log[$pid]}"
    note "$name: $(grep -m1 -o 'exposed via relay.*' "${pid_log[$pid]}" | sed 's/\x1b\[[0-9;]*m//g')"
}
expose "$NS_W1" "$W1_STATE" gpu-worker-1 gpu1
expose "$NS_W2" "$W2_STATE" gpu-worker-2 gpu2
note "(later runs need no token: the worker's identity.key and relay.json stay in --state-dir)"

# ---------------------------------------------------------------------------------------------------
banner "relay tunnel path (4/7): the engineer logs in and lists the workers it may reach"

show engineer "$NS_ENG" weft login --token "$engineer_token" --state-dir "$ENG_STATE" --name alice |
    sed "s/${engineer_token}/${engineer_token:0:12}.../g"
wait_for "the engineer to see both workers" 15 "$relay_pid" engineer_sees gpu-worker-1 gpu-worker-2
print_cmd engineer weft ssh-config --state-dir "$ENG_STATE"
in_ns "$NS_ENG" weft ssh-config --state-dir "$ENG_STATE" >"$lab/engineer_ssh_config"
cat "$lab/engineer_ssh_config"

# ---------------------------------------------------------------------------------------------------
banner "relay tunnel path (5/7): the engineer SSHes into each worker through the relay, not the overlay"

proxy="weft connect --state-dir $ENG_STATE %h %p"
show engineer "$NS_ENG" ssh "${ssh_opts[@]}" -o ProxyCommand="$proxy" root@gpu-worker-1 'hostname; uname -a'
show engineer "$NS_ENG" ssh "${ssh_opts[@]}" -o ProxyCommand="$proxy" root@gpu-worker-2 'hostname; uname -a'
note "the same through the ssh-config output saved as a file; sshd sees expose's connection from loopback:"
# shellcheck disable=SC2016 # expanded by the worker's shell
show engineer "$NS_ENG" ssh -F "$lab/engineer_ssh_config" "${ssh_opts[@]}" root@gpu-worker-2 \
    'echo "$(hostname) via the relay: SSH_CONNECTION=$SSH_CONNECTION"'

# ---------------------------------------------------------------------------------------------------
banner "relay tunnel path (6/7): policy: a worker may not open a tunnel to another worker (only engineer -> worker)"

print_cmd gpu-worker-1 tunnel-relay connect --state-dir "$W1_STATE" gpu-worker-2 22
if refusal=$(in_ns "$NS_W1" tunnel-relay connect --state-dir "$W1_STATE" gpu-worker-2 22 </dev/null 2>&1); then
    die "the relay let gpu-worker-1 (tag worker) open gpu-worker-2's ssh: the policy should refuse it"
fi
printf '%s\n' "$refusal"
[[ $refusal == *"not allowed"* ]] || die "expected a 'not allowed' refusal from the relay, got: $refusal"
note "(refused by the relay's policy, with the reason; the worker's own exposure stays up)"

# ---------------------------------------------------------------------------------------------------
banner "relay tunnel path (7/7): the operator's view: registered nodes and metrics"

show operator "$NS_RELAY" tunnel-relay nodes list --state-dir "$RELAY_STATE"
print_cmd operator curl -s "http://$METRICS_ADDR/metrics"
note "(curl is not on a fresh machine: the demo does this GET with bash's /dev/tcp; comment lines left out)"
# shellcheck disable=SC2016 # expanded by the inner bash
in_ns "$NS_RELAY" timeout 5 bash -c 'exec 3<>"/dev/tcp/${1%:*}/${1#*:}" &&
    printf "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n" "$1" >&3 && cat <&3' sh "$METRICS_ADDR" |
    tr -d '\r' | grep '^weft_relay' || die "no metrics from the relay on $METRICS_ADDR"

# ---------------------------------------------------------------------------------------------------
banner "guest Wi-Fi: a third engineer, carol, on a network that passes no UDP: the relay's TLS-over-TCP fallback"
for ns in "$NS_GUEST" "$NS_CAROL"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
home_router "$NS_GUEST" "$NS_CAROL" guest 203.0.113.31 192.0.2.97 192.0.2.98
# The guest network's firewall: every forwarded UDP packet is dropped, except DNS; TCP and ICMP pass
# (the rules of tests/src/router.rs `Router::block_udp`).
in_ns "$NS_GUEST" nft -f - <<'NFT'
table inet udpblock {
    chain forward {
        type filter hook forward priority -10; policy accept;
        udp dport 53 accept
        udp sport 53 accept
        meta l4proto udp drop
    }
}
NFT
note "guest router   $NS_GUEST wan 203.0.113.31, NAT + firewall, and no UDP out except DNS:"
in_ns "$NS_GUEST" nft list table inet udpblock | sed 's/^/      /'
note "carol's laptop $NS_CAROL lan 192.0.2.98"
CAROL_STATE=$lab/carol-weft
carol_token=$(token_create engineer 1)
# Every weft command can log how it reached the relay (`relay session up ... transport=...`); carol's
# logs go to a file the demo reads back.
carol_log=info,tunnel_relay::client::session=debug
show carol "$NS_CAROL" env WEFT_LOG=$carol_log weft login --token "$carol_token" --state-dir "$CAROL_STATE" \
    --name carol 2>>"$lab/carol-weft.log" | sed "s/${carol_token}/${carol_token:0:12}.../g"
carol_proxy="weft connect --state-dir $CAROL_STATE %h %p"
# shellcheck disable=SC2016 # expanded by the worker's shell
show carol "$NS_CAROL" env WEFT_LOG=$carol_log ssh "${ssh_opts[@]}" -o ProxyCommand="$carol_proxy" root@gpu-worker-1 \
    'echo "$(hostname) via the relay over TCP: SSH_CONNECTION=$SSH_CONNECTION"' 2>>"$lab/carol-weft.log"
note "how carol's weft reached the relay (its log; QUIC got no answer, TLS over TCP did 250 ms later):"
sed 's/\x1b\[[0-9;]*m//g' "$lab/carol-weft.log" >"$lab/carol-weft.txt"
grep 'relay session up' "$lab/carol-weft.txt" | sed 's/^/      /' || true
grep -q 'relay session up.*transport=tcp' "$lab/carol-weft.txt" ||
    die "no 'relay session up ... transport=tcp' in carol's weft log ($lab/carol-weft.log)"
if grep 'relay session up' "$lab/carol-weft.txt" | grep -qv 'transport=tcp'; then
    die "carol's weft reached the relay over QUIC through a network that drops UDP"
fi
show carol "$NS_CAROL" weft status --state-dir "$CAROL_STATE" --uapi-dir "$lab/uapi-carol"
in_ns "$NS_CAROL" weft status --json --state-dir "$CAROL_STATE" --uapi-dir "$lab/uapi-carol" |
    grep -q '"transport": "tcp"' || die "weft status does not say carol's relay link is tcp"
print_cmd operator curl -s "http://$METRICS_ADDR/metrics"
note "(the connections counter by transport only)"
# shellcheck disable=SC2016 # expanded by the inner bash
in_ns "$NS_RELAY" timeout 5 bash -c 'exec 3<>"/dev/tcp/${1%:*}/${1#*:}" &&
    printf "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n" "$1" >&3 && cat <&3' sh "$METRICS_ADDR" |
    tr -d '\r' | grep '^weft_relay_transport_connections_total' ||
    die "no weft_relay_transport_connections_total from the relay"
note "(the relay counts admitted connections by transport: carol's on tcp, everyone else's on quic)"


# ---------------------------------------------------------------------------------------------------
# The managed mesh: the same relay is the coordinator. Nodes join with a token; their identity stays in
# --state-dir (on real machines /var/lib/weft-mesh). Overlay addresses come from 100.64.0.0/10.
mesh_managed() { # LABEL NS STATE NAME TOKEN
    local label=$1 ns=$2 state=$3 name=$4 token=$5
    print_cmd "$name" mesh up --token "${token:0:12}..." --state-dir "$state" --name "$name" '&'
    start "mesh-managed-$label" "$ns" env WEFT_LOG="${WEFT_LOG:-info,netlink_packet_route=error}" \
        "$mesh_bin" up --token "$token" --state-dir "$state" --name "$name" --uapi-dir "$lab/uapi-$label"
    pid_ns[$last_pid]=$ns
    pid_if[$last_pid]=weft0
    wait_for "$name to join the mesh" 20 "$last_pid" grep -q "joined the mesh" "${pid_log[$last_pid]}"
    note "$name: $(grep -m1 -o 'joined the mesh.*' "${pid_log[$last_pid]}" | sed 's/\x1b\[[0-9;]*m//g')"
}
overlay_ip() { # NS: the node's own overlay IPv4 (not MagicDNS's 100.64.0.1)
    ip -n "$1" -4 -br addr show weft0 | tr ' ' '\n' | grep '/32' | grep -v '^100.64.0.1/' | cut -d/ -f1
}
# The endpoint `mesh status --json` shows for the peer with overlay address IP ("relay" or ip:port).
path_to() { # LABEL NS IP
    ip netns exec "$2" "$mesh_bin" status --json --interface weft0 --uapi-dir "$lab/uapi-$1" 2>/dev/null |
        python3 -c 'import json,sys
d=json.load(sys.stdin); ip=sys.argv[1]
for p in d.get("peers", []):
    if any(a.split("/")[0] == ip for a in p.get("allowed_ips", [])): print(p.get("endpoint") or "")' "$3"
}
is_direct() { local e; e=$(path_to "$@"); [[ -n $e && $e != relay ]]; }
is_relay() { [[ $(path_to "$@") == relay ]]; }

banner "managed mesh (1/5): the providers join the mesh with a token: no config file, no key exchange"
mesh_token=$(token_create worker 2)
mesh_managed gpu1 "$NS_W1" "$lab/gpu1-mesh" gpu1 "$mesh_token"
mesh_managed gpu2 "$NS_W2" "$lab/gpu2-mesh" gpu2 "$mesh_token"
G1=$(overlay_ip "$NS_W1")
G2=$(overlay_ip "$NS_W2")
show gpu1 "$NS_W1" ip -br addr show weft0

# ---------------------------------------------------------------------------------------------------
banner "managed mesh (2/5): two engineers join: alice (public address) and bob (hotel Wi-Fi, hard NAT)"
for ns in "$NS_HOTEL" "$NS_BOB"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
home_router "$NS_HOTEL" "$NS_BOB" hotel 203.0.113.30 192.0.2.65 192.0.2.66 random
note "hotel router   $NS_HOTEL wan 203.0.113.30, masquerade random (a new port per destination)"
note "bob's laptop   $NS_BOB  lan 192.0.2.66"
for ns in "$NS_ENG" "$NS_BOB"; do
    # MagicDNS: the engineers' resolver is the node's own 100.64.0.1 (what `resolvectl dns weft0
    # 100.64.0.1` does on a laptop); ip netns exec bind-mounts this file over /etc/resolv.conf.
    mkdir -p "/etc/netns/$ns"
    echo "nameserver 100.64.0.1" >"/etc/netns/$ns/resolv.conf"
done
# alice joins with the identity she logged in with on the relay path (one key per machine: the relay
# knows it, so no token is needed); bob is new and brings a token.
print_cmd alice weft up --state-dir "$ENG_STATE" '&'
start "mesh-managed-alice" "$NS_ENG" env WEFT_LOG="${WEFT_LOG:-info}" \
    weft up --state-dir "$ENG_STATE" --uapi-dir "$lab/uapi-alice"
pid_ns[$last_pid]=$NS_ENG
pid_if[$last_pid]=weft0
wait_for "alice to join the mesh" 20 "$last_pid" grep -q "joined the mesh" "${pid_log[$last_pid]}"
note "alice: $(grep -m1 -o 'joined the mesh.*' "${pid_log[$last_pid]}" | sed 's/\x1b\[[0-9;]*m//g')"
mesh_managed bob "$NS_BOB" "$lab/bob-mesh" bob "$(token_create engineer 1)"

# ---------------------------------------------------------------------------------------------------
banner "managed mesh (3/5): mesh status: alice reaches both workers directly, bob through the relay"
alice_direct() { is_direct alice "$NS_ENG" "$G1" && is_direct alice "$NS_ENG" "$G2"; }
bob_relayed() { is_relay bob "$NS_BOB" "$G1" && is_relay bob "$NS_BOB" "$G2"; }
wait_for "alice's direct paths to gpu1 and gpu2" 20 "" alice_direct
wait_for "bob's relayed paths to gpu1 and gpu2" 20 "" bob_relayed
show alice "$NS_ENG" weft status --state-dir "$ENG_STATE" --uapi-dir "$lab/uapi-alice"
show alice "$NS_ENG" weft ping gpu1 -c 2 --uapi-dir "$lab/uapi-alice"
show bob "$NS_BOB" "$mesh_bin" status --interface weft0 --uapi-dir "$lab/uapi-bob"
note "(bob's hotel NAT picks a new port for every destination, so no hole can be punched to an easy NAT:"
note " his packets go through the relay as QUIC datagrams, still end-to-end WireGuard-encrypted)"

# ---------------------------------------------------------------------------------------------------
banner "managed mesh (4/5): MagicDNS: the engineers ssh into the workers by name over the mesh"
start_sshd_mesh() { # LABEL NS HOSTNAME IP4
    local label=$1 ns=$2 host=$3 ip4=$4 d="$lab/sshd-$1"
    sed "s/^ListenAddress .*//" "$lab/sshd-$label/sshd_config" >"$d/sshd_config.mesh"
    echo "ListenAddress $ip4:22" >>"$d/sshd_config.mesh"
    sed -i "s|^PidFile .*|PidFile $d/sshd-mesh.pid|" "$d/sshd_config.mesh"
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
    start "sshd-mesh-$label" "$ns" unshare --uts /bin/sh -c 'hostname "$1" && exec /usr/sbin/sshd -D -e -f "$2"' \
        sh "$host" "$d/sshd_config.mesh"
    wait_for "sshd on $ip4:22" 10 "$last_pid" sh -c "ip netns exec '$ns' ss -Hltn 'sport = :22' | grep -q '$ip4:22'"
}
start_sshd_mesh gpu1 "$NS_W1" gpu-worker-1 "$G1"
start_sshd_mesh gpu2 "$NS_W2" gpu-worker-2 "$G2"
show alice "$NS_ENG" getent ahostsv4 gpu1.weft.internal
# shellcheck disable=SC2016 # expanded by the worker's shell
show alice "$NS_ENG" ssh "${ssh_opts[@]}" root@gpu1.weft.internal 'echo "$(hostname) by name over the mesh: $SSH_CONNECTION"'
# shellcheck disable=SC2016 # expanded by the worker's shell
show bob "$NS_BOB" ssh "${ssh_opts[@]}" root@gpu2.weft.internal 'echo "$(hostname) by name, relayed: $SSH_CONNECTION"'

# ---------------------------------------------------------------------------------------------------
banner "managed mesh (5/5): the ACL: engineers reach tcp/22 on workers; a worker reaches no other worker"
print_cmd gpu1 ping -c 1 -W 1 "$G2"
if in_ns "$NS_W1" ping -c 1 -W 1 "$G2" >/dev/null 2>&1; then
    die "gpu1 reached gpu2 over the mesh: the default ACL should keep workers apart"
fi
note "(no reply: gpu2 is not even in gpu1's peer map; workers see only engineers)"
show gpu1 "$NS_W1" "$mesh_bin" status --interface weft0 --uapi-dir "$lab/uapi-gpu1"

note "the operator lets workers ping each other: one ACL rule, applied without restarting the relay"
cp "$RELAY_CONFIG" "$lab/relay.toml.orig"
printf '\n[[mesh.acl.rule]]\nfrom = "worker"\nto = "worker"\nproto = "icmp"\n' >>"$RELAY_CONFIG"
print_cmd operator cat "$RELAY_CONFIG"
sed 's/^/    /' "$RELAY_CONFIG"
show operator "$NS_RELAY" tunnel-relay policy reload --state-dir "$RELAY_STATE"
wait_for "gpu1 to reach gpu2 after the reload" 15 "$relay_pid" in_ns "$NS_W1" ping -c 1 -W 1 "$G2"
show gpu1 "$NS_W1" ping -c 2 -i 0.2 "$G2"
note "(the relay sent both workers a peer-map delta; SIGHUP or \`systemctl reload weft-relay\` does the same)"
cp "$lab/relay.toml.orig" "$RELAY_CONFIG"
show operator "$NS_RELAY" tunnel-relay policy reload --state-dir "$RELAY_STATE"
wait_for "gpu2 out of gpu1's peer map again" 10 "$relay_pid" \
    sh -c "! ip netns exec '$NS_W1' ping -c 1 -W 1 '$G2'"
note "(rule taken out again: the workers are apart, as before)"

# ---------------------------------------------------------------------------------------------------
# The GPU pool: the relay is also the scheduler. These lab machines have no GPU, so each worker agent
# loads the stub NVML library (a test double built from worker-agent/tests/stub/nvml_stub.c) that
# pretends to be GPUs: simulated, and announced as such everywhere they are shown.
banner "GPU pool (1/4): each provider runs worker-agent: it joins the relay and reports its GPUs"
note "SIMULATED GPUs: this lab has no GPU; the agents load a stub NVML library (a test double)"
gcc -shared -fPIC -O1 -o "$lab/libnvml-stub.so" "$repo/worker-agent/tests/stub/nvml_stub.c"
agent_token=$(token_create worker 2)
# Without --ray the agents stay off the mesh (the workers run `mesh up` above). With --ray they join
# it themselves (Ray's nodes talk over it; a worker without the mesh is not offered for clusters),
# so the workers' own `mesh up` nodes stop first: one mesh node per machine.
agent_flags=(--no-mesh)
agent_shown=(--no-mesh)
if [[ $ray == 1 ]]; then
    note "--ray: the agents join the mesh themselves, so each worker's own \`mesh up\` stops first"
    stop_started mesh-managed-gpu1
    stop_started mesh-managed-gpu2
    agent_flags=(--ray "$ray_bin" --kill-grace-s 5)
    agent_shown=(--ray "$ray_bin")
fi
agent() { # LABEL NS NAME GPUS MODEL MIB SEED
    local label=$1 ns=$2 name=$3
    mkdir -p "$lab/stub-$label"
    local flags=("${agent_flags[@]}")
    [[ $ray == 1 ]] && flags+=(--uapi-dir "$lab/uapi-agent-$label")
    print_cmd "$name" worker-agent run --token "${agent_token:0:12}..." --state-dir "$lab/agent-$label" \
        --name "$name" "${agent_shown[@]}" '&'
    start "worker-agent-$label" "$ns" env WEFT_LOG="${WEFT_LOG:-info}" WEFT_NVML_STUB_DIR="$lab/stub-$label" \
        WEFT_NVML_STUB_GPUS="$4" WEFT_NVML_STUB_MODEL="$5" WEFT_NVML_STUB_MEMORY_MIB="$6" \
        WEFT_NVML_STUB_UUID_SEED="$7" \
        worker-agent run --token "$agent_token" --state-dir "$lab/agent-$label" --name "$name" "${flags[@]}" \
        --nvml-lib "$lab/libnvml-stub.so"
    wait_for "$name to report to the pool" 20 "$last_pid" grep -q "pool feed stream opened" "${pid_log[$last_pid]}"
    if [[ $ray == 1 ]]; then
        ray_agent_pids+=("$last_pid")
        wait_for "$name to join the mesh" 30 "$last_pid" grep -q "on the mesh; jobs API" "${pid_log[$last_pid]}"
        note "$name: $(grep -m1 -o 'on the mesh;.*' "${pid_log[$last_pid]}" | sed 's/\x1b\[[0-9;]*m//g')"
    fi
}
agent gpu1 "$NS_W1" gpu-a100 2 "NVIDIA A100-SXM4-80GB" 81920 1
agent gpu2 "$NS_W2" gpu-4090 4 "NVIDIA GeForce RTX 4090" 24564 2
if [[ $ray == 1 ]]; then
    note "(--ray: each agent offers Ray clusters; it runs Ray's members as jobs, on its mesh address)"
else
    note "(--no-mesh: these workers already run \`mesh up\` above; an agent on its own joins the mesh too)"
fi

banner "GPU pool (2/4): the engineer sees the pool: every worker with every GPU, free or busy, healthy or not"
pool_ready() { in_ns "$NS_ENG" weft pool --json --state-dir "$ENG_STATE" | grep -q '"gpu-4090"' &&
    in_ns "$NS_ENG" weft pool --json --state-dir "$ENG_STATE" | grep -q '"gpu-a100"'; }
wait_for "both workers in the pool" 20 "" pool_ready
show alice "$NS_ENG" weft pool --state-dir "$ENG_STATE"

banner "GPU pool (3/4): a job placed by requirement: 80 GB or more, one GPU; no --worker"
print_cmd alice weft jobs submit --state-dir "$ENG_STATE" --gpu 80GB..:1 -- sh -c \
    'echo "hello from pool job $WEFT_POOL_JOB on $CUDA_VISIBLE_DEVICES"; sleep 1; echo done'
# shellcheck disable=SC2016 # expanded by the job's shell
job=$(in_ns "$NS_ENG" weft jobs submit --state-dir "$ENG_STATE" --gpu 80GB..:1 -- sh -c \
    'echo "hello from pool job $WEFT_POOL_JOB on $CUDA_VISIBLE_DEVICES"; sleep 1; echo done')
note "-> job $job"
show alice "$NS_ENG" weft jobs logs --state-dir "$ENG_STATE" --follow "$job"
show alice "$NS_ENG" weft jobs show --state-dir "$ENG_STATE" "$job"
in_ns "$NS_ENG" weft jobs show --json --state-dir "$ENG_STATE" "$job" | grep -q '"worker":"gpu-a100"' ||
    die "job $job was not placed on gpu-a100 (the only worker with 80 GB GPUs)"
print_cmd alice weft jobs submit --state-dir "$ENG_STATE" --gpu H100 -- true
if in_ns "$NS_ENG" weft jobs submit --state-dir "$ENG_STATE" --gpu H100 -- true 2>"$lab/h100.err"; then
    die "an H100 job was accepted in a pool without H100s"
fi
sed 's/^/    /' "$lab/h100.err"
note "(refused at once with why; --wait-for-capacity would queue it)"

banner "GPU pool (4/4): the usage record the job left, and the operator's view of the pool"
show alice "$NS_ENG" weft usage --state-dir "$ENG_STATE"
show operator "$NS_RELAY" tunnel-relay pool list --state-dir "$RELAY_STATE"

# ---------------------------------------------------------------------------------------------------
banner "explorer: the relay's web view; alice logs in with a one-time link, no password"
WEB_URL=https://127.0.0.1:8443
show alice "$NS_ENG" weft web --print --state-dir "$ENG_STATE" | tee "$lab/web-link"
link=$(tail -n 1 "$lab/web-link")
[[ $link == "$WEB_URL/login?t="* ]] || die "weft web printed no login link"
# The links name 127.0.0.1:8443, where a browser on this host reaches the web view with --keep; from
# alice's namespace the relay is at $RELAY_IP, so curl is told where 127.0.0.1:8443 is.
web_curl() { in_ns "$NS_ENG" curl -sk --connect-to "127.0.0.1:8443:$RELAY_IP:8443" "$@"; }
code=$(web_curl -c "$lab/web-cookies" -o /dev/null -w '%{http_code}' "$link")
[[ $code == 200 ]] || die "the login link answered HTTP $code"
code=$(web_curl -o /dev/null -w '%{http_code}' "$link")
[[ $code == 403 ]] || die "the login link worked twice (HTTP $code)"
note "the link started a session (cookie HttpOnly, Secure, SameSite=Strict) and works only once"
print_cmd alice curl -b cookies "$WEB_URL/api/v1/nodes"
web_curl -b "$lab/web-cookies" "$WEB_URL/api/v1/nodes" | python3 -c '
import json, sys
for n in json.load(sys.stdin):
    gpus = ", ".join(g["model"] for g in n["gpus"]) or "no GPUs"
    print("    {:<16} {:<8} {}".format(n["name"], "online" if n["online"] else "offline", gpus))'
code=$(web_curl -o /dev/null -w '%{http_code}' "$WEB_URL/api/v1/nodes")
[[ $code == 401 ]] || die "the web API answered HTTP $code without a session"
note "(the same session shows the Network, Devices, Jobs and Earnings pages; without one: 401)"

# ---------------------------------------------------------------------------------------------------
# Ray clusters on the pool (--ray): the relay reserves a gang of workers; each member's agent runs
# `ray start` as a job on its overlay address; Ray's nodes reach each other over the mesh, through
# both home routers' NATs. alice needs no mesh for this: every `weft cluster` command goes through
# the relay, and `submit` forwards the head's dashboard to her machine over it.
if [[ $ray == 1 ]]; then
    banner "Ray cluster (1/4): alice makes the two NATed workers one Ray cluster over the mesh"
    ray_ready() {
        in_ns "$NS_ENG" weft pool --json --state-dir "$ENG_STATE" | python3 -c 'import json,sys
ws=json.load(sys.stdin).get("workers", [])
sys.exit(0 if sum(1 for w in ws if (w.get("inventory") or {}).get("ray")) == 2 else 1)'
    }
    wait_for "both workers to offer Ray in the pool" 20 "" ray_ready
    note "a gang of 2 workers (1 GPU each) is reserved; rank 0 starts Ray's head on its overlay address,"
    note "rank 1 joins it there: worker to worker over the mesh, across both NATs"
    show alice "$NS_ENG" weft cluster --state-dir "$ENG_STATE" up demo --nodes 2 --cpus-per-node 1 \
        --object-store-mib 100 --timeout 240

    banner "Ray cluster (2/4): the cluster's members, their overlay addresses and Ray's own view of its nodes"
    show alice "$NS_ENG" weft cluster --state-dir "$ENG_STATE" status demo
    show alice "$NS_ENG" weft cluster --state-dir "$ENG_STATE" list
    cluster_json=$(in_ns "$NS_ENG" weft cluster --state-dir "$ENG_STATE" status demo --json)
    cluster_job=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$cluster_json")
    mapfile -t member_ips < <(python3 -c 'import json,sys
for ip in json.loads(sys.argv[1])["cluster"]["member_ips"]: print(ip)' "$cluster_json")
    ((${#member_ips[@]} == 2)) || die "cluster demo has ${#member_ips[@]} member address(es), not 2: $cluster_json"

    banner "Ray cluster (3/4): a Ray job: a task on each node, and 8 MiB put on one node and read on the other"
    mkdir -p "$lab/ray-job"
    cat >"$lab/ray-job/job.py" <<'PY'
# A task on each of the cluster's nodes says where it ran; an object put on one node is read on the
# other (Ray's object transfer: worker to worker, over the mesh).
import hashlib

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()
nodes = sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: n["NodeManagerAddress"])
print(f"Ray sees {len(nodes)} nodes:", ", ".join(n["NodeManagerAddress"] for n in nodes))


def on(node):
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)}


@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()


@ray.remote(num_cpus=0)
def make(mib):
    data = bytes(range(256)) * (mib * 4096)
    return ray.put(data), hashlib.sha256(data).hexdigest()


@ray.remote(num_cpus=0)
def read(refs):
    data = ray.get(refs[0])
    return len(data), hashlib.sha256(data).hexdigest(), ray.util.get_node_ip_address()


for node, ip in zip(nodes, ray.get([where.options(**on(n)).remote() for n in nodes])):
    print(f"a task placed on node {node['NodeID'][:8]} ran at {ip}")
maker, reader = nodes[0], nodes[-1]
ref, made = ray.get(make.options(**on(maker)).remote(8))
size, got, at = ray.get(read.options(**on(reader)).remote([ref]))
print(f"{size >> 20} MiB put on {maker['NodeManagerAddress']}, read on {at}:",
      "intact" if got == made else "CORRUPTED", f"(sha256 {got[:16]}...)")
assert got == made and at != maker["NodeManagerAddress"]
PY
    show alice "$NS_ENG" cat "$lab/ray-job/job.py"
    show alice "$NS_ENG" weft cluster --state-dir "$ENG_STATE" submit demo --ray "$ray_bin" \
        --working-dir "$lab/ray-job" -- python job.py | tee "$lab/ray-job.out"
    for ip in "${member_ips[@]}"; do
        grep -q "ran at $ip\$" "$lab/ray-job.out" || die "no task of the Ray job ran at member address $ip"
    done
    grep -q "read on .*: intact" "$lab/ray-job.out" || die "the Ray job's object did not cross nodes intact"
    note "(a task ran at each member's overlay address; the object went from one NATed worker to the other)"

    banner "Ray cluster (4/4): down: Ray stops on both workers and their GPUs are free again"
    show alice "$NS_ENG" weft cluster --state-dir "$ENG_STATE" down demo
    no_ray_left() { ! pgrep -f "weft-ray-${cluster_job}\\." >/dev/null; }
    wait_for "no Ray process of cluster demo (pool job $cluster_job) left" 30 "" no_ray_left
    gpus_free() { in_ns "$NS_ENG" weft pool --json --state-dir "$ENG_STATE" | python3 -c 'import json,sys
ws=json.load(sys.stdin).get("workers", [])
sys.exit(0 if ws and all(h is None for w in ws for h in w.get("holders") or []) else 1)'; }
    wait_for "every GPU free" 15 "" gpus_free
    show alice "$NS_ENG" weft pool --state-dir "$ENG_STATE"
    note "(no Ray process left on either worker; every GPU free)"
fi

# ---------------------------------------------------------------------------------------------------
if [[ $keep == 1 ]]; then
    # The web view, for a browser on this host: 127.0.0.1:8443 (loopback only) into the relay's
    # namespace, where it listens.
    socat TCP-LISTEN:8443,bind=127.0.0.1,reuseaddr,fork \
        EXEC:"ip netns exec $NS_RELAY socat STDIO TCP\:127.0.0.1\:8443" >"$lab/web-bridge.log" 2>&1 &
    pids+=("$!")
    pid_label[$!]=web-bridge
    pid_log[$!]=$lab/web-bridge.log
    explorer_link=$(in_ns "$NS_ENG" "$weft_bin" web --print --state-dir "$ENG_STATE" 2>/dev/null | tail -n 1)
    banner "the lab is up; Ctrl-C tears it down"
    cat <<EOF
    Get in (another terminal, as root):
      ip netns exec $NS_ENG ssh -i $lab/engineer_id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@$W1_IP4
      ip netns exec $NS_ENG ssh -i $lab/engineer_id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@$W2_IP4
      ip netns exec $NS_ENG wg show $IF_ENG
EOF
    if [[ $wg_impl == mesh ]]; then
        echo "      ip netns exec $NS_ENG $mesh_bin status --interface $IF_ENG"
    fi
    cat <<EOF
    Relay tunnel path:
      ip netns exec $NS_ENG ssh -i $lab/engineer_id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ProxyCommand='$weft_bin connect --state-dir $ENG_STATE %h %p' root@gpu-worker-1
      ip netns exec $NS_ENG ssh -F $lab/engineer_ssh_config -i $lab/engineer_id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@gpu-worker-2
      ip netns exec $NS_RELAY $relay_bin nodes list --state-dir $RELAY_STATE
    Guest Wi-Fi (no UDP out; the relay's TLS-over-TCP fallback):
      ip netns exec $NS_CAROL env WEFT_LOG=info,tunnel_relay::client::session=debug ssh -i $lab/engineer_id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ProxyCommand='$weft_bin connect --state-dir $CAROL_STATE %h %p' root@gpu-worker-1
      ip netns exec $NS_CAROL $weft_bin status --state-dir $CAROL_STATE
EOF
    cat <<EOF
    Explorer (the relay's web view; a self-signed certificate: accept it), alice's one-time link, for a
    browser on this host, valid for a minute (another: ip netns exec $NS_ENG $weft_bin web --print --state-dir $ENG_STATE):
      $explorer_link
    GPU pool (simulated GPUs):
      ip netns exec $NS_ENG $weft_bin pool --state-dir $ENG_STATE
      ip netns exec $NS_ENG $weft_bin jobs submit --state-dir $ENG_STATE --gpu RTX4090:2 -- sh -c 'echo \$CUDA_VISIBLE_DEVICES'
      ip netns exec $NS_RELAY $relay_bin pool list --state-dir $RELAY_STATE
EOF
    if [[ $ray == 1 ]]; then
        cat <<EOF
    Ray clusters (the demo's is down again; its job is in $lab/ray-job):
      ip netns exec $NS_ENG $weft_bin cluster --state-dir $ENG_STATE up mine --nodes 2 --cpus-per-node 1 --object-store-mib 100
      ip netns exec $NS_ENG $weft_bin cluster --state-dir $ENG_STATE submit mine --ray $ray_bin --working-dir $lab/ray-job -- python job.py
      ip netns exec $NS_ENG $weft_bin cluster --state-dir $ENG_STATE down mine
EOF
    fi
    cat <<EOF
    Managed mesh (MagicDNS in the engineers' namespaces):
EOF
    if [[ $ray == 0 ]]; then
        echo "      ip netns exec $NS_ENG ssh -i $lab/engineer_id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@gpu1.weft.internal"
    else
        echo "      (--ray: the workers' own \`mesh up\` made way for their agents, on the mesh as gpu-a100 and gpu-4090)"
    fi
    cat <<EOF
      ip netns exec $NS_ENG $weft_bin status --state-dir $ENG_STATE --uapi-dir $lab/uapi-alice
      ip netns exec $NS_BOB $mesh_bin status --interface weft0 --uapi-dir $lab/uapi-bob
EOF
    echo "    Logs: $lab/*.log"
    trap 'exit 0' INT TERM # Ctrl-C is how this mode ends
    while :; do
        for pid in "${pids[@]}"; do
            if [[ ${pid_label[$pid]} != iperf3-* ]] && ! kill -0 "$pid" 2>/dev/null; then
                die "${pid_label[$pid]} (pid $pid) exited on its own"
            fi
        done
        sleep 1
    done
fi
