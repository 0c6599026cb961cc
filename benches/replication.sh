#!/usr/bin/env bash
# replication.sh: what remote replication costs the host. Runs the same fio jobs (ioengine=nbd
# over the splitter's unix socket) against four cdp sites side by side, in one run:
#   local      appliance + splitter, no remote copy
#   async      the same, shipping to a second appliance on loopback, mode = "async"
#   sync       the same, mode = "sync" (a host write is acknowledged once the remote has it)
#   sync+lat   sync, with DELAY ms of round trip added on the replication link
# and prints each figure with its ratio to local.
#
# usage: benches/replication.sh [--short] [--rounds N] [--dir DIR] [--cdp PATH] [--proxy PATH]
#                               [--rtt-ms MS] [--plaintext] [--keep]
#   --short   small sizes and runtimes (CI): 256 MiB volume, 5 s random-write jobs, 1 round
#   --rounds  run every job N times per site (default 3; 1 with --short); the median counts
#   --dir     where the sites live (default: a new directory under /tmp)
#   --cdp     the cdp binary (default: $CARGO_TARGET_DIR or target, release/cdp)
#   --proxy   the delay proxy (default: release/examples/delay_proxy beside the cdp binary;
#             build it with: cargo build --release --example delay_proxy)
#   --rtt-ms  round trip added for sync+lat (default 5)
#   --plaintext  replication links without TLS (default: mutual TLS, certificates made with
#             `cdp tls ca` / `cdp tls issue` in the run's directory)
#   --keep    keep the data directory and logs afterwards
#
# Latency: as root, the sync+lat remote appliance runs in its own network namespace behind a
# veth pair with `tc qdisc ... netem delay RTT/2` on both ends. Kernels without netem
# (CONFIG_NET_SCH_NETEM unset: "Specified qdisc kind is unknown") get a userspace forwarder
# instead (examples/delay_proxy.rs: every chunk is delayed RTT/2 in each direction, in order
# and without stop-and-wait, so only latency is added); the output says which one ran.
#
# Every job runs on the four sites back to back, the order rotating by round, each after
# `sync` and after every site has settled (local distribution, shipping and the remote's
# distribution caught up), so background work and machine noise fall on all alike.
# Jobs:
#   seqwrite-1M          1 MiB sequential writes over the whole volume, QD8, flush at the end (MiB/s)
#   randwrite-4k-qd16    4 KiB random writes, QD16, FLUSH every 64 writes (IOPS)
#   write-4k-qd1-flush   4 KiB random writes, QD1, FLUSH after each (IOPS): latency-bound, so
#                        the added round trip must show in sync+lat (checked: "sanity")
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SHORT=0 DIR= KEEP=0 ROUNDS= RTT_MS=5 PLAINTEXT=0
CDP="${CARGO_TARGET_DIR:-$REPO/target}/release/cdp"
PROXY=
while [ $# -gt 0 ]; do
    case "$1" in
        --short) SHORT=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --dir) DIR=$2; shift ;;
        --cdp) CDP=$2; shift ;;
        --proxy) PROXY=$2; shift ;;
        --rtt-ms) RTT_MS=$2; shift ;;
        --plaintext) PLAINTEXT=1 ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
PROXY=${PROXY:-$(dirname "$CDP")/examples/delay_proxy}

if [ "$SHORT" = 1 ]; then
    VOL_SIZE=$((256 << 20)) RUNTIME=5 ROUNDS=${ROUNDS:-1}
else
    VOL_SIZE=$((1 << 30)) RUNTIME=20 ROUNDS=${ROUNDS:-3}
fi
DELAY_US=$((RTT_MS * 1000 / 2))

for tool in fio python3; do
    command -v "$tool" >/dev/null || { echo "replication: $tool is not installed" >&2; exit 1; }
done
[ -x "$CDP" ] || { echo "replication: $CDP not found; run: cargo build --release -p cdp" >&2; exit 1; }
fio --enghelp=nbd >/dev/null 2>&1 || { echo "replication: this fio lacks the nbd ioengine" >&2; exit 1; }

