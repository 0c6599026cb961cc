#!/usr/bin/env bash
# compare-qemu-nbd.sh: runs the same fio jobs (ioengine=nbd over a unix socket) against qemu-nbd
# serving a plain raw file and against cdp (appliance + splitter protecting a raw file of the same
# size in the same directory), and prints a table of both results and their ratio.
#
# usage: benches/compare-qemu-nbd.sh [--short] [--heartbeats | --metrics] [--rounds N] [--dir DIR] [--cdp PATH] [--keep]
#   --short   small sizes and runtimes (CI): 256 MiB volume, 5 s random-write jobs, 1 round
#   --heartbeats  instead of qemu-nbd: what the split link's heartbeats cost the host. Three
#             cdp sites side by side with link_deadline_ms (at both ends) 5000 (the default: a
#             heartbeat every 1.25 s each way), 200 (the minimum: every 50 ms) and 600000 (the
#             maximum: every 150 s, effectively off), each job on all three at once; write
#             jobs only, ratios against "off" (goal: >= 0.99); 256 MiB volume, 8 s runs (3 with
#             --short), 7 rounds (2 with --short)
#   --metrics instead of qemu-nbd: what metrics cost the host. Two cdp sites side by side, one
#             with metrics_listen on both processes, each scraped once a second (as Prometheus
#             would), one without; write jobs on both at once, ratio on/off (goal: >= 0.98);
#             sizes and rounds as --heartbeats
#   --rounds  run every job N times per server (default 3; 1 with --short); the median counts
#   --dir     where the raw files live (default: a new directory under /tmp); both servers use
#             the same directory, so the same filesystem
#   --cdp     the cdp binary (default: target/release/cdp beside this script's repository)
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
SHORT=0 HEARTBEATS=0 METRICS=0 ROUNDS_GIVEN= DIR= CDP="${CARGO_TARGET_DIR:-$REPO/target}/release/cdp" KEEP=0 ROUNDS=
while [ $# -gt 0 ]; do
    case "$1" in
        --short) SHORT=1 ;;
        --heartbeats) HEARTBEATS=1 ;;
        --metrics) METRICS=1 ;;
        --rounds) ROUNDS=$2 ROUNDS_GIVEN=1; shift ;;
        --dir) DIR=$2; shift ;;
        --cdp) CDP=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$SHORT" = 1 ]; then
    VOL_SIZE=$((256 << 20)) RUNTIME=5 ROUNDS=${ROUNDS:-1}
else
    VOL_SIZE=$((2 << 30)) RUNTIME=30 ROUNDS=${ROUNDS:-3}
fi
if [ "$HEARTBEATS" = 1 ] || [ "$METRICS" = 1 ]; then
    # Many short paired runs: the ratio sought (1 %) is far below a shared machine's
    # run-to-run noise, so what counts is the median of ratios of runs next to each other.
    # A small volume: three sites' data must fit a shared disk.
    VOL_SIZE=$((256 << 20))
    if [ "$SHORT" = 1 ]; then RUNTIME=3; else RUNTIME=8; fi
    if [ -z "$ROUNDS_GIVEN" ]; then
        if [ "$SHORT" = 1 ]; then ROUNDS=2; else ROUNDS=7; fi
    fi
fi

TOOLS="fio python3"
[ "$HEARTBEATS" = 1 ] || [ "$METRICS" = 1 ] || TOOLS="$TOOLS qemu-nbd"
for tool in $TOOLS; do
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
        # The same for a fixed time (over and over the volume), for runs side by side.
        seqwrite-1M-timed) echo "--rw=write --bs=1M --iodepth=8 --size=$VOL_SIZE --time_based --runtime=$RUNTIME --end_fsync=1" ;;
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

# cdp_settle [DIR]: prints the distribution lag of the cdp site in DIR (default $C), then waits
# until its replica has caught up with the journal.
cdp_settle() {
    local C=${1:-$C}
    "$CDP" status --control "$C/appliance.ctl" --json | python3 -c '
import json, sys
g = json.load(sys.stdin)["groups"][0]
print("cdp lag %d records, journal %.1f MiB" % (g["lag_records"], g["journal_bytes"] / 2**20))'
    local deadline=$((SECONDS + 900)) rc
    while :; do
        rc=0
        "$CDP" status --control "$C/appliance.ctl" --json | python3 -c '
import json, sys
g = json.load(sys.stdin)["groups"][0]
if g.get("failure"):
    print("cdp group fenced: %s" % g["failure"], file=sys.stderr)
    sys.exit(3)
sys.exit(0 if g["distributed_seq"] == g["last_seq"] else 1)' || rc=$?
        [ "$rc" != 0 ] || break
        # A fenced group (a full disk, say) never catches up: stop at once.
        [ "$rc" != 3 ] || exit 1
        [ $SECONDS -lt $deadline ] || { echo "cdp distribution did not catch up" >&2; exit 1; }
        sleep 0.2
    done
}

