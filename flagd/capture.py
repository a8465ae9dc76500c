"""Live capture from a Linux interface with AF_PACKET, delivered as `Frames` batches.

The fast path is a TPACKET_V3 memory-mapped ring: the kernel fills fixed-size blocks with many
packets and hands a whole block over at once, so one read costs a few syscalls per block rather
than one per packet, and the Python work per packet is a single read of the header chain (the
rest is numpy over the block). The fallback (`ring=False`, or when the ring cannot be set up) is
a plain packet socket read with one `recvmsg_into` per packet; it exists for kernels or sandboxes
without PACKET_RX_RING and as the baseline in benchmarks/bench_capture.py.

Direction: on `lo` every packet passes the packet tap twice (once leaving, once arriving), so
outgoing copies are dropped there (PACKET_IGNORE_OUTGOING, or in user space on old kernels). On
every other interface both directions are kept: a veth end or a NIC shows each packet once.

Link types follow the interface's ARPHRD type: Ethernet and loopback give LINKTYPE_ETHERNET (lo
carries a zeroed Ethernet header), ARPHRD_NONE (tun, WireGuard) gives LINKTYPE_RAW, and anything
else is read through a cooked SOCK_DGRAM socket and given a 16-byte LINKTYPE_LINUX_SLL header.

Interfaces are looked up over rtnetlink (pyroute2) so a wrong name lists the real ones, and a
`LinkMonitor` reports link down/up while capturing. `drop_privileges` gives up root (or
CAP_NET_RAW) once the socket is open. Every failure is a `CaptureError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flagd.frames import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW, Frames

# <linux/if_ether.h>, <linux/if_packet.h>, <linux/if_arp.h>, <asm-generic/socket.h>
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
PACKET_VERSION = 10
PACKET_RESERVE = 12
PACKET_IGNORE_OUTGOING = 23
PACKET_FANOUT = 18
# Fanout by the kernel's flow hash, which is symmetric (__skb_get_hash_symmetric): both
# directions of a flow land in the same socket, so each process can own whole flows. DEFRAG
# reassembles IP fragments first so that every fragment hashes like the flow it belongs to.
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_DEFRAG = 0x8000
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
# The kernel takes an 802.1Q tag out of the frame (VLAN offload) and reports it beside it: put it
# back, as libpcap does, so a live capture keys flows by VLAN like a replay of the same traffic.
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
ETH_P_8021Q = 0x8100
_VLAN_TAG_LEN = 4
PACKET_OUTGOING = 4  # sll_pkttype of a packet this host sent
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
ARPHRD_NONE = 0xFFFE
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
DLT_EN10MB = 1
DLT_RAW = 12  # libpcap's DLT for raw IP on Linux (LINKTYPE_RAW in files)
BPF_RET_K = 0x06  # BPF_RET | BPF_K: "accept k bytes"
FULL_SNAPLEN = 262144  # libpcap's default: keep whole frames, even 64 KiB GSO super-packets

# Byte offsets inside the TPACKET_V3 ring (<linux/if_packet.h>).
_BLOCK_STATUS = 8  # tpacket_block_desc.hdr.bh1.block_status
_BLOCK_NUM_PKTS = 12
_BLOCK_FIRST = 16  # offset_to_first_pkt
_HDR_SLL = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr)): the sockaddr_ll follows
_SLL_HDR_LEN = 16  # LINKTYPE_LINUX_SLL header
_FRAME_SIZE = 2048  # V3 ignores frames for layout, but tpacket_req3 must still describe them

_PRIV_HINT = (
    "opening a packet socket on {iface} needs CAP_NET_RAW: run as root, or grant it: "
    "sudo setcap cap_net_raw+ep $(readlink -f $(which python3)), "
    "or use the systemd unit (AmbientCapabilities=CAP_NET_RAW)"
)


Opener = Callable[[int], socket.socket]  # socket type -> a new, unbound AF_PACKET socket


class CaptureError(RuntimeError):
    """Anything that stops a capture from opening or running; the message is one line."""


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """One interface as rtnetlink reports it."""

    index: int
    name: str
    arphrd: int  # ARPHRD_* device type, decides the link type and socket type
    admin_up: bool  # IFF_UP: `ip link set NAME up`
    carrier: bool  # IFF_LOWER_UP: cable in / veth peer up
    operstate: str  # UP, DOWN, LOWERLAYERDOWN, UNKNOWN (lo, tun), ...

    @property
    def up(self) -> bool:
        return self.admin_up and self.operstate in ("UP", "UNKNOWN")


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """Cumulative counters since the capture opened."""

    received: int  # kernel tp_packets: packets that passed the filter, dropped ones included
    dropped: int  # kernel tp_drops: ring full or socket buffer full
    freeze_q_count: int  # TPACKET_V3 tp_freeze_q_cnt: times the ring was full (0 without ring)
    delivered: int  # frames handed out by read()


def _link_info(msg: object) -> LinkInfo:
    return LinkInfo(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME") or f"if{msg['index']}",
        arphrd=msg["ifi_type"],
        admin_up=bool(msg["flags"] & IFF_UP),
        carrier=bool(msg["flags"] & IFF_LOWER_UP),
        operstate=msg.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
    )


def list_interfaces() -> list[LinkInfo]:
    """Interfaces of the current network namespace, by index."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = [_link_info(m) for m in ipr.get_links()]
    return sorted(links, key=lambda link: link.index)


