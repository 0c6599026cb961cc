#!/usr/bin/python3
"""Host load and oracle for tests/link_campaign.rs: a libnbd client that survives its server
going away (it reconnects), and a checker for production, replica and bookmark images.

run:    write self-identifying 4 KiB units (up to --depth in flight, never two to one unit)
        over one libnbd connection, FLUSH every --flush-every writes, at most --rate writes
        per second. When the connection fails (a killed splitter) the in-flight writes are
        left unknown and the client reconnects until the stop file appears. Times are
        CLOCK_MONOTONIC nanoseconds, the clock the test stamps its bookmark requests with.
verify: check images against the log in one pass over it. Specs:
          final:PATH                    every flushed write (or a later write to its unit)
          point:NAME:T_REQ:T_RESP:PATH  every write acknowledged before T_REQ (or a later
                                        write issued before T_RESP) and nothing issued after
        Prints one JSON line per spec: {"spec", "units", "flushed", "checked", "lost", "bad",
        "errors": [...]}. Exit 0 if every spec holds.

Unit layout: bytes 0..24 are (MAGIC, write index, unit) little-endian u64s, the rest is
shake_256 of (seed, index), so a unit names the write it holds.

Log lines:  S <seed> <unit_size> <units>
            I <i> <unit> <t>   write i issued
            A <i> <t>          write i acknowledged
            F <t>              FLUSH acknowledged: every write acknowledged before it is durable
            E <t> <error>      the connection failed; writes in flight are unknown
            C <t>              reconnected
            X <issued>         stopped by the stop file
"""
import argparse
import hashlib
import json
import os
import random
import struct
import sys
import time
from array import array

MAGIC = 0x6364_7063_616D_7031  # "cdpcamp1"


def unit_bytes(seed, i, unit, size):
    head = struct.pack("<QQQ", MAGIC, i, unit)
    return head + hashlib.shake_256(b"cdp-campaign:%d:%d" % (seed, i)).digest(size - len(head))


def now():
    return time.monotonic_ns()