echo "compare-qemu-nbd: $( [ "$SHORT" = 1 ] && echo short || echo full )$( [ "$HEARTBEATS" = 1 ] && echo ' heartbeats' || true )$( [ "$METRICS" = 1 ] && echo ' metrics' || true ) run in $DIR, volume $((VOL_SIZE >> 20)) MiB, $ROUNDS round(s)"
echo "fio: $(fio --version)"
[ "$HEARTBEATS" = 1 ] || echo "qemu-nbd: $(qemu-nbd --version | head -n 1)"
echo "cdp: $CDP ($("$CDP" --version 2>/dev/null | head -n 1 || true))"
echo "host: $(nproc) cores, $(uname -r)"

# --- cdp --------------------------------------------------------------------------------------
# start_cdp DIR [TOP_LEVEL [GROUP_KEYS [APPLIANCE_TOP [SPLITTER_TOP]]]]: appliance + splitter
# protecting DIR/production/vol0.img, with TOP_LEVEL (whole `key = value` lines) at the top of
# both configs, GROUP_KEYS in the appliance's group, APPLIANCE_TOP at the top of the
# appliance's and SPLITTER_TOP at the top of the splitter's; sets APID and SPID.
start_cdp() {
    local C=$1 top=${2:-} group_keys=${3:-} appliance_top=${4:-} splitter_top=${5:-}
    mkdir -p "$C/production" "$C/replica" "$C/appliance"
    truncate -s "$VOL_SIZE" "$C/production/vol0.img"
    cat >"$C/appliance.toml" <<EOF
$top
$appliance_top
data_dir = "$C/appliance"
link_listen = "unix:$C/link.sock"
control = "$C/appliance.ctl"

[[group]]
name = "default"
$group_keys

[[group.volume]]
name = "vol0"
size = $VOL_SIZE
replica = "$C/replica/vol0.img"
EOF
    cat >"$C/splitter.toml" <<EOF
$top
$splitter_top
appliance = "unix:$C/link.sock"
nbd_unix = "$C/nbd.sock"
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

# --- heartbeat cost (--heartbeats) -------------------------------------------------------------
if [ "$HEARTBEATS" = 1 ]; then
    JOBS=(seqwrite-1M-timed randwrite-4k randwrite-4k-fsync)
    SERVERS=(hb-off hb-default hb-min)
    declare -A DEADLINE=([hb-off]=600000 [hb-default]=5000 [hb-min]=200)
    HB_PIDS=()
    declare -A SITE_PIDS=()
    # cpu_ns SERVER: CPU time (ns, every thread) its appliance and splitter have used so far.
    cpu_ns() {
        python3 - ${SITE_PIDS[$1]} <<'PY'
import glob, sys
print(sum(int(open(f).read().split()[0]) for pid in sys.argv[1:]
          for f in glob.glob("/proc/%s/task/*/schedstat" % pid)))
PY
    }
    for server in "${SERVERS[@]}"; do
        # A small journal (64 MiB segments, 128 MiB kept): three sites' histories must fit a
        # shared disk (or /dev/shm, --dir).
        start_cdp "$DIR/$server" "link_deadline_ms = ${DEADLINE[$server]}" \
            "journal_capacity_bytes = $((128 << 20))" "journal_segment_bytes = $((64 << 20))"
        HB_PIDS+=("$SPID" "$APID")
        SITE_PIDS[$server]="$SPID $APID"
    done
    mkdir -p "$DIR/results"
    # Throughput differences of 1 % drown in a shared machine's noise; CPU time does not. What
    # the heartbeats cost is the CPU the sites use while idle, beyond "off"; what a write costs
    # is the CPU a site uses per write during randwrite-4k. Idle first: all three at once.
    IDLE_S=$([ "$SHORT" = 1 ] && echo 5 || echo 30)
    for s in "${SERVERS[@]}"; do cdp_settle "$DIR/$s" >/dev/null; done
    declare -A CPU0=()
    for s in "${SERVERS[@]}"; do CPU0[$s]=$(cpu_ns "$s"); done
    echo "  idle for $IDLE_S s, measuring CPU time"
    sleep "$IDLE_S"
    for s in "${SERVERS[@]}"; do echo "$(( $(cpu_ns "$s") - ${CPU0[$s]} )) $IDLE_S" >"$DIR/results/$s-idle-cpu"; done
    for round in $(seq 1 "$ROUNDS"); do
        for job in "${JOBS[@]}"; do
            # The three at once, for the same time: load from elsewhere on a shared machine
            # then falls on all of them alike, and a difference in their own cost shows as a
            # difference in their share (run one after another, the noise is ±50 % here).
            sync
            lags=""
            for s in "${SERVERS[@]}"; do lags="$lags $s: $(cdp_settle "$DIR/$s");"; done
            echo "  round $round $job on all three at once (${lags% ;})"
            FIO_PIDS=()
            for server in "${SERVERS[@]}"; do
                CPU0[$server]=$(cpu_ns "$server")
                run_job "$server" "nbd+unix:///vol0?socket=$DIR/$server/nbd.sock" "$job" "$round" &
                FIO_PIDS+=("$!")
            done
            for pid in "${FIO_PIDS[@]}"; do wait "$pid"; done
            for server in "${SERVERS[@]}"; do
                echo "$(( $(cpu_ns "$server") - ${CPU0[$server]} ))" >"$DIR/results/$server-$job-$round.cpu"
            done
        done
    done
    for pid in "${HB_PIDS[@]}"; do stop "$pid"; done
    python3 - "$DIR/results" "$ROUNDS" "${JOBS[@]}" <<'PY'
import json, os, statistics, sys
results, rounds, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def one(server, job, r):
    with open(os.path.join(results, "%s-%s-%d.json" % (server, job, r))) as f:
        d = json.load(f)["jobs"][0]["write"]
    return d["iops"] if "randwrite" in job else d["bw"] / 1024.0

print()
print("heartbeat cost: host write throughput against heartbeats effectively off")
print("(link_deadline_ms 600000); median of %d round(s) and of the per-round ratios; goal >= 0.99" % rounds)
print("%-20s %-6s %10s %10s %9s %10s %9s  %s" % ("job", "unit", "off", "default", "def/off", "min", "min/off", "default/off by round"))
for job in jobs:
    runs = {s: [one(s, job, r) for r in range(1, rounds + 1)] for s in ("hb-off", "hb-default", "hb-min")}
    med = {s: statistics.median(v) for s, v in runs.items()}
    ratio = lambda s: statistics.median([x / o for x, o in zip(runs[s], runs["hb-off"]) if o])
    per_round = " ".join("%.3f" % (x / o) for x, o in zip(runs["hb-default"], runs["hb-off"]) if o)
    print("%-20s %-6s %10.1f %10.1f %9.3f %10.1f %9.3f  [%s]" % (
        job, "IOPS" if "randwrite" in job else "MiB/s", med["hb-off"], med["hb-default"],
        ratio("hb-default"), med["hb-min"], ratio("hb-min"), per_round))

# CPU: idle cost per second, and the CPU one 4 KiB write costs a site (median over rounds).
def idle_us_per_s(server):
    ns, secs = open(os.path.join(results, "%s-idle-cpu" % server)).read().split()
    return int(ns) / 1000.0 / int(secs)

def write_us(server):
    per = []
    for r in range(1, rounds + 1):
        base = os.path.join(results, "%s-randwrite-4k-%d" % (server, r))
        ios = json.load(open(base + ".json"))["jobs"][0]["write"]["total_ios"]
        per.append(int(open(base + ".cpu").read()) / 1000.0 / ios)
    return statistics.median(per)

off_idle = idle_us_per_s("hb-off")
w = statistics.median(write_us(s) for s in ("hb-off", "hb-default", "hb-min"))
iops = statistics.median(one(s, "randwrite-4k", r) for s in ("hb-off", "hb-default", "hb-min")
                         for r in range(1, rounds + 1))
print()
print("CPU time of appliance + splitter: idle (µs per s) and per 4 KiB write (randwrite-4k, µs)")
print("%-11s %10s %12s %16s %14s" % ("site", "idle µs/s", "beyond off", "= writes/s of", "ratio bound"))
for s, name in (("hb-off", "off"), ("hb-default", "default"), ("hb-min", "min")):
    extra = idle_us_per_s(s) - off_idle
    writes = extra / w if w else float("nan")
    # Heartbeats take what `writes` writes per second would; at the measured IOPS that is
    # their share of the host's throughput.
    print("%-11s %10.1f %12.1f %16.2f %14.5f" % (name, idle_us_per_s(s), extra, writes, 1 - max(writes, 0) / iops))
print("(a 4 KiB write costs %.1f µs of cdp CPU; median randwrite-4k %.0f IOPS)" % (w, iops))
PY
    exit 0
fi

# --- metrics cost (--metrics) -----------------------------------------------------------------
if [ "$METRICS" = 1 ]; then
    JOBS=(seqwrite-1M-timed randwrite-4k randwrite-4k-fsync)
    SERVERS=(metrics-off metrics-on)
    SMALL_JOURNAL=("journal_capacity_bytes = $((128 << 20))" "journal_segment_bytes = $((64 << 20))")
    start_cdp "$DIR/metrics-off" "" "${SMALL_JOURNAL[0]}
${SMALL_JOURNAL[1]}"
    M_PIDS=("$SPID" "$APID")
    APORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    SPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    start_cdp "$DIR/metrics-on" "" "${SMALL_JOURNAL[0]}
${SMALL_JOURNAL[1]}" "metrics_listen = \"127.0.0.1:$APORT\"" "metrics_listen = \"127.0.0.1:$SPORT\""
    M_PIDS+=("$SPID" "$APID")
    # The scraper: both endpoints once a second, each answer checked to be an exposition.
    python3 - "$APORT" "$SPORT" "$DIR/scrapes" <<'PY' &
import sys, time, urllib.request
ports, out = sys.argv[1:3], sys.argv[3]
n = 0
while True:
    for port in ports:
        try:
            body = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % port, timeout=5).read()
            if b"cdp_build_info" in body:
                n += 1
        except OSError:
            pass
    open(out, "w").write(str(n))
    time.sleep(1)
