#!/usr/bin/env bash
# compare-qemu-nbd.sh: runs the same fio jobs (ioengine=nbd over a unix socket) against qemu-nbd
# serving a plain raw file and against cdp (appliance + splitter protecting a raw file of the same
# size in the same directory), and prints a table of both results and their ratio.
#
# usage: benches/compare-qemu-nbd.sh [--short] [--rounds N] [--dir DIR] [--cdp PATH] [--metrics] [--keep]
#   --short   small sizes and runtimes (CI): 256 MiB volume, 5 s random-write jobs, 1 round
#   --rounds  run every job N times per server (default 3; 1 with --short); the median counts
#   --dir     where the raw files live (default: a new directory under /tmp); both servers use
#             the same directory, so the same filesystem
#   --cdp     the cdp binary (default: target/release/cdp beside this script's repository)
#   --metrics also run a fourth server: cdp with metrics_listen on both processes, each scraped
#             every second for the whole run (GET /metrics), and print its ratio to plain cdp
#   --keep    keep the data directory and logs afterwards
#
# Three servers run side by side for the whole run: qemu-nbd, cdp protecting, and cdp in
# marking mode (its appliance killed, so the splitter only records dirty regions). Each job runs on qemu-nbd and on cdp back to
# back (which goes first alternates by round), each after `sync` and after cdp's distribution has
# caught up, so background writeback and machine noise fall on both alike. cdp's distribution
# lag before each run is printed: it is work the host's share paid for in the previous run.
# Jobs:
#   seqwrite-1M        1 MiB sequential writes over the whole volume, flush at the end (MiB/s)
#   randwrite-4k       4 KiB random writes, iodepth 16 (IOPS)
#   randwrite-4k-fsync 4 KiB random writes, iodepth 16, FLUSH every 64 writes (IOPS)
#   seqread-1M         1 MiB sequential reads of the whole volume (MiB/s)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SHORT=0 METRICS=0 DIR= CDP="${CARGO_TARGET_DIR:-$REPO/target}/release/cdp" KEEP=0 ROUNDS=
while [ $# -gt 0 ]; do
    case "$1" in
        --short) SHORT=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --dir) DIR=$2; shift ;;
        --cdp) CDP=$2; shift ;;
        --keep) KEEP=1 ;;
        --metrics) METRICS=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$SHORT" = 1 ]; then
    VOL_SIZE=$((256 << 20)) RUNTIME=5 ROUNDS=${ROUNDS:-1}
else
    VOL_SIZE=$((2 << 30)) RUNTIME=30 ROUNDS=${ROUNDS:-3}
fi

for tool in fio qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "compare-qemu-nbd: $tool is not installed" >&2; exit 1; }
done
[ -x "$CDP" ] || { echo "compare-qemu-nbd: $CDP not found; run: cargo build --release -p cdp" >&2; exit 1; }
fio --enghelp=nbd >/dev/null 2>&1 || { echo "compare-qemu-nbd: this fio lacks the nbd ioengine" >&2; exit 1; }

if [ -z "$DIR" ]; then
    DIR=$(mktemp -d /tmp/cdp-bench.XXXXXX)
else
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
fi
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$KEEP" = 1 ]; then
        echo "data and logs kept in $DIR"
    else
        rm -rf "$DIR"
    fi
}
trap cleanup EXIT

# Waits until a unix socket accepts a connection (or the process died, or 60 s passed).
wait_socket() {
    local sock=$1 pid=$2 log=$3
    python3 - "$sock" "$pid" <<'EOF' || { echo "server did not come up; log $log:" >&2; tail -n 40 "$log" >&2; exit 1; }
import os, socket, sys, time
sock, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
    finally:
        s.close()
sys.exit(1)
EOF
}

stop() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=()
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || kept+=("$p"); done
    PIDS=("${kept[@]+"${kept[@]}"}")
}


# job NAME -> fio arguments (the URI and output are added by run_job)
job_args() {
    case "$1" in
        seqwrite-1M) echo "--rw=write --bs=1M --iodepth=8 --size=$VOL_SIZE --end_fsync=1" ;;
        randwrite-4k) echo "--rw=randwrite --bs=4k --iodepth=16 --size=$VOL_SIZE --time_based --runtime=$RUNTIME --norandommap --randrepeat=0" ;;
        randwrite-4k-fsync) echo "--rw=randwrite --bs=4k --iodepth=16 --size=$VOL_SIZE --time_based --runtime=$RUNTIME --norandommap --randrepeat=0 --fsync=64" ;;
        seqread-1M) echo "--rw=read --bs=1M --iodepth=8 --size=$VOL_SIZE" ;;
    esac
}
JOBS=(seqwrite-1M randwrite-4k randwrite-4k-fsync seqread-1M)