if [ -z "$DIR" ]; then
    DIR=$(mktemp -d /tmp/cdp-repl-bench.XXXXXX)
else
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
fi
PIDS=()
NETNS=
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # Deleting the namespace deletes its veth end, and with it the pair.
    [ -z "$NETNS" ] || ip netns del "$NETNS" 2>/dev/null || true
    if [ "$KEEP" = 1 ]; then
        echo "data and logs kept in $DIR"
    else
        rm -rf "$DIR"
    fi
}
trap cleanup EXIT

# wait_ready KIND ADDRESS PID LOG: waits until a unix socket (KIND unix) or a TCP address
# (KIND tcp, HOST:PORT) accepts a connection, or the process died, or 60 s passed.
wait_ready() {
    local kind=$1 addr=$2 pid=$3 log=$4
    python3 - "$kind" "$addr" "$pid" <<'EOF' || { echo "process did not come up; log $log:" >&2; tail -n 40 "$log" >&2; exit 1; }
import os, socket, sys, time
kind, addr, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    if kind == "unix":
        s, target = socket.socket(socket.AF_UNIX), addr
    else:
        host, port = addr.rsplit(":", 1)
        s, target = socket.socket(socket.AF_INET), (host, int(port))
    try:
        s.connect(target)
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
    finally:
        s.close()
sys.exit(1)
EOF
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=()
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || kept+=("$p"); done
    PIDS=("${kept[@]+"${kept[@]}"}")
}

# The replication links' security lines: REMOTE_SECURITY for the receivers, SOURCE_SECURITY
# for the shippers' [group.remote].
NETEM_ADDR=10.231.77.2
if [ "$PLAINTEXT" = 1 ]; then
    REMOTE_SECURITY="replication_plaintext = true" SOURCE_SECURITY="plaintext = true"
    SECURITY="plaintext"
else
    "$CDP" tls ca --out "$DIR/pki/ca" >/dev/null
    "$CDP" tls issue --ca "$DIR/pki/ca" --name remote --ip 127.0.0.1 --ip "$NETEM_ADDR" --out "$DIR/pki/remote" >/dev/null
    "$CDP" tls issue --ca "$DIR/pki/ca" --name source --out "$DIR/pki/source" >/dev/null
    pem() { echo "{ ca = \"$DIR/pki/$1/ca.pem\", cert = \"$DIR/pki/$1/cert.pem\", key = \"$DIR/pki/$1/key.pem\" }"; }
    REMOTE_SECURITY="replication_tls = $(pem remote)" SOURCE_SECURITY="tls = $(pem source)"
    SECURITY="mutual TLS"
fi

# start_remote DIR LISTEN [NETNS]: the remote appliance holding group default's remote copy.
start_remote() {
    local R=$1 listen=$2 ns=${3:-}
    mkdir -p "$R/replica" "$R/appliance"
    cat >"$R/appliance.toml" <<EOF
data_dir = "$R/appliance"
link_listen = "unix:$R/link.sock"
control = "$R/appliance.ctl"
replication_listen = "$listen"
$REMOTE_SECURITY

[[group]]
name = "default"
source = "remote"

[[group.volume]]
name = "vol0"
size = $VOL_SIZE
replica = "$R/replica/vol0.img"
EOF
    if [ -n "$ns" ]; then
        # `ip netns exec` execs the command, so $! is the appliance itself.
        CDP_LOG=${CDP_LOG:-warn} ip netns exec "$ns" "$CDP" appliance --config "$R/appliance.toml" >"$R/appliance.log" 2>&1 &
    else
        CDP_LOG=${CDP_LOG:-warn} "$CDP" appliance --config "$R/appliance.toml" >"$R/appliance.log" 2>&1 &
    fi
    PIDS+=("$!")
    wait_ready unix "$R/appliance.ctl" "$!" "$R/appliance.log"
}

