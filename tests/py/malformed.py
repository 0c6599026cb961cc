#!/usr/bin/python3
"""Raw-socket NBD client for tests/malformed.rs: speaks the fixed-newstyle handshake and simple
replies by hand, so that it can send what no well-behaved client sends.

usage: malformed.py CASE SOCKET EXPORT MODEL_FILE

MODEL_FILE holds what the export must contain; valid reads are checked against it. "fill" writes
MODEL_FILE to the export (then FLUSH); every other CASE sends one class of bad input, checks the
server's answer, and exits 0 on the expected behaviour or 1 with a message.
"""
import os
import socket
import struct
import sys
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_UNKNOWN = REP_ERR + 6

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
FLAG_FUA, FLAG_NO_HOLE = 1, 2
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = 1, 5, 12, 22, 28, 75, 95
MAX_REQUEST = 32 << 20
TIMEOUT = 30


class Fail(Exception):
    pass


class Closed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


class Conn:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(TIMEOUT)
        self.s.connect(path)
        self.cookie = 1
        self.size = None
        self.flags = None

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.s.recv(min(n - len(buf), 1 << 20))
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Closed(str(e))
            if not chunk:
                raise Closed("EOF after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def send(self, data):
        try:
            self.s.sendall(data)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise Closed(str(e))

    def greeting(self):
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        check(magic == NBDMAGIC, "bad NBDMAGIC %#x" % magic)
        check(opt == IHAVEOPT, "server is not newstyle (%#x)" % opt)
        check(hflags & 1, "server lacks FIXED_NEWSTYLE (flags %#x)" % hflags)
        self.no_zeroes = bool(hflags & 2)
        self.send(struct.pack(">I", 1 | (2 if self.no_zeroes else 0)))

    def option(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self, opt):
        magic, ropt, rtype, rlen = struct.unpack(">QIII", self.recv_exact(20))
        check(magic == REPLY_MAGIC, "bad option reply magic %#x" % magic)
        check(ropt == opt, "option reply for %d, expected %d" % (ropt, opt))
        return rtype, self.recv_exact(rlen)

    def go(self, name, expect_ok=True):
        n = name.encode()
        self.option(OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
        while True:
            rtype, data = self.option_reply(OPT_GO)
            if rtype == REP_INFO:
                info = struct.unpack(">H", data[:2])[0]
                if info == 0:
                    self.size, self.flags = struct.unpack(">QH", data[2:12])
            elif rtype == REP_ACK:
                check(expect_ok, "GO %r succeeded but should have failed" % name)
                check(self.size is not None, "GO succeeded without NBD_INFO_EXPORT")
                return rtype
            elif rtype & REP_ERR:
                check(not expect_ok, "GO %r failed: reply %#x %r" % (name, rtype, data))
                return rtype
            else:
                raise Fail("unexpected GO reply type %#x" % rtype)

    def handshake(self, name):
        self.greeting()
        self.go(name)

    def request(self, cmd, offset, length, flags=0, payload=b""):
        cookie = self.cookie
        self.cookie += 1
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload)
        return cookie

    def reply(self, cookie, read_len=0):
        """Returns (error, data). A structured reply is a protocol violation: none was negotiated."""
        magic, err, rcookie = struct.unpack(">IIQ", self.recv_exact(16))
        check(magic != STRUCTURED_REPLY_MAGIC, "structured reply without negotiation")
        check(magic == SIMPLE_REPLY_MAGIC, "bad reply magic %#x" % magic)
        check(rcookie == cookie, "reply cookie %d, expected %d" % (rcookie, cookie))
        data = self.recv_exact(read_len) if err == 0 and read_len else b""
        return err, data

    def expect_closed(self, what):
        """The server must close the connection (EOF or reset) and send no success reply."""
        deadline = time.monotonic() + TIMEOUT
        got = b""
        while time.monotonic() < deadline:
            try:
                chunk = self.s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return
            except socket.timeout:
                break
            if not chunk:
                # Anything the server said before closing must not be a success reply.
                if len(got) >= 16:
                    magic, err, _ = struct.unpack(">IIQ", got[:16])
                    check(not (magic == SIMPLE_REPLY_MAGIC and err == 0),
                          "%s: server replied success before closing" % what)
                return
            got += chunk
        raise Fail("%s: server did not close the connection within %ds" % (what, TIMEOUT))

    def disconnect(self):
        self.request(CMD_DISC, 0, 0)
        self.s.close()


def model_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def valid_read(c, model, offset=0, length=65536):
    cookie = c.request(CMD_READ, offset, length)
    err, data = c.reply(cookie, length)
    check(err == 0, "valid read at %d failed with error %d" % (offset, err))
    check(data == model[offset:offset + length], "valid read at %d returned wrong data" % offset)


def expect_error(c, what, allowed, cmd, offset, length, flags=0, payload=b""):
    cookie = c.request(cmd, offset, length, flags, payload)
    err, _ = c.reply(cookie, length if cmd == CMD_READ else 0)
    check(err != 0, "%s: the server reported success" % what)
    check(err in allowed, "%s: error %d, expected one of %s" % (what, err, sorted(allowed)))
    print("%s: error %d as expected" % (what, err))


def case_fill(sock, export, model):
    c = Conn(sock)
    c.handshake(export)
    check(c.size == len(model), "export size %d, model %d" % (c.size, len(model)))
    chunk = 1 << 20
    for off in range(0, len(model), chunk):
        data = model[off:off + chunk]
        err, _ = c.reply(c.request(CMD_WRITE, off, len(data), 0, data))
        check(err == 0, "fill write at %d failed: %d" % (off, err))
    err, _ = c.reply(c.request(CMD_FLUSH, 0, 0))
    check(err == 0, "fill flush failed: %d" % err)
    c.disconnect()


def case_probe(sock, export, model):
    c = Conn(sock)
    c.handshake(export)
    check(c.size == len(model), "export size %d, model %d" % (c.size, len(model)))
    valid_read(c, model, 0, len(model))
    c.disconnect()


def case_out_of_range(sock, export, model):
    c = Conn(sock)
    c.handshake(export)
    size = c.size
    bad = {EINVAL, ENOSPC}
    expect_error(c, "read past the end", bad, CMD_READ, size - 512, 4096)
    expect_error(c, "read starting at the end", bad, CMD_READ, size, 512)
    expect_error(c, "write past the end", bad, CMD_WRITE, size - 512, 4096, 0, b"\xee" * 4096)
    expect_error(c, "write far past the end", bad, CMD_WRITE, size * 4, 512, FLAG_FUA, b"\xee" * 512)
    expect_error(c, "trim past the end", bad, CMD_TRIM, size - 4096, 8192)
    expect_error(c, "write zeroes past the end", bad, CMD_WRITE_ZEROES, size - 4096, 8192)
    expect_error(c, "read with offset+length overflowing 64 bits", bad, CMD_READ,
                 (1 << 64) - 4096, 8192)
    expect_error(c, "write with offset+length overflowing 64 bits", bad, CMD_WRITE,
                 (1 << 64) - 512, 1024, 0, b"\xee" * 1024)
    valid_read(c, model, 0)
    valid_read(c, model, size - 65536)
    c.disconnect()


def case_unknown_command(sock, export, model):
    c = Conn(sock)
    c.handshake(export)
    expect_error(c, "unknown command 0x42", {EINVAL, ENOTSUP}, 0x42, 0, 0)
    expect_error(c, "unknown command 0xffff", {EINVAL, ENOTSUP}, 0xFFFF, 4096, 4096)
    valid_read(c, model, 0)
    c.disconnect()


def case_unknown_flag(sock, export, model):
    c = Conn(sock)
    c.handshake(export)
    expect_error(c, "read with unknown flag 0x200", {EINVAL}, CMD_READ, 0, 4096, 0x200)
    expect_error(c, "write with unknown flag 0x8000", {EINVAL}, CMD_WRITE, 0, 4096, 0x8000,
                 b"\xee" * 4096)
    # NO_HOLE only means something on WRITE_ZEROES; FAST_ZERO (0x10) was not negotiated away but
    # DF (0x4) needs structured replies, which the server refuses.
    expect_error(c, "read with DF but no structured replies", {EINVAL}, CMD_READ, 0, 4096, 0x4)
    valid_read(c, model, 0)
    c.disconnect()


def case_oversize(sock, export, model):
    c = Conn(sock)
    c.handshake(export)
    too_big = MAX_REQUEST + 4096
    expect_error(c, "read over 32 MiB", {EINVAL, EOVERFLOW, ENOMEM}, CMD_READ, 0, too_big)
    valid_read(c, model, 0)
    # A write over the limit: the server may skip the payload and reply with an error, or
    # disconnect; both are fine, but it must not apply the write (checked by the caller).
    try:
        cookie = c.request(CMD_WRITE, 0, too_big, 0, b"\xee" * too_big)
        err, _ = c.reply(cookie)
        check(err != 0, "write over 32 MiB succeeded")
        print("write over 32 MiB: error %d" % err)
        valid_read(c, model, 0)
        c.disconnect()
    except (Closed, socket.timeout) as e:
        print("write over 32 MiB: server disconnected (%s)" % e)


def case_garbage_request(sock, export, model):
    c = Conn(sock)
    c.handshake(export)
    c.send(os.urandom(4096))
    c.expect_closed("garbage instead of a request")
    print("garbage request: connection closed")


def case_garbage_handshake(sock, export, model):
    c = Conn(sock)
    c.recv_exact(18)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(256))
    c.expect_closed("garbage instead of the client flags")
    c = Conn(sock)
    c.greeting()
    # An option header with a bad magic.
    c.send(struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
    c.expect_closed("bad option magic")
    c = Conn(sock)
    c.greeting()
    # An option claiming 3 GiB of data: the server must refuse it, not allocate it.
    c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 3 << 30) + b"\x00" * 64)
    try:
        rtype, _ = c.option_reply(OPT_GO)
        check(rtype & REP_ERR, "a 3 GiB option was accepted")
    except Closed:
        pass
    print("garbage handshake: refused")


