#!/usr/bin/env bash
# compare-qemu-nbd.sh: runs the same fio jobs (ioengine=nbd over a unix socket) against qemu-nbd
# serving a plain raw file and against cdp (appliance + splitter protecting a raw file of the same
# size in the same directory), and prints a table of both results and their ratio.
#
# usage: benches/compare-qemu-nbd.sh [--short] [--dir DIR] [--cdp PATH] [--keep]
#   --short   small sizes and runtimes (CI): 256 MiB volume, 5 s random-write jobs
#   --dir     where the raw files live (default: a new directory under /tmp); both servers use
#             the same directory, so the same filesystem
#   --cdp     the cdp binary (default: target/release/cdp beside this script's repository)
#   --keep    keep the data directory and logs afterwards
#
# Jobs (in this order, each server starting from a fresh sparse file):
#   seqwrite-1M        1 MiB sequential writes over the whole volume, flush at the end (MiB/s)
#   randwrite-4k       4 KiB random writes, iodepth 16 (IOPS)
#   randwrite-4k-fsync 4 KiB random writes, iodepth 16, FLUSH every 64 writes (IOPS)
#   seqread-1M         1 MiB sequential reads of the whole volume (MiB/s)
# cdp's distribution to the replica runs behind the host and is not waited for between jobs;
# its lag after each job is printed, because it is part of what the host's share pays for.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SHORT=0 DIR= CDP="$REPO/target/release/cdp" KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --short) SHORT=1 ;;
        --dir) DIR=$2; shift ;;
        --cdp) CDP=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$SHORT" = 1 ]; then
    VOL_SIZE=$((256 << 20)) RUNTIME=5
else
    VOL_SIZE=$((2 << 30)) RUNTIME=30
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

# job NAME -> fio arguments (the URI and output are added by run_jobs)
job_args() {
    case "$1" in
        seqwrite-1M) echo "--rw=write --bs=1M --iodepth=8 --size=$VOL_SIZE --end_fsync=1" ;;
        randwrite-4k) echo "--rw=randwrite --bs=4k --iodepth=16 --size=$VOL_SIZE --time_based --runtime=$RUNTIME --norandommap --randrepeat=0" ;;
        randwrite-4k-fsync) echo "--rw=randwrite --bs=4k --iodepth=16 --size=$VOL_SIZE --time_based --runtime=$RUNTIME --norandommap --randrepeat=0 --fsync=64" ;;
        seqread-1M) echo "--rw=read --bs=1M --iodepth=8 --size=$VOL_SIZE" ;;
    esac
}
JOBS=(seqwrite-1M randwrite-4k randwrite-4k-fsync seqread-1M)

# run_jobs SERVER URI [STATUS_CMD...]: one JSON result per job in $DIR/results/SERVER-JOB.json
run_jobs() {
    local server=$1 uri=$2; shift 2
    local job
    mkdir -p "$DIR/results"
    for job in "${JOBS[@]}"; do
        # shellcheck disable=SC2046
        fio --name="$job" --ioengine=nbd --uri="$uri" --numjobs=1 --group_reporting \
            --output-format=json --output="$DIR/results/$server-$job.json" $(job_args "$job") \
            || { echo "fio $job against $server failed" >&2; exit 1; }
        if [ $# -gt 0 ]; then
            echo "  $server $job done; $("$@" 2>/dev/null | python3 -c '
import json, sys
try:
    g = json.load(sys.stdin)["groups"][0]
    print("distribution lag %d records, journal %.1f MiB" % (g["lag_records"], g["journal_bytes"] / 2**20))
except Exception as e:
    print("status unavailable (%s)" % e)
')"
        else
            echo "  $server $job done"
        fi
    done
}

echo "compare-qemu-nbd: $( [ "$SHORT" = 1 ] && echo short || echo full ) run in $DIR, volume $((VOL_SIZE >> 20)) MiB"
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
run_jobs qemu-nbd "nbd+unix:///vol0?socket=$DIR/qemu/nbd.sock"
stop "$QPID"
rm -f "$DIR/qemu/vol0.img"

# --- cdp --------------------------------------------------------------------------------------
C="$DIR/cdp"
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
cat >"$C/splitter.toml" <<EOF
appliance = "unix:$C/link.sock"
nbd_unix = "$C/nbd.sock"
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
run_jobs cdp "nbd+unix:///vol0?socket=$C/nbd.sock" "$CDP" status --control "$C/appliance.ctl" --json
stop "$SPID"
stop "$APID"

# --- table ------------------------------------------------------------------------------------
python3 - "$DIR/results" "${JOBS[@]}" <<'EOF'
import json, os, sys
results, jobs = sys.argv[1], sys.argv[2:]

def metric(server, job):
    with open(os.path.join(results, "%s-%s.json" % (server, job))) as f:
        j = json.load(f)["jobs"][0]
    d = j["read"] if "read" in job else j["write"]
    if "randwrite" in job:
        return d["iops"], "IOPS"
    return d["bw"] / 1024.0, "MiB/s"   # fio reports bw in KiB/s

print()
print("%-20s %-6s %12s %12s %10s" % ("job", "unit", "qemu-nbd", "cdp", "cdp/qemu"))
for job in jobs:
    q, unit = metric("qemu-nbd", job)
    c, _ = metric("cdp", job)
    ratio = c / q if q else float("nan")
    print("%-20s %-6s %12.1f %12.1f %10.2f" % (job, unit, q, c, ratio))
EOF