def check_interface(name: str) -> LinkInfo:
    """The interface `name`, or a CaptureError naming the ones that exist / saying it is down."""
    links = list_interfaces()
    for link in links:
        if link.name == name:
            if not link.admin_up:
                raise CaptureError(
                    f"interface {name!r} is down: bring it up with `ip link set {name} up`"
                )
            return link
    names = ", ".join(link.name for link in links) or "none"
    raise CaptureError(f"no interface {name!r}; interfaces: {names}")


def _link_type(arphrd: int) -> tuple[int, int]:
    """(LINKTYPE_* of the frames, socket type to read them with) for a device type."""
    if arphrd in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        return LINKTYPE_ETHERNET, socket.SOCK_RAW
    if arphrd == ARPHRD_NONE:
        return LINKTYPE_RAW, socket.SOCK_RAW
    # Unknown link headers: let the kernel strip them and describe the packet in a cooked header.
    return LINKTYPE_LINUX_SLL, socket.SOCK_DGRAM


def compile_bpf(
    expr: str, linktype: int, snaplen: int = FULL_SNAPLEN
) -> list[tuple[int, int, int, int]]:
    """Compile a tcpdump filter expression with libpcap (through scapy) into (code, jt, jf, k).

    Cooked sockets run the filter on the network header, so they are compiled as raw IP. Accepting
    returns are rewritten to `snaplen`, which is how the kernel is told to truncate.
    """
    try:
        from scapy.arch.common import compile_filter, free_filter
        from scapy.error import Scapy_Exception
    except ImportError as exc:  # pragma: no cover - scapy is a dependency
        raise CaptureError(f"BPF filters need scapy: {exc}") from None
    dlt = DLT_EN10MB if linktype == LINKTYPE_ETHERNET else DLT_RAW
    try:
        prog = compile_filter(expr, linktype=dlt)
    except ImportError:
        raise CaptureError(
            "BPF filters need libpcap, which is not installed (Debian: apt-get install libpcap0.8)"
        ) from None
    except Scapy_Exception as exc:
        reason = str(exc).split("(", 1)[-1].rstrip(")") if "(" in str(exc) else str(exc)
        raise CaptureError(f"bad BPF filter {expr!r}: {reason}") from None
    try:
        insns = [(i.code, i.jt, i.jf, i.k & 0xFFFFFFFF) for i in prog.bf_insns[: prog.bf_len]]
    finally:
        free_filter(prog)
    return [(c, jt, jf, snaplen if c == BPF_RET_K and k else k) for c, jt, jf, k in insns]


