#!/usr/bin/env bash
# A Ray cluster of separate network hosts on one Linux machine: a head and N worker nodes, each in its own
# network namespace with its own IP on a private bridge, each with its own --temp-dir. Needs root and `ip`.
#
#   sudo scripts/local_cluster.sh up          # head + 2 workers; prints the dashboard address to submit to
#   sudo scripts/local_cluster.sh status      # nodes, IPs, PIDs, what Ray sees
#   sudo scripts/local_cluster.sh add-worker  # one more worker node (prints its name and IP)
#   sudo scripts/local_cluster.sh kill-node w1    # SIGKILL every process of that host (a lost node)
#   sudo scripts/local_cluster.sh down        # removes every namespace, veth, bridge and process it made
#
# Jobs then run with this checkout's .venv Python (the nodes are started from it, with it first on PATH):
#   ray job submit --address http://10.213.0.2:8265 --working-dir . -- python jobs/train_rm.py ...
#
# Settings (environment): RAYAPP_CLUSTER_NAME (default rayapp; <= 8 characters: interface names are short),
# RAYAPP_CLUSTER_SUBNET (first three octets, default 10.213.0), RAYAPP_CLUSTER_WORKERS (2),
# RAYAPP_CLUSTER_HEAD_CPUS (1), RAYAPP_CLUSTER_WORKER_CPUS (2), RAYAPP_CLUSTER_OBJECT_STORE_MB (400 per node),
# RAYAPP_CLUSTER_VENV (default <repo>/.venv), RAYAPP_CLUSTER_TIMEOUT_S (180: how long `up` waits for nodes).
# State, logs and each node's Ray temp dir live in /tmp/rlc-<name>/ (removed by `down`).
#
# Never `ray stop` here: it finds Ray processes by name in the whole process table, which all namespaces
# share, and would also end other people's clusters. Nodes are stopped by PID and by namespace.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${RAYAPP_CLUSTER_NAME:-rayapp}"
SUBNET="${RAYAPP_CLUSTER_SUBNET:-10.213.0}"
WORKERS="${RAYAPP_CLUSTER_WORKERS:-2}"
HEAD_CPUS="${RAYAPP_CLUSTER_HEAD_CPUS:-1}"
WORKER_CPUS="${RAYAPP_CLUSTER_WORKER_CPUS:-2}"
OBJECT_STORE_MB="${RAYAPP_CLUSTER_OBJECT_STORE_MB:-400}"
VENV="${RAYAPP_CLUSTER_VENV:-$REPO_ROOT/.venv}"
TIMEOUT_S="${RAYAPP_CLUSTER_TIMEOUT_S:-180}"
STATE="/tmp/rlc-$NAME"
BRIDGE="$NAME-br"
GCS_PORT=6379
DASHBOARD_PORT=8265

die() { echo "local_cluster: $*" >&2; exit 1; }
say() { echo "local_cluster: $*" >&2; }

check_prerequisites() {
    [[ "$(id -u)" == 0 ]] || die "needs root (network namespaces); run it with sudo"
    command -v ip >/dev/null || die "needs the 'ip' command (iproute2)"
    [[ "$NAME" =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "RAYAPP_CLUSTER_NAME must be 1-8 lowercase letters/digits, got '$NAME'"
    [[ "$SUBNET" =~ ^10\.[0-9]+\.[0-9]+$ ]] || die "RAYAPP_CLUSTER_SUBNET must look like 10.X.Y, got '$SUBNET'"
    [[ -x "$VENV/bin/ray" ]] || die "no $VENV/bin/ray: run scripts/setup.sh first (or set RAYAPP_CLUSTER_VENV)"
}

# --- bookkeeping: one directory per node under $STATE/nodes/<node> (ip, pid, temp/, node.log) ---
node_ns() { echo "$NAME-$1"; }
node_ip() { cat "$STATE/nodes/$1/ip"; }
node_names() { [[ -d "$STATE/nodes" ]] && ls "$STATE/nodes" | sort -V || true; }
head_ip() { echo "$SUBNET.2"; }

namespace_pids() {
    # Every process whose network namespace is this node's: the whole host (raylet, GCS, agents, workers).
    ip netns pids "$1" 2>/dev/null || true
}

make_bridge() {
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        return
    fi
    if ip -4 -o addr show | grep -q " $SUBNET\.[0-9]*/"; then
        die "subnet $SUBNET.0/24 is already used by another interface; set RAYAPP_CLUSTER_SUBNET"
    fi
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
}

make_host() {
    # A network namespace wired to the bridge by a veth pair, with the node's address and loopback up.
    # Its /etc/hosts (bind-mounted by `ip netns exec` from /etc/netns/<ns>/) resolves the machine's hostname
    # to the node's own address, as on a real host: gloo (torch.distributed on CPU) connects to that address.
    local node="$1" ip_addr="$2" ns
    ns="$(node_ns "$node")"
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s %s\n' "$ip_addr" "$(hostname)" > "/etc/netns/$ns/hosts"
    ip netns add "$ns"
    ip link add "$NAME-$node" type veth peer name "$NAME-$node-p"
    ip link set "$NAME-$node-p" netns "$ns"
    ip link set "$NAME-$node" master "$BRIDGE"
    ip link set "$NAME-$node" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set "$NAME-$node-p" name eth0
    ip netns exec "$ns" ip addr add "$ip_addr/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip route add default via "$SUBNET.1"
}

start_node() {
    # `ray start --block` inside the namespace, in its own session so its PID is also its process group.
    local node="$1" dir role_args ip_addr cpus
    dir="$STATE/nodes/$node"
    ip_addr="$(cat "$dir/ip")"
    cpus="$(cat "$dir/cpus")"
    if [[ "$node" == head ]]; then
        role_args=(--head "--port=$GCS_PORT" "--dashboard-host=$ip_addr" "--dashboard-port=$DASHBOARD_PORT"
                   --include-dashboard=true)
    else
        role_args=("--address=$(head_ip):$GCS_PORT")
    fi
    # PATH and VIRTUAL_ENV: a job's `python` (ray job submit -- python ...) is then the venv's.
    # RAY_ADDRESS: Ray code that looks for "the" cluster without an address (e.g. Ray Train's placement-group
    # cleaner) would otherwise also find other clusters' GCS processes in the process table namespaces share.
    setsid ip netns exec "$(node_ns "$node")" env \
        PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" RAY_ADDRESS="$(head_ip):$GCS_PORT" \
        RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_ENABLE_STATE_TRACKING=1 \
        HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false \
        "$VENV/bin/ray" start --block "${role_args[@]}" "--node-ip-address=$ip_addr" "--num-cpus=$cpus" \
        --num-gpus=0 "--object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024))" "--temp-dir=$dir/temp" \
        --disable-usage-stats >>"$dir/node.log" 2>&1 < /dev/null &
    echo "$!" > "$dir/pid"
}