PY
    SCRAPER=$!
    PIDS+=("$SCRAPER")
    mkdir -p "$DIR/results"
    for round in $(seq 1 "$ROUNDS"); do
        for job in "${JOBS[@]}"; do
            sync
            lags=""
            for s in "${SERVERS[@]}"; do lags="$lags $s: $(cdp_settle "$DIR/$s");"; done
            echo "  round $round $job on both at once (${lags% ;})"
            FIO_PIDS=()
            for server in "${SERVERS[@]}"; do
                run_job "$server" "nbd+unix:///vol0?socket=$DIR/$server/nbd.sock" "$job" "$round" &
                FIO_PIDS+=("$!")
            done
            for pid in "${FIO_PIDS[@]}"; do wait "$pid"; done
        done
    done
    stop "$SCRAPER"
    for pid in "${M_PIDS[@]}"; do stop "$pid"; done
    echo "  scrapes answered: $(cat "$DIR/scrapes" 2>/dev/null || echo 0)"
    python3 - "$DIR/results" "$ROUNDS" "${JOBS[@]}" <<'PY'
import json, os, statistics, sys
results, rounds, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def one(server, job, r):
    with open(os.path.join(results, "%s-%s-%d.json" % (server, job, r))) as f:
        d = json.load(f)["jobs"][0]["write"]
    return d["iops"] if "randwrite" in job else d["bw"] / 1024.0