def case_bad_options(sock, export, model):
    c = Conn(sock)
    c.greeting()
    c.option(0x77, b"whatever")
    rtype, _ = c.option_reply(0x77)
    check(rtype == REP_ERR_UNSUP, "unknown option: reply %#x, expected ERR_UNSUP" % rtype)
    # STRUCTURED_REPLY takes no data: with some it is invalid, without it is acknowledged.
    c.option(OPT_STRUCTURED_REPLY, b"x")
    rtype, _ = c.option_reply(OPT_STRUCTURED_REPLY)
    check(rtype & REP_ERR, "STRUCTURED_REPLY with data: reply %#x, expected an error" % rtype)
    c.option(OPT_STRUCTURED_REPLY)
    rtype, _ = c.option_reply(OPT_STRUCTURED_REPLY)
    check(rtype == REP_ACK, "STRUCTURED_REPLY: reply %#x, expected ACK" % rtype)
    c.s.close()
    c = Conn(sock)
    c.greeting()
    rtype = c.go("no-such-export", expect_ok=False)
    check(rtype == REP_ERR_UNKNOWN or rtype & REP_ERR,
          "unknown export: reply %#x" % rtype)
    c.option(OPT_LIST)
    names = []
    while True:
        rtype, data = c.option_reply(OPT_LIST)
        if rtype == REP_ACK:
            break
        check(rtype == REP_SERVER, "LIST reply %#x" % rtype)
        n = struct.unpack(">I", data[:4])[0]
        names.append(data[4:4 + n].decode())
    check(export in names, "LIST lacks %r: %r" % (export, names))
    c.go(export)
    valid_read(c, model, 0)
    c.disconnect()
    # ABORT ends the handshake cleanly.
    c = Conn(sock)
    c.greeting()
    c.option(OPT_ABORT)
    try:
        rtype, _ = c.option_reply(OPT_ABORT)
        check(rtype == REP_ACK, "ABORT reply %#x" % rtype)
    except Closed:
        pass
    c.expect_closed("after ABORT")
    # The oldstyle-compatible EXPORT_NAME option still works.
    c = Conn(sock)
    c.greeting()
    n = export.encode()
    c.option(OPT_EXPORT_NAME, n)
    size, _flags = struct.unpack(">QH", c.recv_exact(10))
    if not c.no_zeroes:
        c.recv_exact(124)
    check(size == len(model), "EXPORT_NAME size %d" % size)
    valid_read(c, model, 0)
    c.disconnect()
    print("bad options: all refused, good options still work")