def _attach_filter(sock: socket.socket, insns: list[tuple[int, int, int, int]]) -> None:
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in insns)
    buf = ctypes.create_string_buffer(raw, len(raw))  # must outlive the setsockopt call
    fprog = struct.pack("HL", len(insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class LiveCapture:
    """An open capture handle; build it with `open_capture`."""

    def __init__(
        self,
        sock: socket.socket,
        link: LinkInfo,
        linktype: int,
        snaplen: int,
        ring: mmap.mmap | None,
        block_size: int,
        block_count: int,
        skip_outgoing: bool,
        fanout: bool = False,
    ) -> None:
        self.iface = link.name
        self.link = link
        self.linktype = linktype
        self.snaplen = snaplen
        self._sock = sock
        self._cooked = sock.type == socket.SOCK_DGRAM
        self._skip_outgoing = skip_outgoing  # lo on a kernel without PACKET_IGNORE_OUTGOING
        self._fanout = fanout
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN | select.POLLERR)
        self._received = self._dropped = self._freeze = self._delivered = 0
        # stats() may come from another thread (the daemon's stats events) while the capture
        # thread drains and closes: the lock keeps it off a closed (or reused) descriptor and
        # keeps the counters it accumulates consistent.
        self._lock = threading.Lock()
        self._stats_len = 12 if ring is not None else 8
        self._mm = ring
        self._block_size = block_size
        self._block_count = block_count
        self._block = 0  # next ring block to look at
        if ring is not None:
            self._ring = np.frombuffer(ring, np.uint8)  # the whole ring, for gathers
            self._mv32 = memoryview(ring).cast("I")  # for the header walk (cheapest indexing)
            self._u32 = self._ring.view(np.uint32)
            self._u16 = self._ring.view(np.uint16)
            self._iota = np.arange(block_size, dtype=np.int64)  # a block never holds more bytes
        else:
            # Slot per packet: snaplen bounded by the largest frame the MTU allows, plus a cooked
            # header; the batch buffer holds a block's worth, like one ring block.
            self._slot = min(snaplen, 65535 + 64) + _SLL_HDR_LEN
            self._buf = bytearray(max(block_size, 4 * self._slot))
            self._bufview = memoryview(self._buf)
            self._anc = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(20)

    @property
    def ring(self) -> bool:
        """True when the memory-mapped ring is in use, False on the plain-socket fallback."""
        return self._mm is not None

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, timeout: float) -> Frames:
        """Frames received so far; waits up to `timeout` seconds when none are ready."""
        if self._sock.fileno() < 0:
            raise CaptureError(f"capture on {self.iface} is closed")
        reader = self._read_ring if self._mm is not None else self._read_socket
        frames = reader()
        if not len(frames) and timeout > 0:
            try:
                self._poll.poll(timeout * 1000.0)
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                pass
            frames = reader()
        self._delivered += len(frames)
        return frames

    def drain(self) -> Frames:
        """Stop receiving, return every frame the capture still holds, and close it.

        A ring block reaches user space when it is full or when its timeout fires, so at the end
        of quiet traffic the last packets can sit in the block the kernel is still filling.
        Unhooking the socket first makes that block final, and it is read as well.
        """
        if self._sock.fileno() < 0:
            raise CaptureError(f"capture on {self.iface} is closed")
        if self._fanout:
            # A fanout member cannot be re-bound: a filter that drops everything stops new
            # packets, and a short wait lets those already being copied land.
            _attach_filter(self._sock, [(BPF_RET_K, 0, 0, 0)])
            time.sleep(0.05)
        else:
            # Protocol 0 unhooks the socket; the kernel returns once no packet is in flight. An
            # interface that went away has taken the hook with it (and bind fails): just read.
            with contextlib.suppress(OSError):
                self._sock.bind((self.iface, 0))
        if self._mm is not None:
            frames = self._read_ring(final=True)
        else:
            batches = []
            while len(batch := self._read_socket()):
                batches.append(batch)
            frames = Frames.concat(batches)
        self._delivered += len(frames)
        self.close()
        return frames

    def stats(self) -> CaptureStats:
        """Kernel counters, accumulated (the kernel resets them on every read); any thread."""
        with self._lock:
            return self._stats()

    def _stats(self) -> CaptureStats:
        if self._sock.fileno() >= 0:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, self._stats_len)
            packets, drops = struct.unpack_from("II", raw)
            self._received += packets
            self._dropped += drops
            if self._stats_len == 12:
                self._freeze += struct.unpack_from("I", raw, 8)[0]
        return CaptureStats(self._received, self._dropped, self._freeze, self._delivered)

    def close(self) -> None:
        with self._lock:
            if self._sock.fileno() < 0:
                return
            self._stats()  # keep the final counters readable after close
            if self._mm is not None:
                # numpy and memoryview exports must go before the mapping can be closed.
                del self._ring, self._u32, self._u16
                self._mv32.release()
                self._mm.close()
            self._sock.close()

    def __enter__(self) -> LiveCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ring path ------------------------------------------------------------------------------

    def _read_ring(self, final: bool = False) -> Frames:
        """The blocks handed over so far; `final` (socket unhooked): also the one being filled."""
        parts = []
        mv32 = self._mv32
        for _ in range(self._block_count):
            base = self._block * self._block_size
            if not mv32[(base + _BLOCK_STATUS) >> 2] & TP_STATUS_USER:
                if final and (part := self._take_block(base)) is not None:
                    parts.append(part)
                break
            part = self._take_block(base)
            if part is not None:
                parts.append(part)
            mv32[(base + _BLOCK_STATUS) >> 2] = TP_STATUS_KERNEL  # hand the block back
            self._block = (self._block + 1) % self._block_count
        return _concat(parts, self.linktype)

    def _take_block(self, base: int) -> tuple[np.ndarray, ...] | None:
        mv32 = self._mv32
        count = mv32[(base + _BLOCK_NUM_PKTS) >> 2]
        if not count:
            return None
        # The only per-packet Python: follow tp_next_offset from one header to the next.
        hdrs = [0] * count
        off = base + mv32[(base + _BLOCK_FIRST) >> 2]
        for i in range(count):
            hdrs[i] = off
            off += mv32[off >> 2]
        hdr = np.array(hdrs, np.int64)
        w = hdr >> 2  # tpacket3_hdr fields as uint32 words: 1 sec, 2 nsec, 3 snaplen, 4 len
        ring = self._ring
        ts = self._u32[w + 1] + self._u32[w + 2] * 1e-9
        caplen = self._u32[w + 3].astype(np.int64)
        wirelen = self._u32[w + 4].astype(np.int64)
        start = hdr + self._u16[(hdr >> 1) + 12]  # tp_mac
        if not self._cooked:
            tagged = (self._u32[w + 5] & TP_STATUS_VLAN_VALID) != 0  # tp_status
            if tagged.any():
                start, caplen, wirelen = self._insert_vlan_tags(hdr, w, tagged, start, caplen,
                                                                wirelen)
        if self._skip_outgoing:
            keep = ring[hdr + _HDR_SLL + 10] != PACKET_OUTGOING  # sockaddr_ll.sll_pkttype
            hdr, ts, caplen, wirelen, start = (
                hdr[keep],
                ts[keep],
                caplen[keep],
                wirelen[keep],
                start[keep],
            )
            if not len(hdr):
                return None
        if self._cooked:
            start = self._write_sll_headers(hdr, start)
            caplen += _SLL_HDR_LEN
            wirelen += _SLL_HDR_LEN
        # Copy the frames out back to back (the block goes back to the kernel after this):
        # byte j of the output comes from ring[j + (start - out_offset) of its record].
        ends = np.cumsum(caplen)
        offset = ends - caplen
        idx = np.repeat(start - offset, caplen)
        idx += self._iota[: len(idx)]
        return ring[idx], offset, caplen, wirelen, ts

    def _insert_vlan_tags(self, hdr: np.ndarray, w: np.ndarray, tagged: np.ndarray,
                          start: np.ndarray, caplen: np.ndarray, wirelen: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Move the two MAC addresses of each tagged frame 4 bytes back, into the room
        PACKET_RESERVE left, and write the tag (TPID, TCI) between them and the EtherType."""
        s = start[tagged]
        if (s - hdr[tagged] < _HDR_SLL + 20 + _VLAN_TAG_LEN).any():
            raise CaptureError(f"unexpected TPACKET_V3 layout on {self.iface}: no room for VLAN tags")
        ring = self._ring
        for k in range(12):  # ascending: each byte moves to a place already read
            ring[s - _VLAN_TAG_LEN + k] = ring[s + k]
        tci = self._u32[w[tagged] + 8]  # tp_vlan_tci
        tpid = np.where(self._u32[w[tagged] + 5] & TP_STATUS_VLAN_TPID_VALID,
                        self._u16[(hdr[tagged] >> 1) + 18], ETH_P_8021Q)  # tp_vlan_tpid
        at = s - _VLAN_TAG_LEN + 12
        ring[at], ring[at + 1] = tpid >> 8, tpid & 0xFF
        ring[at + 2], ring[at + 3] = (tci >> 8) & 0xFF, tci & 0xFF
        start, caplen, wirelen = start.copy(), caplen.copy(), wirelen.copy()
        start[tagged] -= _VLAN_TAG_LEN
        caplen[tagged] += _VLAN_TAG_LEN
        wirelen[tagged] += _VLAN_TAG_LEN
        return start, caplen, wirelen

    def _write_sll_headers(self, hdr: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Build LINKTYPE_LINUX_SLL headers in the 16 bytes the kernel leaves before tp_net."""
        if (start - hdr < _HDR_SLL + 20 + _SLL_HDR_LEN).any():
            raise CaptureError(
                f"unexpected TPACKET_V3 layout on {self.iface}: no room for cooked headers"
            )
        ring, sll, out = self._ring, hdr + _HDR_SLL, start - _SLL_HDR_LEN
        hatype = ring[sll + 8].astype(np.uint16) | (
            ring[sll + 9].astype(np.uint16) << 8
        )  # host order
        ring[out] = 0
        ring[out + 1] = ring[sll + 10]  # sll_pkttype
        ring[out + 2] = hatype >> 8
        ring[out + 3] = hatype & 0xFF
        ring[out + 4] = 0
        ring[out + 5] = ring[sll + 11]  # sll_halen
        for k in range(8):
            ring[out + 6 + k] = ring[sll + 12 + k]  # sll_addr
        ring[out + 14] = ring[sll + 2]  # sll_protocol, already in network order
        ring[out + 15] = ring[sll + 3]
        return out

    # -- plain socket path --------------------------------------------------------------------

    def _read_socket(self) -> Frames:
        sock, mv, slot, anc = self._sock, self._bufview, self._slot, self._anc
        cooked, skip_out = self._cooked, self._skip_outgoing
        flags = socket.MSG_DONTWAIT | socket.MSG_TRUNC
        offsets: list[int] = []
        caplens: list[int] = []
        wirelens: list[int] = []
        stamps: list[float] = []
        pos, limit = 0, len(self._buf) - slot
        while pos <= limit:
            at = pos + _SLL_HDR_LEN if cooked else pos
            try:
                n, ancdata, _, addr = sock.recvmsg_into(
                    [mv[at : at + slot - _SLL_HDR_LEN]], anc, flags
                )
            except BlockingIOError:
                break
            if skip_out and addr[2] == PACKET_OUTGOING:
                continue
            ts, wire, tag = time.time(), n, None
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack_from("qq", data)
                    ts = sec + nsec * 1e-9
                elif level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status, wire = struct.unpack_from("II", data)  # tp_len: before snaplen cut
                    if status & TP_STATUS_VLAN_VALID and not cooked:
                        tci, tpid = struct.unpack_from("HH", data, 16)
                        tag = (tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q, tci)
            cap = min(n, slot - _SLL_HDR_LEN)
            if tag is not None and cap >= 12:  # the slot keeps 16 spare bytes past `cap`
                self._buf[pos + 16 : pos + cap + 4] = self._buf[pos + 12 : pos + cap]
                struct.pack_into("!HH", self._buf, pos + 12, *tag)
                cap += _VLAN_TAG_LEN
                wire += _VLAN_TAG_LEN
            if cooked:
                # addr = (ifname, protocol, pkttype, hatype, hwaddr)
                struct.pack_into(
                    "!HHH8sH", self._buf, pos, addr[2], addr[3], len(addr[4]), addr[4], addr[1]
                )
                cap += _SLL_HDR_LEN
                wire += _SLL_HDR_LEN
            offsets.append(pos)
            caplens.append(cap)
            wirelens.append(wire)
            stamps.append(ts)
            pos += cap
        if not offsets:
            return Frames.empty()
        return Frames(
            data=np.frombuffer(self._buf, np.uint8, pos).copy(),
            offset=np.array(offsets, np.int64),
            caplen=np.array(caplens, np.int32),
            wirelen=np.array(wirelens, np.int32),
            ts=np.array(stamps, np.float64),
            linktype=np.full(len(offsets), self.linktype, np.int32),
        )


def _concat(parts: list[tuple[np.ndarray, ...]], linktype: int) -> Frames:
    if not parts:
        return Frames.empty()
    if len(parts) == 1:
        data, offset, caplen, wirelen, ts = parts[0]
    else:
        shift = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
        data = np.concatenate([p[0] for p in parts])
        offset = np.concatenate([p[1] + s for p, s in zip(parts, shift, strict=True)])
        caplen, wirelen, ts = (np.concatenate([p[k] for p in parts]) for k in (2, 3, 4))
    return Frames(
        data=data,
        offset=offset,
        caplen=caplen.astype(np.int32),
        wirelen=wirelen.astype(np.int32),
        ts=ts,
        linktype=np.full(len(offset), linktype, np.int32),
    )


def _new_socket(iface: str, sock_type: int, opener: Opener | None = None) -> socket.socket:
    try:
        if opener is not None:  # the capture helper, which kept CAP_NET_RAW (flagd.helper)
            return opener(sock_type)
        # Protocol 0: the socket receives nothing until bind(), so no packet slips past the filter.
        return socket.socket(socket.AF_PACKET, sock_type, 0)
    except PermissionError:
        raise CaptureError(_PRIV_HINT.format(iface=iface)) from None
    except OSError as exc:
        raise CaptureError(f"cannot open a packet socket on {iface}: {exc.strerror}") from None
    except RuntimeError as exc:  # HelperError: the helper said why, in one line
        if "CAP_NET_RAW" in str(exc):
            raise CaptureError(_PRIV_HINT.format(iface=iface)) from None
        raise CaptureError(f"cannot open a packet socket on {iface}: {exc}") from None


def _setup_ring(
    sock: socket.socket, block_size: int, block_count: int, block_timeout_ms: int
) -> mmap.mmap:
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
    sock.setsockopt(SOL_PACKET, PACKET_RESERVE, _VLAN_TAG_LEN)  # room to put a VLAN tag back
    frame_nr = block_size * block_count // _FRAME_SIZE
    req = struct.pack("7I", block_size, block_count, _FRAME_SIZE, frame_nr, block_timeout_ms, 0, 0)
    sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
    return mmap.mmap(
        sock.fileno(), block_size * block_count, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
    )


def open_capture(
    iface: str,
    *,
    bpf: str | None = None,
    promisc: bool = False,
    ring: bool = True,
    block_size: int = 1 << 20,
    block_count: int = 32,
    snaplen: int = FULL_SNAPLEN,
    block_timeout_ms: int = 10,
    fanout: int | None = None,
    opener: Opener | None = None,
) -> LiveCapture:
    """Open `iface` for capture.

    block_size * block_count is the ring (or, without the ring, the socket buffer): 32 MiB holds
    about 200,000 minimal frames, a fifth of a second at 1 Mpps. A block is handed over when full
    or `block_timeout_ms` after its first packet, which bounds the latency at low rates.
    fanout: join this PACKET_FANOUT group id (0-65535) in hash mode; every socket of the group
    on the interface gets a share of the flows, each flow whole.
    opener: makes the unbound AF_PACKET socket of a given type (default: socket.socket here;
    `flagd run` passes its capture helper's, which kept CAP_NET_RAW when the daemon dropped it).
    """
    if block_size % mmap.PAGESIZE or block_size < _FRAME_SIZE or block_count < 1:
        raise CaptureError(f"block_size must be a multiple of {mmap.PAGESIZE} and block_count >= 1")
    if not 64 <= snaplen <= FULL_SNAPLEN:
        raise CaptureError(f"snaplen must be between 64 and {FULL_SNAPLEN}, not {snaplen}")
    link = check_interface(iface)
    linktype, sock_type = _link_type(link.arphrd)
    insns = compile_bpf(bpf, linktype, snaplen) if bpf else None
    if insns is None and snaplen < FULL_SNAPLEN:
        insns = [(BPF_RET_K, 0, 0, snaplen)]  # accept everything, truncated to snaplen

    def configure(sock: socket.socket) -> bool:
        """Filter and lo direction; True when outgoing copies must be dropped in user space."""
        if insns is not None:
            try:
                _attach_filter(sock, insns)
            except OSError as exc:
                raise CaptureError(
                    f"cannot attach the BPF filter on {iface}: {exc.strerror}"
                ) from None
        if link.arphrd != ARPHRD_LOOPBACK:
            return False
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            return False
        except OSError:  # kernels before 4.20
            return True

    sock = _new_socket(iface, sock_type, opener)
    mm = None
    try:
        skip_outgoing = configure(sock)
        if ring:
            try:
                mm = _setup_ring(sock, block_size, block_count, block_timeout_ms)
            except OSError:
                # No ring here (old kernel, seccomp, memory): start over on a plain socket.
                sock.close()
                sock = _new_socket(iface, sock_type, opener)
                skip_outgoing = configure(sock)
        if mm is None:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            try:  # root may exceed net.core.rmem_max; the plain socket has no ring to absorb bursts
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, block_size * block_count)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, block_size * block_count)
        if promisc:
            mreq = struct.pack("iHH8s", link.index, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        sock.bind((iface, ETH_P_ALL))
        if fanout is not None:
            arg = (fanout & 0xFFFF) | ((PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG) << 16)
            sock.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("I", arg))
    except CaptureError:
        if mm is not None:
            mm.close()
        sock.close()
        raise
    except OSError as exc:
        if mm is not None:
            mm.close()
        sock.close()
        if exc.errno == errno.ENODEV:
            raise CaptureError(f"interface {iface!r} went away while opening it") from None
        raise CaptureError(f"cannot set up capture on {iface}: {exc.strerror or exc}") from None
    return LiveCapture(
        sock, link, linktype, snaplen, mm, block_size, block_count, skip_outgoing, fanout is not None
    )


