"""IPv4/IPv6 fragment reassembly for the flow meter: bounded, timed out, counted.

`flagd run --workers N` joins a fanout group with `PACKET_FANOUT_FLAG_DEFRAG`, so there the
kernel hands on IPv4 datagrams already reassembled. `Reassembler` does the same in user space for
every other source (one capture process, pcap files, the dataset builder), and for IPv6, which
the kernel's fanout defrag leaves alone, so a fragmented flow has the same counters and model
bytes whichever way it was captured. The datagram it builds is the one the kernel builds: the
first fragment's link and IP header, total length (IPv4) or payload length (IPv6) set to the
whole datagram, the IPv4 fragment field cleared and the checksum recomputed, the IPv6 fragment
header removed; stamped with the time of the fragment that completed it, and handed on in that
fragment's place in the batch.

Only fragments of TCP and UDP datagrams are held (others keep their decode skip). Batches without
fragments pass through untouched after one vectorised test; the per-fragment work is Python, which
is fine for the share of fragments real traffic has. Bounds, as the kernel's (net.ipv4.ipfrag_*):
a datagram incomplete after `timeout` seconds of the meter's clock, overlapping fragments (RFC
5722; Linux drops overlapping IPv4 too), more than `max_fragments` fragments or a datagram over
65,535 bytes end the datagram; over `max_datagrams` or `max_bytes` held, the oldest datagram is
given up. Each discarded fragment is counted by reason (Skip.FRAG_*).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field, fields

import numpy as np

from flagd.frames import Frames
from flagd.packets import PROTO_TCP, PROTO_UDP, Packets, Skip, decode

IPV6_FRAGMENT = 44
_IPV6_WALK = (0, 43, 60, 135, 139, 140)  # extension headers before a fragment header: (len+1)*8
IPV6_AH = 51


@dataclass(frozen=True, slots=True)
class ReassemblySettings:
    timeout: float = 30.0  # seconds from a datagram's first fragment (Linux ipfrag_time)
    max_fragments: int = 128  # per datagram (64 KiB in 576-byte fragments needs 117)
    max_datagrams: int = 4096  # incomplete datagrams held at once
    max_bytes: int = 4 << 20  # fragment bytes held at once (Linux ipfrag_high_thresh)


@dataclass(slots=True)
class _Datagram:
    created: float  # the meter's clock at its first fragment
    # (offset, end, bytes, captured bytes) of each fragment's payload, by arrival
    parts: list[tuple[int, int, bytes, int]] = field(default_factory=list)
    head: bytes | None = None  # link header + IP header (IPv6: unfragmentable part, fixed up)
    linktype: int = 0
    link_len: int = 0  # bytes before the IP header in `head`
    total: int | None = None  # payload bytes of the whole datagram, once the last fragment came
    held: int = 0  # bytes held


def _fragment(data: np.ndarray, frames: Frames, p: Packets, i: int):
    """(key, offset, more, payload view start, payload wire length, captured length, head or None)
    for fragment row i, or None when its headers do not add up (counted as Skip.FRAGMENT)."""
    start = int(frames.offset[i])
    end = start + int(frames.caplen[i])
    ip = int(p.ip_off[i])
    wire_ip = int(frames.wirelen[i]) - (ip - start)
    if p.version[i] == 4:
        if end - ip < 20:
            return None
        ihl = (int(data[ip]) & 0x0F) * 4
        if ihl < 20 or ip + ihl > end:
            return None
        tot = int(data[ip + 2]) << 8 | int(data[ip + 3])
        if tot < ihl:  # a TSO capture's zero total length: the wire says it
            tot = wire_ip
        tot = min(tot, wire_ip)
        fo = int(data[ip + 6]) << 8 | int(data[ip + 7])
        off, more = (fo & 0x1FFF) * 8, bool(fo & 0x2000)
        key = (4, bytes(data[ip + 12:ip + 20]), int(data[ip + 9]), bytes(data[ip + 4:ip + 6]))
        body = ip + ihl
        length = tot - ihl
        head = None
        if off == 0:
            h = bytearray(data[start:body])
            h[ip - start + 6:ip - start + 8] = b"\x00\x00"  # the kernel's reassembled datagram
            head = bytes(h)
        return key, off, more, body, length, max(0, min(end - body, length)), head
    # IPv6: walk to the fragment header, remembering which byte names the header after it
    if end - ip < 40:
        return None
    plen = int(data[ip + 4]) << 8 | int(data[ip + 5])
    ip_end = ip + 40 + plen if plen else ip + wire_ip
    ip_end = min(ip_end, ip + wire_ip)
    nh_at, nh, q = ip + 6, int(data[ip + 6]), ip + 40
    for _ in range(16):
        if nh == IPV6_FRAGMENT or q + 2 > end:
            break
        if nh not in _IPV6_WALK and nh != IPV6_AH:
            return None
        size = (int(data[q + 1]) + 2) * 4 if nh == IPV6_AH else (int(data[q + 1]) + 1) * 8
        nh_at, nh, q = q, int(data[q]), q + size
    if nh != IPV6_FRAGMENT or q + 8 > end:
        return None
    fo = int(data[q + 2]) << 8 | int(data[q + 3])
    off, more = fo & 0xFFF8, bool(fo & 1)
    key = (6, bytes(data[ip + 8:ip + 40]), 0, bytes(data[q + 4:q + 8]))
    body = q + 8
    length = ip_end - body
    if length < 0:
        return None
    head = None
    if off == 0:
        h = bytearray(data[start:q])
        h[nh_at - start] = int(data[q])  # the header before the fragment header names its next
        head = bytes(h)
    return key, off, more, body, length, max(0, min(end - body, length)), head


class Reassembler:
    """Fragments in, whole datagrams out, one batch at a time. Not thread-safe (one per table)."""

    def __init__(self, settings: ReassemblySettings | None = None,
                 skipped: dict[str, int] | None = None) -> None:
        self.settings = settings or ReassemblySettings()
        self.pending: OrderedDict[tuple, _Datagram] = OrderedDict()  # oldest first
        self.held = 0  # bytes held over all pending datagrams
        self.skipped = skipped if skipped is not None else {}  # Skip name -> fragments

    def __len__(self) -> int:
        return len(self.pending)

    def _count(self, reason: Skip, n: int = 1) -> None:
        name = reason.name.lower()
        self.skipped[name] = self.skipped.get(name, 0) + n

    def _drop(self, key: tuple, reason: Skip) -> None:
        d = self.pending.pop(key)
        self.held -= d.held
        self._count(reason, len(d.parts))

    def flush(self) -> None:
        """The capture ended: what is still incomplete never will be."""
        while self.pending:
            self._drop(next(iter(self.pending)), Skip.FRAG_TIMEOUT)

    def expire(self, now: float) -> None:
        """Give up datagrams older than the timeout at the meter's clock `now`."""
        cutoff = now - self.settings.timeout
        while self.pending:
            key, d = next(iter(self.pending.items()))
            if d.created >= cutoff:
                break
            self._drop(key, Skip.FRAG_TIMEOUT)

    def feed(self, p: Packets, now: float) -> Packets:
        """The batch with its TCP/UDP fragments taken out and the datagrams they complete put in
        (decoded) where their last fragment was. `now` is the meter's clock before this batch."""
        if self.pending:
            self.expire(now)
        cand = np.flatnonzero(p.frag & ((p.proto == PROTO_TCP) | (p.proto == PROTO_UDP)))
        if not len(cand):
            return p
        frames, data = p.frames, p.frames.data
        s = self.settings
        done: list[tuple[int, bytes, int, int]] = []  # (row, frame, wirelen, linktype)
        for i in cand.tolist():
            t = float(p.ts[i])
            if t > now:
                now = t
            fr = _fragment(data, frames, p, i)
            if fr is None:
                self._count(Skip.FRAGMENT)
                continue
            key, off, more, body, length, captured, head = fr
            if more and (length <= 0 or length % 8):
                self._count(Skip.FRAGMENT)  # only the last fragment may end off an 8-byte mark
                continue
            d = self.pending.get(key)
            if d is not None and now - d.created > s.timeout:  # its timer ran out in this batch
                self._drop(key, Skip.FRAG_TIMEOUT)
                d = None
            if d is None:
                if len(self.pending) >= s.max_datagrams:
                    self._drop(next(iter(self.pending)), Skip.FRAG_LIMIT)
                d = self.pending[key] = _Datagram(created=now)
            stop = off + length
            if any(o == off and e == stop for o, e, _, _ in d.parts):
                self._count(Skip.FRAG_OVERLAP)  # a repeat: dropped alone, as the kernel does
                continue
            if any(off < e and o < stop for o, e, _, _ in d.parts) or (
                    d.total is not None and (stop > d.total or not more and stop != d.total)):
                self._count(Skip.FRAG_OVERLAP)
                self._drop(key, Skip.FRAG_OVERLAP)
                continue
            if len(d.parts) >= s.max_fragments or stop > 65535:
                self._count(Skip.FRAG_LIMIT)
                self._drop(key, Skip.FRAG_LIMIT)
                continue
            chunk = bytes(data[body:body + captured])
            d.parts.append((off, stop, chunk, captured))
            d.held += len(chunk)
            self.held += len(chunk)
            if not more:
                d.total = stop
            if head is not None:
                d.head = head
                d.linktype = int(frames.linktype[i])
                d.link_len = int(p.ip_off[i]) - int(frames.offset[i])
            while self.held > s.max_bytes and self.pending:
                oldest = next(iter(self.pending))
                self._drop(oldest, Skip.FRAG_LIMIT)
            if key not in self.pending:
                continue
            if d.head is not None and d.total is not None and \
                    sum(e - o for o, e, _, _ in d.parts) == d.total:
                del self.pending[key]
                self.held -= d.held
                frame, wirelen = _build(d)
                done.append((i, frame, wirelen, d.linktype))
        return _merge(p, cand, done)