def case_truncated(sock, export, model):
    # A write whose payload stops halfway, then the connection closes: nothing may be applied.
    c = Conn(sock)
    c.handshake(export)
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 1 << 20) + b"\xee" * (512 << 10))
    c.s.close()
    # A request header cut short.
    c = Conn(sock)
    c.handshake(export)
    c.send(struct.pack(">IHHQ", REQUEST_MAGIC, 0, CMD_WRITE, 2)[:10])
    c.s.close()
    # Close in the middle of the handshake.
    c = Conn(sock)
    c.greeting()
    c.send(struct.pack(">QI", IHAVEOPT, OPT_GO))
    c.s.close()
    print("truncated input: sent")


def case_slow_handshake(sock, export, model):
    c = Conn(sock)
    # The kernel client in nbd-guest opens its connection seconds before it speaks.
    time.sleep(5)
    c.handshake(export)
    valid_read(c, model, 0)
    c.disconnect()
    print("slow handshake: served")


def any_reply(c, what, cmd, offset, length, flags=0, payload=b"", read_len=0):
    """Requests whose outcome the protocol leaves to the server: any reply, success or error,
    is fine, as long as there is exactly one and the stream stays in sync."""
    err, _ = c.reply(c.request(cmd, offset, length, flags, payload), read_len)
    print("%s: %s" % (what, "ok" if err == 0 else "error %d" % err))
    return err