new_node() {
    # A host for a node: its namespace, address and CPU count on record (node dir), Ray not started yet.
    local node="$1" ip_addr="$2" cpus="$3" dir
    dir="$STATE/nodes/$node"
    mkdir -p "$dir/temp"
    echo "$ip_addr" > "$dir/ip"
    echo "$cpus" > "$dir/cpus"
    make_host "$node" "$ip_addr"
}

alive_node_ips() {
    # Node IPs the head's GCS reports ALIVE (empty while the dashboard is not up yet).
    "$VENV/bin/python" - "http://$(head_ip):$DASHBOARD_PORT/api/v0/nodes?limit=1000" <<'PY' 2>/dev/null || true
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
    nodes = json.load(response)["data"]["result"]["result"]
print("\n".join(n["node_ip"] for n in nodes if n["state"] == "ALIVE"))
PY
}

FAILED_NODES=()

wait_for_nodes() {
    # Until every node given is ALIVE in Ray (returns 0), or one's `ray start` exited or TIMEOUT_S passed
    # (returns 1 with those nodes in FAILED_NODES).
    local deadline=$((SECONDS + TIMEOUT_S)) alive node
    while true; do
        alive="$(alive_node_ips)"
        FAILED_NODES=()
        local missing=()
        for node in "$@"; do
            grep -qx "$(node_ip "$node")" <<<"$alive" && continue
            missing+=("$node")
            kill -0 "$(cat "$STATE/nodes/$node/pid")" 2>/dev/null || FAILED_NODES+=("$node")
        done
        (( ${#missing[@]} == 0 )) && return 0
        if (( ${#FAILED_NODES[@]} )) || (( SECONDS >= deadline )); then
            (( ${#FAILED_NODES[@]} )) || FAILED_NODES=("${missing[@]}")
            return 1
        fi
        sleep 2
    done
}

start_nodes() {
    # Start the nodes' Ray and wait until they are alive; a node that fails to come up (e.g. "timed out during
    # startup" on an overloaded machine: Ray gives a raylet 30 s to register) is restarted once.
    local attempt node pending=("$@")
    for attempt in 1 2; do
        for node in "${pending[@]}"; do start_node "$node"; done
        wait_for_nodes "${pending[@]}" && return 0
        pending=("${FAILED_NODES[@]}")
        for node in "${pending[@]}"; do
            say "node $node did not come up (attempt $attempt); last lines of $STATE/nodes/$node/node.log:"
            tail -n 15 "$STATE/nodes/$node/node.log" >&2 || true
            kill -KILL -- "-$(cat "$STATE/nodes/$node/pid")" 2>/dev/null || true
            kill_namespace "$(node_ns "$node")"
        done
    done
    die "nodes ${pending[*]} did not come up; logs: $STATE/nodes/*/node.log"
}

next_worker() {
    # The next unused worker name (w1, w2, ...); a killed node's name is not reused.
    local k=1
    while [[ -e "$STATE/nodes/w$k" ]]; do k=$((k + 1)); done
    echo "w$k"
}

add_worker() {
    # Creates the next worker host (not started); prints its name.
    local node k
    node="$(next_worker)"
    k="${node#w}"
    (( k <= 200 )) || die "too many worker nodes"
    new_node "$node" "$SUBNET.$((10 + k))" "$WORKER_CPUS"
    echo "$node"
}

cmd_up() {
    check_prerequisites
    if [[ -e "$STATE/nodes/head" ]] && ip netns list | grep -q "^$(node_ns head)\b"; then
        die "cluster '$NAME' is already up ($STATE); '$0 down' first"
    fi
    cmd_down >/dev/null 2>&1 || true  # leftovers of an interrupted run
    mkdir -p "$STATE/nodes"
    make_bridge
    new_node head "$(head_ip)" "$HEAD_CPUS"
    start_nodes head
    local workers=() i
    for ((i = 0; i < WORKERS; i++)); do
        workers+=("$(add_worker)")
    done
    (( WORKERS == 0 )) || start_nodes "${workers[@]}"
    cmd_status
    echo
    echo "dashboard / job submission address: http://$(head_ip):$DASHBOARD_PORT"
    echo "GCS address (ray.init / serve run inside the head's namespace): $(head_ip):$GCS_PORT"
    echo "  ray job submit --address http://$(head_ip):$DASHBOARD_PORT --working-dir . -- python jobs/train_rm.py ..."
}

cmd_add_worker() {
    check_prerequisites
    [[ -e "$STATE/nodes/head" ]] || die "cluster '$NAME' is not up"
    local node
    node="$(add_worker)"
    start_nodes "$node"
    echo "$node $(node_ip "$node")"
}

kill_namespace() {
    # SIGKILL every process in the namespace until none is left (bounded: 10 rounds).
    local ns="$1" round pids
    for round in 1 2 3 4 5 6 7 8 9 10; do
        pids="$(namespace_pids "$ns")"
        [[ -z "$pids" ]] && return 0
        kill -KILL $pids 2>/dev/null || true
        sleep 0.5
    done
    say "processes left in $ns after 10 rounds: $(namespace_pids "$ns" | tr '\n' ' ')"
}

cmd_kill_node() {
    # A lost host: every process of the node dies at once (raylet, object store, workers), no clean shutdown.
    local node="${1:-}" ns pid
    [[ -n "$node" && -e "$STATE/nodes/$node" ]] || die "kill-node needs a node name from 'status', got '$node'"
    [[ "$node" != head ]] || die "kill-node refuses the head: the cluster would be gone"
    ns="$(node_ns "$node")"
    pid="$(cat "$STATE/nodes/$node/pid")"
    kill -KILL -- "-$pid" 2>/dev/null || true
    kill_namespace "$ns"
    touch "$STATE/nodes/$node/killed"
    echo "killed node $node ($(node_ip "$node"))"
}

stop_nodes() {
    # Clean stop: SIGTERM to every node's `ray start --block` (each stops its raylet / GCS), wait up to 20 s,
    # then SIGKILL whatever is left in each node's process group and namespace.
    local node pid deadline pids=()
    for node in "$@"; do
        pid="$(cat "$STATE/nodes/$node/pid" 2>/dev/null || true)"
        [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    deadline=$((SECONDS + 20))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
    done
    for node in "$@"; do
        pid="$(cat "$STATE/nodes/$node/pid" 2>/dev/null || true)"
        [[ -n "$pid" ]] && kill -KILL -- "-$pid" 2>/dev/null || true
        kill_namespace "$(node_ns "$node")"
    done
}

cmd_down() {
    # Idempotent: everything named after this cluster goes, whether `up` finished or not.
    local ns link nodes=()
    for node in $(node_names); do
        nodes+=("$node")
    done
    (( ${#nodes[@]} )) && stop_nodes "${nodes[@]}"
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NAME-" || true); do
        kill_namespace "$ns"
        ip netns delete "$ns" 2>/dev/null || true
    done
    rm -rf /etc/netns/"$NAME"-*
    rmdir /etc/netns 2>/dev/null || true  # only if nothing else is in it
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$NAME-" || true); do
        ip link delete "$link" 2>/dev/null || true
    done
    rm -rf "$STATE"
    echo "cluster '$NAME' is down"
}

cmd_status() {
    if [[ ! -d "$STATE/nodes" ]]; then
        echo "cluster '$NAME': not up"
        return 0
    fi
    local alive node state pid
    alive="$(alive_node_ips)"
    echo "cluster '$NAME' (state and logs: $STATE)"
    printf '  %-6s %-15s %-8s %s\n' node ip pid state
    for node in $(node_names); do
        pid="$(cat "$STATE/nodes/$node/pid" 2>/dev/null || echo -)"
        if [[ -e "$STATE/nodes/$node/killed" ]]; then
            state=killed
        elif grep -qx "$(node_ip "$node")" <<<"$alive"; then
            state=alive
        elif kill -0 "$pid" 2>/dev/null; then
            state=starting
        else
            state=down
        fi
        printf '  %-6s %-15s %-8s %s\n' "$node" "$(node_ip "$node")" "$pid" "$state"
    done
    echo "  dashboard: http://$(head_ip):$DASHBOARD_PORT"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    add-worker) cmd_add_worker ;;
    kill-node) cmd_kill_node "${2:-}" ;;
    *) echo "usage: $0 up|down|status|add-worker|kill-node NODE" >&2; exit 2 ;;
esac