# run_job SERVER URI JOB ROUND: one JSON result in $DIR/results/SERVER-JOB-ROUND.json
run_job() {
    local server=$1 uri=$2 job=$3 round=$4
    mkdir -p "$DIR/results"
    # shellcheck disable=SC2046
    fio --name="$job" --ioengine=nbd --uri="$uri" --numjobs=1 --group_reporting \
        --output-format=json --output="$DIR/results/$server-$job-$round.json" $(job_args "$job") \
        || { echo "fio $job against $server failed" >&2; exit 1; }
}

# Prints cdp's distribution lag, then waits until the replica has caught up with the journal
# (of each protecting cdp: the plain one, and with --metrics the scraped one).
cdp_settle() {
    cdp_settle_one "$C"
    if [ "$METRICS" = 1 ]; then cdp_settle_one "$S" >/dev/null; fi
}

cdp_settle_one() {
    local C=$1
    "$CDP" status --control "$C/appliance.ctl" --json | python3 -c '
import json, sys
g = json.load(sys.stdin)["groups"][0]
print("cdp lag %d records, journal %.1f MiB" % (g["lag_records"], g["journal_bytes"] / 2**20))'
    local deadline=$((SECONDS + 900))
    until "$CDP" status --control "$C/appliance.ctl" --json | python3 -c '
import json, sys
g = json.load(sys.stdin)["groups"][0]
sys.exit(0 if g["distributed_seq"] == g["last_seq"] else 1)'; do
        [ $SECONDS -lt $deadline ] || { echo "cdp distribution did not catch up" >&2; exit 1; }
        sleep 0.2
    done
}

echo "compare-qemu-nbd: $( [ "$SHORT" = 1 ] && echo short || echo full ) run in $DIR, volume $((VOL_SIZE >> 20)) MiB, $ROUNDS round(s)"
echo "fio: $(fio --version)"
echo "qemu-nbd: $(qemu-nbd --version | head -n 1)"
echo "cdp: $CDP ($("$CDP" --version 2>/dev/null | head -n 1 || true))"
echo "host: $(nproc) cores, $(uname -r)"

# --- qemu-nbd ---------------------------------------------------------------------------------
mkdir -p "$DIR/qemu"
truncate -s "$VOL_SIZE" "$DIR/qemu/vol0.img"
qemu-nbd --persistent --shared=16 --cache=writeback -f raw -x vol0 -k "$DIR/qemu/nbd.sock" \
    "$DIR/qemu/vol0.img" >"$DIR/qemu/qemu-nbd.log" 2>&1 &
QPID=$!
PIDS+=("$QPID")
wait_socket "$DIR/qemu/nbd.sock" "$QPID" "$DIR/qemu/qemu-nbd.log"

# --- cdp --------------------------------------------------------------------------------------
# start_cdp DIR: appliance + splitter protecting DIR/production/vol0.img; sets APID and SPID.
start_cdp() {
    local C=$1 metrics=${2:-} appliance_metrics= splitter_metrics=
    # A second argument "A,S": metrics_listen on 127.0.0.1:A (appliance) and :S (splitter).
    if [ -n "$metrics" ]; then
        appliance_metrics="metrics_listen = \"127.0.0.1:${metrics%,*}\""
        splitter_metrics="metrics_listen = \"127.0.0.1:${metrics#*,}\""
    fi
    mkdir -p "$C/production" "$C/replica" "$C/appliance"
    truncate -s "$VOL_SIZE" "$C/production/vol0.img"
    cat >"$C/appliance.toml" <<EOF
data_dir = "$C/appliance"
link_listen = "unix:$C/link.sock"
control = "$C/appliance.ctl"
$appliance_metrics

[[group]]
name = "default"

[[group.volume]]
name = "vol0"
size = $VOL_SIZE
replica = "$C/replica/vol0.img"
EOF
    cat >"$C/splitter.toml" <<EOF
appliance = "unix:$C/link.sock"
nbd_unix = "$C/nbd.sock"
$splitter_metrics
control = "$C/splitter.ctl"
handshake_timeout_s = 60

[[volume]]
name = "vol0"
path = "$C/production/vol0.img"
EOF
    CDP_LOG=${CDP_LOG:-warn} "$CDP" appliance --config "$C/appliance.toml" >"$C/appliance.log" 2>&1 &
    APID=$!
    PIDS+=("$APID")
    wait_socket "$C/appliance.ctl" "$APID" "$C/appliance.log"
    CDP_LOG=${CDP_LOG:-warn} "$CDP" splitter --config "$C/splitter.toml" >"$C/splitter.log" 2>&1 &
    SPID=$!
    PIDS+=("$SPID")
    wait_socket "$C/nbd.sock" "$SPID" "$C/splitter.log"
}

C="$DIR/cdp"
start_cdp "$C"
CAPID=$APID CSPID=$SPID

# The same, with its appliance killed: the splitter serves in marking mode (dirty bitmap only).
M="$DIR/cdp-marking"
start_cdp "$M"
MSPID=$SPID
kill -KILL "$APID"
wait "$APID" 2>/dev/null || true
until "$CDP" status --control "$C/appliance.ctl" --splitter-control "$M/splitter.ctl" --json \
    | python3 -c 'import json,sys; v=json.load(sys.stdin)["splitter"]["volumes"][0]; sys.exit(0 if v["state"]=="marking" else 1)'; do
    sleep 0.1
