#!/usr/bin/python3
"""Seeded write workload with periodic flushes for tests/crash.rs, and its oracle.

run:    write seeded 4 KiB blocks over one libnbd connection (up to --depth in flight, never two
        to one block), FLUSH every N writes, some writes with FUA; log to a file which writes were issued and which are durable (fsync'd after
        every acknowledged FLUSH/FUA). Stops when the stop file exists, or when the server
        goes away (a killed splitter: expected, logged as "E").
verify: check an image against the log: for every block, the image must hold the newest
        durable write to it or a write issued after that one (never anything older, never
        bytes nobody wrote); blocks never durably written may also hold the baseline.

Log lines:  S <seed> <block_size> <blocks> <region_offset>   (header)
            I <i> <block>    write i to block was issued (not yet acknowledged)
            U <i>            FUA write i acknowledged: durable
            F <i>            FLUSH acknowledged: writes 0..=i durable
            E <i> <error>    the connection failed after i issued writes
            X <i>            stopped by the stop file after i issued writes
"""
import argparse
import hashlib
import os
import random
import sys


def content(seed, i, size):
    return hashlib.shake_256(b"cdp-crash:%d:%d" % (seed, i)).digest(size)


def cmd_run(a):
    import nbd

    h = nbd.NBD()
    h.connect_uri(a.uri)
    rng = random.Random(a.seed)
    log = open(a.log, "w")

    def durable(line):
        log.write(line + "\n")
        log.flush()
        os.fsync(log.fileno())

    durable("S %d %d %d %d" % (a.seed, a.block_size, a.blocks, a.region_offset))
    # Up to `depth` writes in flight, never two to the same block: per block the writes stay
    # ordered, which keeps the oracle exact.
    depth = max(1, min(a.depth, a.blocks // 2))
    inflight = {}   # cookie -> (i, block, fua, buffer)
    busy = set()
    issued = 0

    def reap(block_until_one):
        while True:
            if block_until_one and inflight:
                h.poll(-1)
            done = [c for c in list(inflight) if h.aio_command_completed(c)]
            for c in done:
                i, block, fua, _ = inflight.pop(c)
                busy.discard(block)
                if fua:
                    durable("U %d" % i)
            if done or not block_until_one or not inflight:
                return

    try:
        while True:
            if os.path.exists(a.stop):
                durable("X %d" % issued)
                return 0
            while len(inflight) < depth:
                block = rng.randrange(a.blocks)
                while block in busy:
                    block = rng.randrange(a.blocks)
                fua = a.fua_every > 0 and rng.randrange(a.fua_every) == 0
                i = issued
                log.write("I %d %d\n" % (i, block))
                log.flush()
                buf = nbd.Buffer.from_bytearray(bytearray(content(a.seed, i, a.block_size)))
                cookie = h.aio_pwrite(buf, a.region_offset + block * a.block_size,
                                      flags=nbd.CMD_FLAG_FUA if fua else 0)
                inflight[cookie] = (i, block, fua, buf)
                busy.add(block)
                issued += 1
                if issued % a.flush_every == 0:
                    # FLUSH covers every write completed before it: drain, then flush.
                    while inflight:
                        reap(True)
                    h.flush()
                    durable("F %d" % (issued - 1))
                    break
            reap(True)
    except nbd.Error as e:
        durable("E %d %s" % (issued, str(e).replace("\n", " ")))
        return 0


def cmd_verify(a):
    writes = []          # (i, block) in issue order
    durable = set()      # FUA-acknowledged write indices
    flushed = -1         # writes 0..=flushed are durable
    header = None
    with open(a.log) as f:
        for line in f:
            p = line.split()
            if not p or (p[0] != "S" and header is None):
                continue
            if p[0] == "S":
                header = tuple(int(x) for x in p[1:5])
            elif p[0] == "I" and len(p) == 3:
                writes.append((int(p[1]), int(p[2])))
            elif p[0] == "U":
                durable.add(int(p[1]))
            elif p[0] == "F":
                flushed = max(flushed, int(p[1]))
    if header is None:
        print("verify: log %s has no header" % a.log)
        return 2
    seed, bs, blocks, region = header
    per_block = {}
    for i, b in writes:
        per_block.setdefault(b, []).append(i)

    image = open(a.image, "rb").read()
    base = open(a.baseline, "rb").read()
    if len(image) != len(base):
        print("verify: %s is %d bytes, baseline %d" % (a.image, len(image), len(base)))
        return 1
    errors = []
    # Outside the workload's region nothing may change.
    end = region + blocks * bs
    if image[:region] != base[:region] or image[end:] != base[end:]:
        errors.append("bytes outside the workload region [%d, %d) changed" % (region, end))
    lost = 0
    for b in range(blocks):
        off = region + b * bs
        got = image[off:off + bs]
        idx = per_block.get(b, [])
        newest_durable = None
        for i in idx:
            if i <= flushed or i in durable:
                newest_durable = i
        allowed = [i for i in idx if newest_durable is None or i >= newest_durable]
        if any(got == content(seed, i, bs) for i in allowed):
            continue
        if newest_durable is None and got == base[off:off + bs]:
            continue
        older = [i for i in idx if i not in allowed and got == content(seed, i, bs)]
        if newest_durable is not None:
            lost += 1
        what = ("an older write %d" % older[-1]) if older else (
            "the baseline" if got == base[off:off + bs] else "bytes no write produced")
        errors.append("block %d (offset %d): holds %s; writes %s, newest durable %s"
                      % (b, off, what, idx[-8:], newest_durable))
    print("verify %s: %d writes issued, flushed through %d, %d FUA, %d bad blocks (%d lost durable)"
          % (a.image, len(writes), flushed, len(durable), len(errors), lost))
    for e in errors[:20]:
        print("  " + e)
    return 1 if errors else 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("uri")
    r.add_argument("log")
    r.add_argument("stop")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--block-size", type=int, default=4096)
    r.add_argument("--blocks", type=int, default=2048)
    r.add_argument("--region-offset", type=int, default=0)
    r.add_argument("--flush-every", type=int, default=16)
    r.add_argument("--fua-every", type=int, default=0)
    r.add_argument("--depth", type=int, default=1)
    v = sub.add_parser("verify")
    v.add_argument("log")
    v.add_argument("image")
    v.add_argument("baseline")
    a = p.parse_args()
    return cmd_run(a) if a.cmd == "run" else cmd_verify(a)


if __name__ == "__main__":
    sys.exit(main())