def _build(d: _Datagram) -> tuple[bytes, int]:
    """The whole datagram's frame (cut where a fragment's capture was cut) and its wire length."""
    assert d.head is not None and d.total is not None
    head = bytearray(d.head)
    ip = d.link_len
    if head[ip] >> 4 == 4:
        ihl = (head[ip] & 0x0F) * 4
        struct.pack_into(">H", head, ip + 2, ihl + d.total)
        struct.pack_into(">H", head, ip + 10, 0)
        struct.pack_into(">H", head, ip + 10, _checksum(bytes(head[ip:ip + ihl])))
    else:
        struct.pack_into(">H", head, ip + 4, len(head) - ip - 40 + d.total)
    body = bytearray(d.total)
    whole = 0  # bytes captured contiguously from the datagram's payload start
    for off, _stop, chunk, _captured in sorted(d.parts):
        body[off:off + len(chunk)] = chunk
        if off == whole:
            whole = off + len(chunk)
    frame = bytes(head) + bytes(body[:whole])
    return frame, len(head) + d.total


def _checksum(header: bytes) -> int:
    words = np.frombuffer(header, ">u2").astype(np.uint32)
    s = int(words.sum())
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _merge(p: Packets, taken: np.ndarray, done: list[tuple[int, bytes, int, int]]) -> Packets:
    """p without rows `taken`, with the decoded datagrams `done` after their completing rows."""
    keep = np.ones(len(p), bool)
    keep[taken] = False
    rows = np.flatnonzero(keep)
    frames = p.frames
    if not done:
        new = Frames.empty()
    else:
        new = Frames.from_records([(float(frames.ts[i]), frame, wirelen, lt)
                                   for i, frame, wirelen, lt in done])
    q = decode(new)
    shift = len(frames.data)
    data = np.concatenate([frames.data, new.data]) if len(new) else frames.data
    # Where each row goes: kept rows at their index, a datagram just after its last fragment.
    order = np.argsort(np.concatenate([rows * 2, np.array([i for i, *_ in done], np.int64) * 2 + 1]),
                       kind="stable")

    def col(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a[rows], b])[order]

    merged = Frames(data=data, offset=col(frames.offset, new.offset + shift),
                    caplen=col(frames.caplen, new.caplen), wirelen=col(frames.wirelen, new.wirelen),
                    ts=col(frames.ts, new.ts), linktype=col(frames.linktype, new.linktype))
    cols = {}
    for f in fields(Packets):
        if f.name == "frames":
            continue
        b = getattr(q, f.name)
        if f.name in ("ip_off", "l4_off"):
            b = np.where(b >= 0, b + shift, b)
        cols[f.name] = col(getattr(p, f.name), b)
    cols["ts"], cols["wirelen"] = merged.ts, merged.wirelen
    return Packets(frames=merged, **cols)