def cmd_run(a):
    import nbd

    rng = random.Random(a.seed)
    log = open(a.log, "w")
    log.write("S %d %d %d\n" % (a.seed, a.unit_size, a.units))
    log.flush()
    depth = max(1, min(a.depth, a.units // 2))
    issued = 0
    started = time.monotonic()

    def connect():
        while True:
            if os.path.exists(a.stop):
                return None
            try:
                h = nbd.NBD()
                h.connect_uri(a.uri)
                return h
            except nbd.Error:
                # The splitter is restarting: the socket comes back within the test's deadline.
                time.sleep(0.05)

    h = connect()
    while h is not None:
        inflight = {}  # cookie -> (i, unit, buffer)
        busy = set()

        def reap(wait):
            if wait and inflight:
                h.poll(-1)
            for c in [c for c in inflight if h.aio_command_completed(c)]:
                i, unit, _ = inflight.pop(c)
                busy.discard(unit)
                log.write("A %d %d\n" % (i, now()))

        try:
            while True:
                if os.path.exists(a.stop):
                    while inflight:
                        reap(True)
                    log.write("X %d\n" % issued)
                    log.close()
                    return 0
                if a.rate > 0:
                    # Pacing, not a wait for a condition: keeps the journal small on long runs.
                    ahead = issued / a.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(min(ahead, 0.1))
                        continue
                while len(inflight) < depth:
                    unit = rng.randrange(a.units)
                    while unit in busy:
                        unit = rng.randrange(a.units)
                    i = issued
                    buf = nbd.Buffer.from_bytearray(
                        bytearray(unit_bytes(a.seed, i, unit, a.unit_size)))
                    # Stamped before it can reach the server; logged only once libnbd queued
                    # it (a dead connection raises here, and write i is then issued anew on
                    # the next connection).
                    t = now()
                    cookie = h.aio_pwrite(buf, unit * a.unit_size)
                    log.write("I %d %d %d\n" % (i, unit, t))
                    inflight[cookie] = (i, unit, buf)
                    busy.add(unit)
                    issued += 1
                    if issued % a.flush_every == 0:
                        # A FLUSH covers the writes completed before it: drain, then flush.
                        while inflight:
                            reap(True)
                        h.flush()
                        log.write("F %d\n" % now())
                        log.flush()
                        break
                reap(True)
        except nbd.Error as e:
            log.write("E %d %s\n" % (now(), str(e).replace("\n", " ")))
            log.flush()
            try:
                h.close()
            except Exception:
                pass
            h = connect()
            if h is not None:
                log.write("C %d\n" % now())
    log.write("X %d\n" % issued)
    log.close()
    return 0


def parse_log(path):
    units_of = array("q")
    issued_at = array("q")
    acked_at = array("q")
    durable = bytearray()
    header = None
    pending = []  # acknowledged since the last FLUSH on this connection
    with open(path) as f:
        for line in f:
            p = line.split()
            if not p:
                continue
            k = p[0]
            if k == "I" and len(p) == 4:
                i = int(p[1])
                if i != len(units_of):
                    raise SystemExit("log %s: write %d out of order" % (path, i))
                units_of.append(int(p[2]))
                issued_at.append(int(p[3]))
                acked_at.append(-1)
                durable.append(0)
            elif k == "A" and len(p) == 3:
                i = int(p[1])
                acked_at[i] = int(p[2])
                pending.append(i)
            elif k == "F":
                for i in pending:
                    durable[i] = 1
                pending = []
            elif k == "E":
                # A FLUSH on the next connection does not cover these.
                pending = []
            elif k == "S":
                header = tuple(int(x) for x in p[1:4])
    if header is None:
        raise SystemExit("log %s has no header" % path)
    return header, units_of, issued_at, acked_at, durable


def check(spec, header, units_of, issued_at, acked_at, durable):
    seed, size, units = header
    kind, rest = spec.split(":", 1)
    if kind == "final":
        path, name, t_req, t_resp = rest, "final", None, None
    else:
        name, t_req, t_resp, path = rest.split(":", 3)
        t_req, t_resp = int(t_req), int(t_resp)
    # base[u]: the newest write unit u must hold at least (-1: none).
    base = [-1] * units
    flushed = 0
    for i in range(len(units_of)):
        if t_req is None:
            if durable[i]:
                base[units_of[i]] = i
                flushed += 1
        elif 0 <= acked_at[i] < t_req:
            base[units_of[i]] = i
            flushed += 1
    image = open(path, "rb").read()
    errors = []
    lost = bad = checked = 0
    if len(image) < units * size:
        errors.append("%s is %d bytes, less than %d units" % (path, len(image), units))
        units = len(image) // size
    zero = bytes(size)
    for u in range(units):
        got = image[u * size:(u + 1) * size]
        b = base[u]
        if b >= 0:
            checked += 1
        if got == zero:
            if b >= 0:
                lost += 1
                errors.append("unit %d: zeroes, but write %d was due" % (u, b))
            continue
        magic, i, unit = struct.unpack_from("<QQQ", got)
        valid = (magic == MAGIC and unit == u and i < len(units_of) and units_of[i] == u
                 and got == unit_bytes(seed, i, u, size))
        if not valid:
            bad += 1
            errors.append("unit %d: bytes no write produced" % u)
        elif i < b:
            lost += 1
            errors.append("unit %d: holds write %d, older than write %d that was due" % (u, i, b))
        elif t_resp is not None and issued_at[i] >= t_resp:
            bad += 1
            errors.append("unit %d: holds write %d, issued after the point was taken" % (u, i))
    return {"spec": name, "path": path, "units": units, "flushed": flushed, "checked": checked,
            "lost": lost, "bad": bad, "errors": errors[:20]}


def cmd_verify(a):
    parsed = parse_log(a.log)
    ok = True
    for spec in a.specs:
        r = check(spec, *parsed)
        ok = ok and r["lost"] == 0 and r["bad"] == 0 and not r["errors"]
        print(json.dumps(r), flush=True)
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("uri")
    r.add_argument("log")
    r.add_argument("stop")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--unit-size", type=int, default=4096)
    r.add_argument("--units", type=int, default=4096)
    r.add_argument("--flush-every", type=int, default=16)
    r.add_argument("--depth", type=int, default=8)
    r.add_argument("--rate", type=float, default=0)
    v = sub.add_parser("verify")
    v.add_argument("log")
    v.add_argument("specs", nargs="+")
    a = p.parse_args()
    return cmd_run(a) if a.cmd == "run" else cmd_verify(a)


if __name__ == "__main__":
    sys.exit(main())