# start_site DIR [ENDPOINT MODE]: appliance + splitter protecting DIR/production/vol0.img,
# shipping to ENDPOINT in MODE when given.
start_site() {
    local C=$1 endpoint=${2:-} mode=${3:-}
    mkdir -p "$C/production" "$C/replica" "$C/appliance"
    truncate -s "$VOL_SIZE" "$C/production/vol0.img"
    cat >"$C/appliance.toml" <<EOF
data_dir = "$C/appliance"
link_listen = "unix:$C/link.sock"
control = "$C/appliance.ctl"

[[group]]
name = "default"

[[group.volume]]
name = "vol0"
size = $VOL_SIZE
replica = "$C/replica/vol0.img"
EOF
    if [ -n "$endpoint" ]; then
        cat >>"$C/appliance.toml" <<EOF

[group.remote]
endpoint = "$endpoint"
mode = "$mode"
rpo_s = 30
$SOURCE_SECURITY
EOF
    fi
    cat >"$C/splitter.toml" <<EOF
appliance = "unix:$C/link.sock"
nbd_unix = "$C/nbd.sock"
control = "$C/splitter.ctl"
handshake_timeout_s = 60

[[volume]]
name = "vol0"
path = "$C/production/vol0.img"
EOF
    CDP_LOG=${CDP_LOG:-warn} "$CDP" appliance --config "$C/appliance.toml" >"$C/appliance.log" 2>&1 &
    PIDS+=("$!")
    wait_ready unix "$C/appliance.ctl" "$!" "$C/appliance.log"
    CDP_LOG=${CDP_LOG:-warn} "$CDP" splitter --config "$C/splitter.toml" >"$C/splitter.log" 2>&1 &
    PIDS+=("$!")
    wait_ready unix "$C/nbd.sock" "$!" "$C/splitter.log"
}