done

# With --metrics: the same as cdp, with both metrics listeners on and scraped every second.
SERVERS="qemu-nbd cdp cdp-marking"
if [ "$METRICS" = 1 ]; then
    command -v curl >/dev/null || { echo "compare-qemu-nbd: --metrics needs curl" >&2; exit 1; }
    free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    MPORTS="$(free_port),$(free_port)"
    S="$DIR/cdp-metrics"
    start_cdp "$S" "$MPORTS"
    SAPID=$APID SSPID=$SPID
    ( while sleep 1; do
          curl -sf "http://127.0.0.1:${MPORTS%,*}/metrics" >/dev/null || echo "appliance scrape failed" >&2
          curl -sf "http://127.0.0.1:${MPORTS#*,}/metrics" >/dev/null || echo "splitter scrape failed" >&2
      done ) &
    SCRAPER=$!
    PIDS+=("$SCRAPER")
    SERVERS="$SERVERS cdp-metrics"
fi
SURI="nbd+unix:///vol0?socket=$DIR/cdp-metrics/nbd.sock"

# --- the jobs, interleaved ----------------------------------------------------------------------
QURI="nbd+unix:///vol0?socket=$DIR/qemu/nbd.sock"
CURI="nbd+unix:///vol0?socket=$C/nbd.sock"
MURI="nbd+unix:///vol0?socket=$M/nbd.sock"
for round in $(seq 1 "$ROUNDS"); do
    for job in "${JOBS[@]}"; do
        # Rotate the servers' order by round, so none always runs first or last.
        read -r -a all <<<"$SERVERS"
        shift_by=$(( (round - 1) % ${#all[@]} ))
        order="${all[*]:shift_by} ${all[*]:0:shift_by}"
        for server in $order; do
            sync
            echo "  round $round $job on $server ($(cdp_settle))"
            case $server in
                cdp) uri=$CURI ;;
                cdp-marking) uri=$MURI ;;
                cdp-metrics) uri=$SURI ;;
                *) uri=$QURI ;;
            esac
            run_job "$server" "$uri" "$job" "$round"
        done
    done
done
echo "  after the last job: $(cdp_settle)"
stop "$CSPID"
stop "$CAPID"
stop "$MSPID"
if [ "$METRICS" = 1 ]; then stop "$SCRAPER"; stop "$SSPID"; stop "$SAPID"; fi
stop "$QPID"

# --- table ------------------------------------------------------------------------------------
python3 - "$DIR/results" "$ROUNDS" "$METRICS" "${JOBS[@]}" <<'EOF'
import json, os, statistics, sys
results, rounds, metrics, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]

def one(server, job, r):
    with open(os.path.join(results, "%s-%s-%d.json" % (server, job, r))) as f:
        j = json.load(f)["jobs"][0]
    d = j["read"] if "read" in job else j["write"]
    if "randwrite" in job:
        return d["iops"]
    return d["bw"] / 1024.0   # fio reports bw in KiB/s

def unit(job):
    return "IOPS" if "randwrite" in job else "MiB/s"

print()
print("median of %d round(s); per-round ratios in brackets" % rounds)
print("%-20s %-6s %10s %10s %9s  %12s %9s  %s" % ("job", "unit", "qemu-nbd", "cdp", "cdp/qemu", "cdp-marking", "mark/qemu", "cdp/qemu by round"))
for job in jobs:
    q = [one("qemu-nbd", job, r) for r in range(1, rounds + 1)]
    c = [one("cdp", job, r) for r in range(1, rounds + 1)]
    m = [one("cdp-marking", job, r) for r in range(1, rounds + 1)]
    qm, cm, mm = statistics.median(q), statistics.median(c), statistics.median(m)
    per_round = " ".join("%.2f" % (cv / qv) if qv else "nan" for qv, cv in zip(q, c))
    ratio = lambda x: x / qm if qm else float("nan")
    print("%-20s %-6s %10.1f %10.1f %9.2f  %12.1f %9.2f  [%s]" % (job, unit(job), qm, cm, ratio(cm), mm, ratio(mm), per_round))
if metrics:
    print()
    print("metrics on and scraped every second against off (goal >= 0.98)")
    print("%-20s %-6s %10s %12s %9s  %s" % ("job", "unit", "cdp", "cdp-metrics", "on/off", "by round"))
    for job in jobs:
        c = [one("cdp", job, r) for r in range(1, rounds + 1)]
        s = [one("cdp-metrics", job, r) for r in range(1, rounds + 1)]
        cm, sm = statistics.median(c), statistics.median(s)
        per_round = " ".join("%.2f" % (sv / cv) if cv else "nan" for cv, sv in zip(c, s))
        print("%-20s %-6s %10.1f %12.1f %9.2f  [%s]" % (job, unit(job), cm, sm, sm / cm if cm else float("nan"), per_round))
EOF
