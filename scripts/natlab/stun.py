#!/usr/bin/env python3
"""STUN/TURN probes for the NAT lab (RFC 5389 / RFC 5766), standard library only.

  stun.py binding --server IP:PORT [--server IP:PORT ...] [--bind IP:PORT]
                  [--wait-unsolicited SECS] [--reply TEXT]
      Sends a Binding request to every server from ONE local socket and prints
      {"local": ..., "mapped": [{"server": .., "mapped": ..}, ..]} as a line;
      then, with --wait-unsolicited, waits that long for non-STUN datagrams,
      answers each with TEXT, and prints {"unsolicited": [{"from": .., "data": ..}]}.
      Exit 1 when a server did not answer.

  stun.py serve --bind IP:PORT
      A Binding responder (XOR-MAPPED-ADDRESS), until killed.

  stun.py turn --server IP:PORT --secret S --echo IP:PORT --denied IP:PORT [...]
      TURN checks against a coturn with use-auth-secret (REST credentials):
      allocate, relay to a UDP echo server, relay between two allocations of
      the same server, refusal of a denied peer, refusal of a wrong secret and
      of an expired username. Prints one JSON line per check; exit 1 on failure.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time
import zlib

MAGIC = 0x2112A442

BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008

REQUEST, INDICATION, SUCCESS, ERROR = 0x000, 0x010, 0x100, 0x110

MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA_ATTR = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_TRANSPORT = 0x0019
XOR_MAPPED_ADDRESS = 0x0020
FINGERPRINT = 0x8028


def msg_type(method, cls):
    """Interleaves method and class bits as RFC 5389 section 6 lays them out."""
    return ((method & 0xF80) << 2) | ((method & 0x070) << 1) | (method & 0x00F) | \
        ((cls & 0x100) << 0) | ((cls & 0x010) << 0)


def split_type(t):
    method = ((t >> 2) & 0xF80) | ((t >> 1) & 0x070) | (t & 0x00F)
    cls = t & 0x110
    return method, cls


def parse_addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


def fmt_addr(addr):
    return "%s:%d" % (addr[0], addr[1])


def xor_addr(addr, txid):
    """XOR-*-ADDRESS value for an IPv4 (host, port)."""
    ip = struct.unpack("!I", socket.inet_aton(addr[0]))[0] ^ MAGIC
    return struct.pack("!BBHI", 0, 1, addr[1] ^ (MAGIC >> 16), ip)


def unxor_addr(value, txid):
    family, port = value[1], struct.unpack("!H", value[2:4])[0] ^ (MAGIC >> 16)
    if family != 1:
        raise ValueError("only IPv4 in the lab")
    ip = struct.unpack("!I", value[4:8])[0] ^ MAGIC
    return socket.inet_ntoa(struct.pack("!I", ip)), port


def attr(kind, value):
    pad = (4 - len(value) % 4) % 4
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * pad


class Msg:
    def __init__(self, method, cls, txid=None, attrs=None):
        self.method, self.cls = method, cls
        self.txid = txid or os.urandom(12)
        self.attrs = attrs or []  # [(type, bytes)]

    def get(self, kind):
        for k, v in self.attrs:
            if k == kind:
                return v
        return None

    def encode(self, key=None, fingerprint=False):
        body = b"".join(attr(k, v) for k, v in self.attrs)
        head = lambda n: struct.pack("!HHI", msg_type(self.method, self.cls), n, MAGIC) + self.txid
        if key is not None:
            # The length in the header covers MESSAGE-INTEGRITY itself (24 bytes).
            mac = hmac.new(key, head(len(body) + 24) + body, hashlib.sha1).digest()
            body += attr(MESSAGE_INTEGRITY, mac)
        if fingerprint:
            crc = zlib.crc32(head(len(body) + 8) + body) ^ 0x5354554E
            body += attr(FINGERPRINT, struct.pack("!I", crc & 0xFFFFFFFF))
        return head(len(body)) + body

    @staticmethod
    def decode(data):
        if len(data) < 20 or data[0] & 0xC0:
            return None
        t, length, magic = struct.unpack("!HHI", data[:8])
        if magic != MAGIC or len(data) < 20 + length:
            return None
        method, cls = split_type(t)
        m = Msg(method, cls, data[8:20])
        pos = 20
        while pos + 4 <= 20 + length:
            kind, n = struct.unpack("!HH", data[pos:pos + 4])
            m.attrs.append((kind, data[pos + 4:pos + 4 + n]))
            pos += 4 + n + (4 - n % 4) % 4
        return m

    def error(self):
        v = self.get(ERROR_CODE)
        if v is None:
            return None
        return (v[2] & 7) * 100 + v[3], v[4:].decode("utf-8", "replace")


def transact(sock, server, msg, key=None, timeout=3.0, on_other=None):
    """Sends `msg` (retransmitting) and returns the response with its txid, or None."""
    raw = msg.encode(key)
    deadline = time.monotonic() + timeout
    rto = 0.25
    while time.monotonic() < deadline:
        sock.sendto(raw, server)
        resend = min(deadline, time.monotonic() + rto)
        rto = min(rto * 2, 1.0)
        while True:
            left = resend - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data, src = sock.recvfrom(65535)
            except socket.timeout:
                break
            except ConnectionRefusedError:
                continue
            m = Msg.decode(data)
            if m is not None and m.txid == msg.txid:
                return m
            if on_other is not None:
                on_other(data, src)
    return None


# --- binding client -----------------------------------------------------------

def cmd_binding(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(parse_addr(args.bind))
    unsolicited = []

    def other(data, src):
        unsolicited.append({"from": fmt_addr(src), "data": data.decode("utf-8", "replace")})

    out, ok = [], True
    for server in args.server:
        resp = transact(sock, parse_addr(server), Msg(BINDING, REQUEST), timeout=args.timeout, on_other=other)
        mapped = None
        if resp is not None and resp.cls == SUCCESS:
            v = resp.get(XOR_MAPPED_ADDRESS)
            if v is not None:
                mapped = fmt_addr(unxor_addr(v, resp.txid))
        ok = ok and mapped is not None
        out.append({"server": server, "mapped": mapped})
    print(json.dumps({"local": fmt_addr(sock.getsockname()), "mapped": out}), flush=True)
    if args.wait_unsolicited > 0:
        deadline = time.monotonic() + args.wait_unsolicited
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data, src = sock.recvfrom(65535)
            except socket.timeout:
                break
            except ConnectionRefusedError:
                continue
            if Msg.decode(data) is not None:
                continue  # a late STUN answer
            unsolicited.append({"from": fmt_addr(src), "data": data.decode("utf-8", "replace")})
            if args.reply:
                sock.sendto(args.reply.encode(), src)
        print(json.dumps({"unsolicited": unsolicited}), flush=True)
    return 0 if ok else 1


# --- binding responder --------------------------------------------------------

def cmd_serve(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(parse_addr(args.bind))
    print(json.dumps({"serving": fmt_addr(sock.getsockname())}), flush=True)
    while True:
        data, src = sock.recvfrom(65535)
        m = Msg.decode(data)
        if m is None or m.method != BINDING or m.cls != REQUEST:
            continue
        resp = Msg(BINDING, SUCCESS, m.txid, [(XOR_MAPPED_ADDRESS, xor_addr(src, m.txid))])
        sock.sendto(resp.encode(fingerprint=True), src)


# --- TURN client ----------------------------------------------------------------

def rest_credentials(secret, user, ttl):
    username = "%d:%s" % (int(time.time()) + ttl, user)
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username, password


class Turn:
    """One TURN allocation over UDP, long-term credentials."""

    def __init__(self, server, username, password):
        self.server = server
        self.username, self.password = username, password
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.realm = self.nonce = self.key = None
        self.relayed = self.mapped = None
        self.inbox = []  # (peer, data) from Data indications

    def _other(self, data, src):
        m = Msg.decode(data)
        if m is not None and m.method == DATA and m.cls == INDICATION:
            peer = unxor_addr(m.get(XOR_PEER_ADDRESS), m.txid)
            self.inbox.append((fmt_addr(peer), m.get(DATA_ATTR)))

    def request(self, method, attrs):
        """An authenticated request; answers 401/438 challenges. Returns the response."""
        for _ in range(3):
            full = list(attrs)
            key = None
            if self.nonce is not None:
                full += [(USERNAME, self.username.encode()), (REALM, self.realm), (NONCE, self.nonce)]
                key = self.key
            resp = transact(self.sock, self.server, Msg(method, REQUEST, attrs=full), key, on_other=self._other)
            if resp is None:
                return None
            err = resp.error()
            if resp.cls == ERROR and err and err[0] in (401, 438) and resp.get(NONCE) is not None:
                fresh = self.nonce is None or err[0] == 438
                self.realm, self.nonce = resp.get(REALM) or self.realm, resp.get(NONCE)
                self.key = hashlib.md5(b"%s:%s:%s" % (self.username.encode(), self.realm,
                                                      self.password.encode())).digest()
                if fresh:
                    continue
            return resp
        return resp

    def allocate(self):
        resp = self.request(ALLOCATE, [(REQUESTED_TRANSPORT, struct.pack("!BBBB", 17, 0, 0, 0)),
                                       (LIFETIME, struct.pack("!I", 120))])
        if resp is not None and resp.cls == SUCCESS:
            self.relayed = fmt_addr(unxor_addr(resp.get(XOR_RELAYED_ADDRESS), resp.txid))
            self.mapped = fmt_addr(unxor_addr(resp.get(XOR_MAPPED_ADDRESS), resp.txid))
        return resp

    def permit(self, peer):
        return self.request(CREATE_PERMISSION, [(XOR_PEER_ADDRESS, xor_addr(parse_addr(peer), None))])

    def send(self, peer, data):
        m = Msg(SEND, INDICATION, attrs=[(XOR_PEER_ADDRESS, xor_addr(parse_addr(peer), None)), (DATA_ATTR, data)])
        self.sock.sendto(m.encode(), self.server)

    def receive(self, timeout):
        deadline = time.monotonic() + timeout
        while not self.inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, src = self.sock.recvfrom(65535)
            except socket.timeout:
                return None
            except ConnectionRefusedError:
                continue
            self._other(data, src)
        return self.inbox.pop(0)

    def close(self):
        if self.relayed is not None:
            self.request(REFRESH, [(LIFETIME, struct.pack("!I", 0))])
        self.sock.close()


def describe(resp):
    if resp is None:
        return "no answer"
    if resp.cls == SUCCESS:
        return "success"
    err = resp.error()
    return "error %d %s" % err if err else "error"


def cmd_turn(args):
    server = parse_addr(args.server)
    results = []

    def report(name, ok, detail):
        results.append(ok)
        print(json.dumps({"check": name, "ok": ok, "detail": detail}), flush=True)

    user, password = rest_credentials(args.secret, "natlab", 600)
    a = Turn(server, user, password)
    resp = a.allocate()
    report("allocate", resp is not None and resp.cls == SUCCESS,
           "%s relayed=%s mapped=%s" % (describe(resp), a.relayed, a.mapped))
    if a.relayed is None:
        return 1

    # Relay to a UDP echo server on the public segment.
    resp = a.permit(args.echo)
    ok = resp is not None and resp.cls == SUCCESS
    got = None
    if ok:
        a.send(args.echo, b"natlab-echo")
        got = a.receive(2.0)
    report("relay to %s" % args.echo, ok and got == (args.echo, b"natlab-echo"),
           "permission %s, echoed %r" % (describe(resp), got))

    # Relay to relay: two allocations on the same server (what two peers behind
    # symmetric NATs end up using).
    b = Turn(server, *rest_credentials(args.secret, "natlab-b", 600))
    resp_b = b.allocate()
    ok = resp_b is not None and resp_b.cls == SUCCESS
    detail = "second allocation %s" % describe(resp_b)
    if ok:
        pa, pb = a.permit(b.relayed), b.permit(a.relayed)
        ok = all(r is not None and r.cls == SUCCESS for r in (pa, pb))
        detail += ", permissions %s/%s" % (describe(pa), describe(pb))
        if ok:
            a.send(b.relayed, b"a-to-b")
            got_b = b.receive(2.0)
            b.send(a.relayed, b"b-to-a")
            got_a = a.receive(2.0)
            ok = got_b == (a.relayed, b"a-to-b") and got_a == (b.relayed, b"b-to-a")
            detail += ", %s -> %s: %r, back: %r" % (a.relayed, b.relayed, got_b, got_a)
    report("relay to relay", ok, detail)
    b.close()

    # Peers outside the lab's public segment are refused (403).
    for peer in args.denied:
        resp = a.permit(peer)
        err = resp.error() if resp is not None else None
        report("refuses peer %s" % peer, err is not None and err[0] == 403, describe(resp))
    a.close()

    # A wrong secret and an expired username are refused (401).
    bad = Turn(server, *rest_credentials(args.secret + "x", "natlab", 600))
    resp = bad.allocate()
    err = resp.error() if resp is not None else None
    report("refuses a wrong secret", err is not None and err[0] == 401, describe(resp))
    bad.sock.close()
    old = Turn(server, *rest_credentials(args.secret, "natlab", -60))
    resp = old.allocate()
    err = resp.error() if resp is not None else None
    report("refuses an expired username", err is not None and err[0] == 401, describe(resp))
    old.sock.close()
    return 0 if all(results) else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("binding")
    b.add_argument("--server", action="append", required=True)
    b.add_argument("--bind", default="0.0.0.0:0")
    b.add_argument("--timeout", type=float, default=3.0)
    b.add_argument("--wait-unsolicited", type=float, default=0.0)
    b.add_argument("--reply", default="")
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    t = sub.add_parser("turn")
    t.add_argument("--server", required=True)
    t.add_argument("--secret", required=True)
    t.add_argument("--echo", required=True)
    t.add_argument("--denied", action="append", default=[])
    args = p.parse_args()
    return {"binding": cmd_binding, "serve": cmd_serve, "turn": cmd_turn}[args.cmd](args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