# -- link monitoring ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """A link went up or down (or away) while capturing."""

    ts: float
    index: int
    name: str
    up: bool  # admin up and operstate UP/UNKNOWN
    operstate: str
    removed: bool = False


class LinkMonitor:
    """Link up/down events from an rtnetlink RTMGRP_LINK subscription.

    Pollable: put `fileno()` in a select/poll set next to the capture and call `poll()`; it only
    reports changes of `up` (netlink also repeats links for unrelated attribute changes). Not
    fatal by design: a capture on a link that went down simply sees nothing until it is back.
    """

    def __init__(self, ifaces: list[str] | None = None) -> None:
        from pyroute2.netlink.rtnl import RTMGRP_LINK
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        # A plain netlink socket parsed with pyroute2's marshal: pyroute2's own IPRoute buffers
        # messages internally, so select() on its fd can miss events.
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, RTMGRP_LINK))
        self._marshal = MarshalRtnl()
        self._names = set(ifaces) if ifaces else None
        # index -> (name, up), taken after subscribing so that no change falls in between
        self._state = {link.index: (link.name, link.up) for link in list_interfaces()}

    def fileno(self) -> int:
        return self._sock.fileno()

    def poll(self, timeout: float = 0.0) -> list[LinkEvent]:
        """Events that arrived, waiting up to `timeout` seconds for the first."""
        events: list[LinkEvent] = []
        wait = timeout
        while select.select([self._sock], [], [], wait)[0]:
            wait = 0.0
            try:
                data = self._sock.recv(1 << 16)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                events += self._resync()  # we fell behind: compare against a fresh dump
                continue
            for msg in self._marshal.parse(data):
                if msg["event"] in ("RTM_NEWLINK", "RTM_DELLINK"):
                    events += self._update(_link_info(msg), removed=msg["event"] == "RTM_DELLINK")
        return events

    def _update(self, link: LinkInfo, removed: bool) -> list[LinkEvent]:
        # A link not seen before counts as down: a new interface is reported when it comes up.
        before = self._state.pop(link.index, None) if removed else self._state.get(link.index)
        up = link.up and not removed
        if not removed:
            self._state[link.index] = (link.name, up)
        if self._names is not None and link.name not in self._names:
            return []
        if not removed and (before or (link.name, False)) == (link.name, up):
            return []
        return [LinkEvent(time.time(), link.index, link.name, up, link.operstate, removed)]

    def _resync(self) -> list[LinkEvent]:
        links = {link.index: link for link in list_interfaces()}
        gone = [
            LinkInfo(index, name, 0, False, False, "DOWN")
            for index, (name, _) in self._state.items()
            if index not in links
        ]
        events = [e for link in gone for e in self._update(link, removed=True)]
        return events + [e for link in links.values() for e in self._update(link, removed=False)]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LinkMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