def case_odd_requests(sock, export, model):
    c = Conn(sock)
    c.handshake(export)
    size = c.size
    any_reply(c, "zero-length read", CMD_READ, 4096, 0)
    any_reply(c, "zero-length write", CMD_WRITE, 4096, 0)
    any_reply(c, "zero-length write at the end", CMD_WRITE, size, 0)
    any_reply(c, "zero-length trim", CMD_TRIM, 0, 0)
    any_reply(c, "zero-length write zeroes", CMD_WRITE_ZEROES, 0, 0)
    any_reply(c, "read with FUA", CMD_READ, 0, 4096, FLAG_FUA, read_len=4096)
    any_reply(c, "flush with an offset and length", CMD_FLUSH, 4096, 4096)
    # Commands that need negotiation the server never did, or that it may not support.
    expect_error(c, "BLOCK_STATUS without a meta context", {EINVAL, ENOTSUP}, 7, 0, 4096)
    any_reply(c, "CACHE", CMD_CACHE, 0, 4096)
    if c.flags & (1 << 11):   # NBD_FLAG_SEND_FAST_ZERO: the flag is legal, zeroes may result
        any_reply(c, "WRITE_ZEROES with FAST_ZERO (advertised)", CMD_WRITE_ZEROES, 0, 0, 0x10)
    else:
        expect_error(c, "WRITE_ZEROES with FAST_ZERO (not advertised)", {EINVAL, ENOTSUP},
                     CMD_WRITE_ZEROES, 0, 4096, 0x10)
    expect_error(c, "WRITE with NO_HOLE (only for WRITE_ZEROES)", {EINVAL}, CMD_WRITE, 0, 4096,
                 FLAG_NO_HOLE, b"\xee" * 4096)
    valid_read(c, model, 0, len(model))
    c.disconnect()


def case_connection_flood(sock, export, model):
    # Many connections at once: 64 silent ones (no handshake yet) and 16 in transmission, each
    # reading; a new client is served meanwhile, and everything still works after they go.
    idle = [Conn(sock) for _ in range(64)]
    active = []
    for _ in range(16):
        c = Conn(sock)
        c.handshake(export)
        active.append(c)
    cookies = [(c, c.request(CMD_READ, 0, 65536)) for c in active]
    for c, cookie in cookies:
        err, data = c.reply(cookie, 65536)
        check(err == 0 and data == model[:65536], "read on one of 16 connections failed")
    probe = Conn(sock)
    probe.handshake(export)
    valid_read(probe, model, 0)
    probe.disconnect()
    for c in active:
        c.disconnect()
    for c in idle:
        c.s.close()
    print("connection flood: served")


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main():
    if len(sys.argv) != 5 or sys.argv[1] not in CASES:
        print(__doc__)
        print("cases:", " ".join(sorted(CASES)))
        return 2
    case, sock, export, model = sys.argv[1:]
    try:
        CASES[case](sock, export, model_bytes(model))
    except Fail as e:
        print("FAIL %s: %s" % (case, e))
        return 1
    except Closed as e:
        print("FAIL %s: the server closed the connection unexpectedly: %s" % (case, e))
        return 1
    except socket.timeout:
        print("FAIL %s: no answer within %ds" % (case, TIMEOUT))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
