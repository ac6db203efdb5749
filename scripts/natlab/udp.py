#!/usr/bin/env python3
"""UDP echo and sender for the NAT lab, standard library only.

  udp.py echo --bind IP:PORT
      Sends every datagram back to where it came from, until killed.

  udp.py send --to IP:PORT [--data TEXT] [--bind IP:PORT] [--wait SECS]
      Sends one datagram (three, 100 ms apart, in case the first is lost) and
      waits up to SECS for an answer. Prints {"sent_from": .., "to": ..,
      "reply": TEXT|null, "reply_from": ..|null}. Exit 0 either way: the
      caller decides whether an answer was expected.
"""

import argparse
import json
import socket
import sys
import time


def parse_addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


def cmd_echo(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(parse_addr(args.bind))
    print(json.dumps({"echoing": "%s:%d" % sock.getsockname()}), flush=True)
    while True:
        data, src = sock.recvfrom(65535)
        sock.sendto(data, src)


def cmd_send(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(parse_addr(args.bind))
    to = parse_addr(args.to)
    reply = reply_from = None
    deadline = time.monotonic() + args.wait
    sends = 0
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if sends < 3 and now >= next_send:
            sock.sendto(args.data.encode(), to)
            sends += 1
            next_send = now + 0.1
        left = deadline - now
        if left <= 0:
            break
        sock.settimeout(min(left, max(0.01, next_send - now)) if sends < 3 else left)
        try:
            data, src = sock.recvfrom(65535)
        except socket.timeout:
            continue
        except ConnectionRefusedError:
            continue  # an ICMP port unreachable from the far side
        reply, reply_from = data.decode("utf-8", "replace"), "%s:%d" % src
        break
    print(json.dumps({"sent_from": "%s:%d" % sock.getsockname(), "to": args.to,
                      "reply": reply, "reply_from": reply_from}), flush=True)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--bind", required=True)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--data", default="natlab")
    s.add_argument("--bind", default="0.0.0.0:0")
    s.add_argument("--wait", type=float, default=1.0)
    args = p.parse_args()
    return {"echo": cmd_echo, "send": cmd_send}[args.cmd](args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