print()
print("metrics cost: host write throughput with metrics served and scraped every second against")
print("metrics off; median of %d round(s) and of the per-round ratios; goal >= 0.98" % rounds)
print("%-20s %-6s %10s %10s %9s  %s" % ("job", "unit", "off", "on", "on/off", "on/off by round"))
for job in jobs:
    off = [one("metrics-off", job, r) for r in range(1, rounds + 1)]
    on = [one("metrics-on", job, r) for r in range(1, rounds + 1)]
    ratios = [x / o for x, o in zip(on, off) if o]
    print("%-20s %-6s %10.1f %10.1f %9.3f  [%s]" % (
        job, "IOPS" if "randwrite" in job else "MiB/s", statistics.median(off),
        statistics.median(on), statistics.median(ratios), " ".join("%.3f" % x for x in ratios)))
PY
    exit 0
fi

# --- qemu-nbd ---------------------------------------------------------------------------------
mkdir -p "$DIR/qemu"
truncate -s "$VOL_SIZE" "$DIR/qemu/vol0.img"
qemu-nbd --persistent --shared=16 --cache=writeback -f raw -x vol0 -k "$DIR/qemu/nbd.sock" \
    "$DIR/qemu/vol0.img" >"$DIR/qemu/qemu-nbd.log" 2>&1 &
QPID=$!
PIDS+=("$QPID")
wait_socket "$DIR/qemu/nbd.sock" "$QPID" "$DIR/qemu/qemu-nbd.log"

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

# --- the jobs, interleaved ----------------------------------------------------------------------
QURI="nbd+unix:///vol0?socket=$DIR/qemu/nbd.sock"
CURI="nbd+unix:///vol0?socket=$C/nbd.sock"
MURI="nbd+unix:///vol0?socket=$M/nbd.sock"
for round in $(seq 1 "$ROUNDS"); do
    for job in "${JOBS[@]}"; do
        case $((round % 3)) in
            1) order="qemu-nbd cdp cdp-marking" ;;
            2) order="cdp cdp-marking qemu-nbd" ;;
            0) order="cdp-marking qemu-nbd cdp" ;;
        esac
        for server in $order; do
            sync
            echo "  round $round $job on $server ($(cdp_settle))"
            case $server in
                cdp) uri=$CURI ;;
                cdp-marking) uri=$MURI ;;
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
stop "$QPID"

# --- table ------------------------------------------------------------------------------------
python3 - "$DIR/results" "$ROUNDS" "${JOBS[@]}" <<'EOF'
import json, os, statistics, sys
results, rounds, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

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
EOF