# Tries netem in a namespace of our own; on success sets NETNS (the remote's address there is
# NETEM_ADDR). Not in a subshell: cleanup must see NETNS.
try_netem() {
    [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v tc >/dev/null || return 1
    local ns=cdpbench-$$ host=cdpb$$h peer=cdpb$$p
    ip netns add "$ns" 2>/dev/null || return 1
    NETNS=$ns
    if ip link add "$host" type veth peer name "$peer" 2>/dev/null &&
        ip link set "$peer" netns "$ns" &&
        ip addr add 10.231.77.1/30 dev "$host" && ip link set "$host" up &&
        ip netns exec "$ns" ip addr add "$NETEM_ADDR/30" dev "$peer" &&
        ip netns exec "$ns" ip link set "$peer" up &&
        ip netns exec "$ns" ip link set lo up &&
        tc qdisc add dev "$host" root netem delay "${DELAY_US}us" 2>"$DIR/netem.err" &&
        ip netns exec "$ns" tc qdisc add dev "$peer" root netem delay "${DELAY_US}us" 2>>"$DIR/netem.err"; then
        return 0
    fi
    ip netns del "$ns" 2>/dev/null || true
    NETNS=
    return 1
}

echo "replication: $( [ "$SHORT" = 1 ] && echo short || echo full ) run in $DIR, volume $((VOL_SIZE >> 20)) MiB, $ROUNDS round(s), sync+lat adds ${RTT_MS} ms round trip"
echo "fio: $(fio --version)"
echo "cdp: $CDP"
echo "host: $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg) (a shared machine: compare ratios, not absolute figures)"

SETUPS=(local async sync sync+lat)
dir_of() { echo "$DIR/${1/+/-}"; }

start_site "$(dir_of local)"

port=$(free_port)
start_remote "$(dir_of async)-remote" "127.0.0.1:$port"
start_site "$(dir_of async)" "127.0.0.1:$port" async

port=$(free_port)
start_remote "$(dir_of sync)-remote" "127.0.0.1:$port"
start_site "$(dir_of sync)" "127.0.0.1:$port" sync

L=$(dir_of sync+lat)
if try_netem; then
    start_remote "$L-remote" "$NETEM_ADDR:7701" "$NETNS"
    start_site "$L" "$NETEM_ADDR:7701" sync
    LATENCY="netem: delay ${DELAY_US} us on both ends of a veth pair into namespace $NETNS"
else
    [ -x "$PROXY" ] || { echo "replication: netem unavailable and $PROXY not found; run: cargo build --release --example delay_proxy" >&2; exit 1; }
    why=$(head -n 1 "$DIR/netem.err" 2>/dev/null || true)
    port=$(free_port)
    start_remote "$L-remote" "127.0.0.1:$port"
    pport=$(free_port)
    "$PROXY" "127.0.0.1:$pport" "127.0.0.1:$port" "$DELAY_US" >"$L-proxy.log" 2>&1 &
    PIDS+=("$!")
    wait_ready tcp "127.0.0.1:$pport" "$!" "$L-proxy.log"
    start_site "$L" "127.0.0.1:$pport" sync
    LATENCY="userspace delay proxy (examples/delay_proxy.rs), ${DELAY_US} us each way: netem is unavailable here${why:+ ($why)}"
fi
echo "latency: $LATENCY"
echo "replication links: $SECURITY"

# Control sockets of every appliance, for settle: SITE:REMOTE (REMOTE empty for local).
CONTROLS=()
for s in "${SETUPS[@]}"; do
    d=$(dir_of "$s")
    if [ "$s" = local ]; then CONTROLS+=("$d/appliance.ctl:"); else CONTROLS+=("$d/appliance.ctl:$d-remote/appliance.ctl"); fi
done

# Waits until every site distributed its journal, shipped it, and every remote distributed
# it; prints what was outstanding when called.
settle() {
    python3 - "$CDP" "${CONTROLS[@]}" <<'EOF'
import json, subprocess, sys, time
cdp, pairs = sys.argv[1], [p.split(":", 1) for p in sys.argv[2:]]
def status(ctl):
    out = subprocess.run([cdp, "status", "--control", ctl, "--json"], check=True, capture_output=True).stdout
    return json.loads(out)["groups"][0]
def outstanding():
    left = []
    for site, remote in pairs:
        g = status(site)
        left.append(g["last_seq"] - g["distributed_seq"])
        if remote:
            r = g["remote"]
            left.append(g["last_seq"] - r["shipped_seq"])
            rg = status(remote)
            left.append(rg["last_seq"] - rg["distributed_seq"])
    return left
first = outstanding()
deadline = time.monotonic() + 900
while any(outstanding()):
    if time.monotonic() > deadline:
        sys.exit("settle: not caught up after 900 s")
    time.sleep(0.2)
print("outstanding records before: %d" % sum(first))
EOF
}

job_args() {
    case "$1" in
        seqwrite-1M) echo "--rw=write --bs=1M --iodepth=8 --size=$VOL_SIZE --end_fsync=1" ;;
        randwrite-4k-qd16) echo "--rw=randwrite --bs=4k --iodepth=16 --size=$VOL_SIZE --time_based --runtime=$RUNTIME --norandommap --randrepeat=0 --fsync=64" ;;
        write-4k-qd1-flush) echo "--rw=randwrite --bs=4k --iodepth=1 --size=$VOL_SIZE --time_based --runtime=$RUNTIME --norandommap --randrepeat=0 --fsync=1" ;;
    esac
}
JOBS=(seqwrite-1M randwrite-4k-qd16 write-4k-qd1-flush)

mkdir -p "$DIR/results"
for round in $(seq 1 "$ROUNDS"); do
    for job in "${JOBS[@]}"; do
        order=()
        for i in 0 1 2 3; do order+=("${SETUPS[$(((i + round - 1) % 4))]}"); done
        for s in "${order[@]}"; do
            sync
            echo "  round $round $job on $s ($(settle))"
            # shellcheck disable=SC2046
            fio --name="$job" --ioengine=nbd --uri="nbd+unix:///vol0?socket=$(dir_of "$s")/nbd.sock" \
                --numjobs=1 --group_reporting --output-format=json \
                --output="$DIR/results/${s/+/-}-$job-$round.json" $(job_args "$job") \
                || { echo "fio $job on $s failed" >&2; exit 1; }
        done
    done
