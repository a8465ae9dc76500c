"""Delay, jitter and loss in user space, for kernels without sch_netem.

The router's netfilter FORWARD chain hands each packet crossing a client's link to an NFQUEUE
(`iptables-legacy ... -j NFQUEUE`: xt's NFQUEUE target, which kernels without nft's queue
expression still have); this process holds it and gives the kernel its verdict when the packet
is due: accept after the delay, or drop with the loss probability. One queue per direction, so
each direction keeps its own order: a packet is never due before the one ahead of it (jitter
without reordering, as on a real path; netem reorders unless told otherwise). The packet itself
stays in the kernel; only its id crosses (copy mode "meta").

It speaks nfnetlink_queue directly over a netlink socket (the protocol is four messages), and is
started per session by `conditions.apply` in the router's namespace:

    python -m flagd.lab.delayline --queues 6,7 --delay-ms 40 --jitter-ms 5 --loss-pct 0.5 --seed 1

It prints "ready" once the queues are bound (the rules go in after that: a queue nobody listens
on drops everything) and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_DROP, NF_ACCEPT = 0, 1
QUEUE_MAXLEN = 16384  # packets held per queue: 150 ms at 100 Mbit/s is ~1,300 full frames
RCVBUF = 8 << 20


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _message(msg: int, queue: int, attrs: bytes, flags: int = 0, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def config_messages(queue: int) -> list[bytes]:
    """Bind `queue`, ask for metadata only, and let it hold QUEUE_MAXLEN packets."""
    bind = _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET))
    params = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
    maxlen = _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
    return [_message(NFQNL_MSG_CONFIG, queue, a, NLM_F_ACK, seq=i + 1)
            for i, a in enumerate((bind, params, maxlen))]  # fmt: skip


def verdict_message(queue: int, packet_id: int, verdict: int) -> bytes:
    return _message(
        NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
    )


def parse(buf: bytes) -> list[tuple[int, int]]:
    """(queue, packet id) of each queued-packet message in one netlink read; an error message
    for one of our requests raises OSError with its errno (0 is an acknowledgement)."""
    out, off = [], 0
    while off + 16 <= len(buf):
        length, kind = struct.unpack_from("=IH", buf, off)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", buf, off + 16)
            if err:
                raise OSError(-err, f"nfnetlink_queue: {errno.errorcode.get(-err, err)}")
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            (res_id,) = struct.unpack_from("!H", buf, off + 18)
            a, end = off + 20, off + length
            while a + 4 <= end:
                alen, akind = struct.unpack_from("=HH", buf, a)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    out.append((res_id, struct.unpack_from("!I", buf, a + 4)[0]))
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return out


class DelayLine:
    """Holds each queued packet for `delay_ms` +- `jitter_ms` (uniform, never overtaking the
    packet ahead in its queue) and drops `loss_pct` percent of them."""

    def __init__(self, queues: list[int], delay_ms: float, jitter_ms: float, loss_pct: float,
                 seed: int) -> None:  # fmt: skip
        self.queues = queues
        self.delay, self.jitter, self.loss = delay_ms / 1000, jitter_ms / 1000, loss_pct / 100
        self.rng = random.Random(seed)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:  # root may go past rmem_max; a burst of queued packets must not overflow the socket
            self.sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.bind((0, 0))
        self.last_due = dict.fromkeys(queues, 0.0)
        self.held: list[tuple[float, int, int, int]] = []  # (due, seq, queue, packet id)
        self.seq = 0
        self.counts = {"accepted": 0, "dropped": 0}

    def bind(self) -> None:
        for q in self.queues:
            for msg in config_messages(q):
                self.sock.send(msg)
                parse(self.sock.recv(65536))  # the acknowledgement, or OSError

    def _arrived(self, queue: int, packet_id: int, now: float) -> None:
        if self.loss and self.rng.random() < self.loss:
            self.sock.send(verdict_message(queue, packet_id, NF_DROP))
            self.counts["dropped"] += 1
            return
        spread = self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        due = max(now + self.delay + spread, self.last_due[queue])
        self.last_due[queue] = due
        self.seq += 1
        heapq.heappush(self.held, (due, self.seq, queue, packet_id))

    def _release(self, now: float) -> None:
        while self.held and self.held[0][0] <= now:
            _, _, queue, packet_id = heapq.heappop(self.held)
            self.sock.send(verdict_message(queue, packet_id, NF_ACCEPT))
            self.counts["accepted"] += 1

    def run(self, stop: list[bool]) -> None:
        while not stop[0]:
            now = time.monotonic()
            self._release(now)
            wait = max(0.0, self.held[0][0] - now) if self.held else 0.5
            try:
                ready, _, _ = select.select([self.sock], [], [], wait)
            except InterruptedError:
                continue
            if not ready:
                continue
            try:
                buf = self.sock.recv(1 << 16)
            except OSError as e:  # ENOBUFS: the kernel dropped queue messages; those packets
                print(f"delayline: {e}", file=sys.stderr, flush=True)  # are lost, like a full queue
                continue
            now = time.monotonic()
            for queue, packet_id in parse(buf):
                self._arrived(queue, packet_id, now)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flagd.lab.delayline", description=__doc__.split("\n")[0]
    )
    p.add_argument("--queues", required=True, help="NFQUEUE numbers, comma-separated")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss-pct", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action="store_true", help="bind the queues, then exit 0")
    a = p.parse_args(argv)
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    line = DelayLine(
        [int(q) for q in a.queues.split(",")], a.delay_ms, a.jitter_ms, a.loss_pct, a.seed
    )
    try:
        line.bind()
    except OSError as e:
        print(f"delayline: cannot bind queues {a.queues}: {e}", file=sys.stderr, flush=True)
        return 1
    if a.probe:
        return 0
    print("ready", flush=True)
    try:
        line.run(stop)
    except KeyboardInterrupt:
        pass
    # whatever is still held goes on: the session is over, its rules are already gone
    line._release(float("inf"))
    print(f"delayline: {line.counts}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