done
echo "  after the last job: $(settle)"
ASYNC_LAG=$("$CDP" status --control "$(dir_of async)/appliance.ctl" --json | python3 -c '
import json, sys
r = json.load(sys.stdin)["groups"][0]["remote"]
print("async remote lag over the last %d s of the run: p99 %d ms, max %d ms" % (r["lag_window_s"], r["lag_p99_ms"], r["lag_max_ms"]))')
echo "$ASYNC_LAG"

# --- table ------------------------------------------------------------------------------------
python3 - "$DIR/results" "$ROUNDS" "$RTT_MS" "${JOBS[@]}" <<'EOF'
import json, os, statistics, sys
results, rounds, rtt_ms, jobs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
setups = ["local", "async", "sync", "sync-lat"]

def one(setup, job, r):
    with open(os.path.join(results, "%s-%s-%d.json" % (setup, job, r))) as f:
        d = json.load(f)["jobs"][0]["write"]
    return d["bw"] / 1024.0 if job.startswith("seq") else d["iops"]   # fio bw is KiB/s

def unit(job):
    return "MiB/s" if job.startswith("seq") else "IOPS"

print()
print("median of %d round(s); ratios to local, then per round async/local sync/local sync+lat/local" % rounds)
print("%-20s %-6s %9s %9s %9s %9s  %7s %7s %8s  %s" % ("job", "unit", "local", "async", "sync", "sync+lat", "async/l", "sync/l", "s+lat/l", "by round"))
med = {}
for job in jobs:
    v = {s: [one(s, job, r) for r in range(1, rounds + 1)] for s in setups}
    m = {s: statistics.median(v[s]) for s in setups}
    med[job] = m
    ratio = lambda s: m[s] / m["local"] if m["local"] else float("nan")
    per_round = " | ".join(
        " ".join("%.2f" % (v[s][r] / v["local"][r]) if v["local"][r] else "nan" for s in setups[1:])
        for r in range(rounds))
    print("%-20s %-6s %9.1f %9.1f %9.1f %9.1f  %7.2f %7.2f %8.2f  [%s]" % (
        job, unit(job), m["local"], m["async"], m["sync"], m["sync-lat"],
        ratio("async"), ratio("sync"), ratio("sync-lat"), per_round))

# Sanity: with one write and one FLUSH at a time, each write waits a full round trip in
# sync+lat, so its cycle must be at least ~the added RTT longer than sync's.
m = med["write-4k-qd1-flush"]
cycle = {s: 1000.0 / m[s] if m[s] else float("inf") for s in setups}
added = cycle["sync-lat"] - cycle["sync"]
ok = added >= 0.8 * rtt_ms
print()
print("write+flush cycle at QD1: local %.2f ms, async %.2f ms, sync %.2f ms, sync+lat %.2f ms" % (
    cycle["local"], cycle["async"], cycle["sync"], cycle["sync-lat"]))
def latencies(setup):
    """Median over rounds of the QD1 job's mean write and mean FLUSH latency, in ms."""
    w, f = [], []
    for r in range(1, rounds + 1):
        with open(os.path.join(results, "%s-write-4k-qd1-flush-%d.json" % (setup, r))) as fh:
            j = json.load(fh)["jobs"][0]
        w.append(j["write"]["clat_ns"]["mean"] / 1e6)
        f.append(j.get("sync", {}).get("lat_ns", {}).get("mean", 0.0) / 1e6)
    return statistics.median(w), statistics.median(f)
print("  of which write / FLUSH (mean): " + ", ".join(
    "%s %.2f / %.2f ms" % ((s,) + latencies(s)) for s in setups))
print("sanity: sync+lat adds %.2f ms per write+flush over sync for a %.1f ms round trip: %s" % (
    added, rtt_ms, "OK" if ok else "FAILED (the added latency does not show)"))
sys.exit(0 if ok else 1)
EOF
