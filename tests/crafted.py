"""Frames and capture files built for tests: scapy-crafted packets for every link type flagd
decodes, plus small pcap/pcapng writers (written here with struct because scapy's writers do not
cover big-endian files, nanosecond pcap, several interfaces or the old packet blocks).

Import it as `from tests import crafted`. Frame builders return plain bytes, so a test can
print what it decoded.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw, bind_layers

from flagd.frames import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
)

# scapy knows 802.1Q and 802.1ad but not the pre-standard QinQ ethertype 0x9100; teach it, so
# that its dissection of our QinQ frames can serve as the reference.
bind_layers(Ether, Dot1Q, type=0x9100)
bind_layers(Dot1Q, Dot1Q, type=0x9100)

SRC4, DST4 = "10.1.2.3", "192.168.7.9"
SRC6, DST6 = "2001:db8::1", "2001:db8:ffff::2"
MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


# -- network and transport layers -------------------------------------------------------------


def tcp4(
    payload: bytes = b"hello",
    sport: int = 40000,
    dport: int = 443,
    flags: str = "PA",
    options: Sequence[tuple] = (),
) -> Packet:
    return (
        IP(src=SRC4, dst=DST4)
        / TCP(sport=sport, dport=dport, flags=flags, options=list(options))
        / Raw(payload)
    )


def udp4(payload: bytes = b"q" * 12, sport: int = 5353, dport: int = 53) -> Packet:
    return IP(src=SRC4, dst=DST4) / UDP(sport=sport, dport=dport) / Raw(payload)


def tcp6(
    payload: bytes = b"hello6", sport: int = 40001, dport: int = 443, flags: str = "S"
) -> Packet:
    return IPv6(src=SRC6, dst=DST6) / TCP(sport=sport, dport=dport, flags=flags) / Raw(payload)


def udp6(payload: bytes = b"u" * 20, sport: int = 4433, dport: int = 443) -> Packet:
    return IPv6(src=SRC6, dst=DST6) / UDP(sport=sport, dport=dport) / Raw(payload)


def ip4_options() -> Packet:
    """IPv4 with 8 bytes of options (IHL 7): record route + padding."""
    return (
        IP(src=SRC4, dst=DST4, options=b"\x07\x07\x04\x00\x00\x00\x00\x00")
        / TCP(sport=1234, dport=80, flags="A")
        / Raw(b"x" * 30)
    )


def tcp_with_options() -> Packet:
    """TCP SYN with MSS, SACK-permitted, timestamps and window scale (data offset 10)."""
    return tcp4(
        b"",
        flags="S",
        options=[
            ("MSS", 1460),
            ("SAckOK", b""),
            ("Timestamp", (1, 0)),
            ("NOP", None),
            ("WScale", 7),
        ],
    )


def frag4(first: bool) -> Packet:
    """One IPv4 fragment of a 100-byte UDP datagram: the first (with ports) or the second."""
    if first:
        return (
            IP(src=SRC4, dst=DST4, id=7, flags="MF", frag=0, proto=17)
            / UDP(sport=5000, dport=6000, len=108)
            / Raw(b"a" * 40)
        )
    return IP(src=SRC4, dst=DST4, id=7, frag=6, proto=17) / Raw(b"b" * 60)


def ip6_ext_chain(frag_offset: int = 0, more: int = 1, with_ah: bool = False) -> Packet:
    """IPv6 + hop-by-hop + destination options + routing + fragment (+ AH) + TCP."""
    chain = (
        IPv6(src=SRC6, dst=DST6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting()
        / IPv6ExtHdrFragment(offset=frag_offset, m=more, id=99)
    )
    if with_ah:
        chain = chain / AH(nh=6, payloadlen=4, spi=1, icv=b"\0" * 12)
    if frag_offset:
        return chain / Raw(b"z" * 24)
    return chain / TCP(sport=8443, dport=51000, flags="SA") / Raw(b"ext")


def icmp4() -> Packet:
    return IP(src=SRC4, dst=DST4) / ICMP() / Raw(b"ping" * 4)


# -- link layers ------------------------------------------------------------------------------


def ether(l3: Packet | bytes, vlans: Sequence[tuple[int, int]] = ()) -> bytes:
    """Ethernet frame; `vlans` is a list of (tag ethertype, vlan id), outermost first."""
    frame: Packet = Ether(src=MAC_A, dst=MAC_B)
    for i, (tpid, vid) in enumerate(vlans):
        if i == 0:
            frame.type = tpid
        else:
            frame.lastlayer().type = tpid
        frame = frame / (Dot1AD(vlan=vid) if tpid == 0x88A8 else Dot1Q(vlan=vid))
    return bytes(frame / l3)


def sll(l3: Packet) -> bytes:
    proto = 0x86DD if isinstance(l3, IPv6) else 0x0800
    return bytes(
        CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6, src=b"\2" * 6 + b"\0\0", proto=proto) / l3
    )


def sll2(l3: Packet) -> bytes:
    proto = 0x86DD if isinstance(l3, IPv6) else 0x0800
    return bytes(
        CookedLinuxV2(proto=proto, ifindex=3, lladdrtype=1, lladdrlen=6, src=b"\2" * 6 + b"\0\0")
        / l3
    )


def null(l3: Packet | bytes, family: int | None = None, order: str = "<") -> bytes:
    """BSD loopback: a 4-byte address family in the capturing host's byte order."""
    if family is None:
        family = 24 if isinstance(l3, IPv6) else 2
    return struct.pack(order + "I", family) + bytes(l3)


def loop(l3: Packet | bytes) -> bytes:
    """OpenBSD loopback: the address family in network byte order."""
    return struct.pack(">I", 24 if isinstance(l3, IPv6) else 2) + bytes(l3)


@dataclass(frozen=True)
class Case:
    """A crafted frame, the link type it is captured under, and what decode must say."""

    name: str
    linktype: int
    frame: bytes
    skip: int  # expected flagd.packets.Skip value


def cases() -> list[Case]:
    """One frame per link type and edge case."""
    ok, trunc, non_ip, frag, other = 0, 1, 3, 5, 6
    t4, u4, t6, u6 = tcp4(), udp4(), tcp6(), udp6()
    eth_t4 = ether(t4)
    out = [
        Case("eth_tcp4", LINKTYPE_ETHERNET, eth_t4, ok),
        Case("eth_udp4", LINKTYPE_ETHERNET, ether(u4), ok),
        Case("eth_tcp6", LINKTYPE_ETHERNET, ether(t6), ok),
        Case("eth_udp6", LINKTYPE_ETHERNET, ether(u6), ok),
        Case("dot1q_tcp4", LINKTYPE_ETHERNET, ether(t4, [(0x8100, 10)]), ok),
        Case("qinq_88a8_udp6", LINKTYPE_ETHERNET, ether(u6, [(0x88A8, 100), (0x8100, 10)]), ok),
        Case("qinq_9100_tcp4", LINKTYPE_ETHERNET, ether(t4, [(0x9100, 5), (0x8100, 6)]), ok),
        Case(
            "triple_tag_udp4",
            LINKTYPE_ETHERNET,
            ether(u4, [(0x88A8, 1), (0x8100, 2), (0x8100, 3)]),
            ok,
        ),
        Case("sll_tcp4", LINKTYPE_LINUX_SLL, sll(t4), ok),
        Case("sll_udp6", LINKTYPE_LINUX_SLL, sll(u6), ok),
        Case("sll2_udp4", LINKTYPE_LINUX_SLL2, sll2(u4), ok),
        Case("sll2_tcp6", LINKTYPE_LINUX_SLL2, sll2(t6), ok),
        Case("raw101_tcp4", LINKTYPE_RAW, bytes(t4), ok),
        Case("raw101_udp6", LINKTYPE_RAW, bytes(u6), ok),
        Case("raw228_udp4", LINKTYPE_IPV4, bytes(u4), ok),
        Case("raw229_tcp6", LINKTYPE_IPV6, bytes(t6), ok),
        Case("null_le_tcp4", LINKTYPE_NULL, null(t4, order="<"), ok),
        Case("null_be_tcp4", LINKTYPE_NULL, null(t4, order=">"), ok),
        Case("null_le_udp6_24", LINKTYPE_NULL, null(u6, 24, "<"), ok),
        Case("null_le_tcp6_28", LINKTYPE_NULL, null(t6, 28, "<"), ok),
        Case("null_be_udp6_30", LINKTYPE_NULL, null(u6, 30, ">"), ok),
        Case("loop_tcp4", LINKTYPE_LOOP, loop(t4), ok),
        Case("loop_udp6", LINKTYPE_LOOP, loop(u6), ok),
        Case("ip4_options", LINKTYPE_ETHERNET, ether(ip4_options()), ok),
        Case("tcp_options", LINKTYPE_ETHERNET, ether(tcp_with_options()), ok),
        Case("frag4_first", LINKTYPE_ETHERNET, ether(frag4(True)), ok),
        Case("frag4_later", LINKTYPE_ETHERNET, ether(frag4(False)), frag),
        Case("ip6_ext_first_frag", LINKTYPE_ETHERNET, ether(ip6_ext_chain()), ok),
        Case("ip6_ext_ah", LINKTYPE_RAW, bytes(ip6_ext_chain(with_ah=True)), ok),
        Case("ip6_ext_later_frag", LINKTYPE_ETHERNET, ether(ip6_ext_chain(frag_offset=185)), frag),
        Case("icmp4", LINKTYPE_ETHERNET, ether(icmp4()), other),
        Case(
            "arp",
            LINKTYPE_ETHERNET,
            bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=SRC4, pdst=DST4)),
            non_ip,
        ),
        Case("null_unknown_family", LINKTYPE_NULL, null(t4, family=7), non_ip),
        # truncated: Ethernet header cut, IPv4 header cut, TCP ports+flags cut (13 of 14 bytes)
        Case("trunc_eth", LINKTYPE_ETHERNET, eth_t4[:10], trunc),
        Case("trunc_ip4", LINKTYPE_ETHERNET, eth_t4[: 14 + 19], trunc),
        Case("trunc_tcp", LINKTYPE_ETHERNET, eth_t4[: 14 + 20 + 13], trunc),
        Case("trunc_vlan", LINKTYPE_ETHERNET, ether(t4, [(0x8100, 10)])[:16], trunc),
        Case("trunc_ip6", LINKTYPE_RAW, bytes(t6)[:39], trunc),
    ]
    return out


# -- capture file writers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One record to write: timestamp (s), captured bytes, wire length (None: len(data))."""

    ts: float
    data: bytes
    wirelen: int | None = None
    interface: int = 0  # pcapng interface index


def _ts_parts(ts: float, units: int) -> tuple[int, int]:
    whole = int(ts)
    frac = round((ts - whole) * units)
    if frac >= units:  # rounding carried into the next second
        whole, frac = whole + 1, frac - units
    return whole, frac


def pcap_bytes(
    records: Iterable[Record],
    linktype: int,
    big_endian: bool = False,
    nanos: bool = False,
    snaplen: int = 262144,
) -> bytes:
    """A classic pcap file: little or big endian, microsecond or nanosecond timestamps."""
    o = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = [struct.pack(o + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    units = 1_000_000_000 if nanos else 1_000_000
    for r in records:
        sec, frac = _ts_parts(r.ts, units)
        wl = len(r.data) if r.wirelen is None else r.wirelen
        out.append(struct.pack(o + "IIII", sec, frac, len(r.data), wl) + r.data)
    return b"".join(out)


def write_pcap(path: Path, records: Iterable[Record], linktype: int, **kw: object) -> Path:
    path.write_bytes(pcap_bytes(records, linktype, **kw))  # type: ignore[arg-type]
    return path


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def pcapng_block(btype: int, body: bytes, o: str = "<") -> bytes:
    """One pcapng block: type, total length, body padded to 4 bytes, total length."""
    body = _pad4(body)
    n = len(body) + 12
    return struct.pack(o + "II", btype, n) + body + struct.pack(o + "I", n)


def _option(code: int, value: bytes, o: str) -> bytes:
    return struct.pack(o + "HH", code, len(value)) + _pad4(value)


@dataclass(frozen=True)
class Interface:
    """A pcapng interface. tsresol is the raw if_tsresol byte (6: microseconds, 9: ns,
    0x80 | k: 2**-k); None omits the option (default microseconds)."""

    linktype: int
    tsresol: int | None = None
    tsoffset: int = 0
    snaplen: int = 0


def _units(tsresol: int | None) -> float:
    if tsresol is None:
        return 1e6
    return 2.0 ** (tsresol & 0x7F) if tsresol & 0x80 else 10.0**tsresol


def pcapng_section(
    interfaces: Sequence[Interface],
    records: Iterable[Record],
    big_endian: bool = False,
    block: str = "epb",
    extra_blocks: bool = False,
) -> bytes:
    """One pcapng section: SHB, the IDBs, then one packet block per record.

    block: "epb", "spb" (simple: no timestamp, interface 0 only) or "pb" (obsolete packet block).
    extra_blocks: add blocks a reader must skip (name resolution, statistics, custom).
    """
    o = ">" if big_endian else "<"
    out = [pcapng_block(0x0A0D0D0A, struct.pack(o + "IHHq", 0x1A2B3C4D, 1, 0, -1), o)]
    for itf in interfaces:
        opts = b""
        if itf.tsresol is not None:
            opts += _option(9, bytes([itf.tsresol]), o)
        if itf.tsoffset:
            opts += _option(14, struct.pack(o + "q", itf.tsoffset), o)
        opts += _option(2, b"eth-test", o)  # if_name: an option the reader ignores
        if opts:
            opts += struct.pack(o + "HH", 0, 0)
        out.append(pcapng_block(1, struct.pack(o + "HHI", itf.linktype, 0, itf.snaplen) + opts, o))
    if extra_blocks:
        out.append(pcapng_block(4, struct.pack(o + "HH", 0, 0), o))  # empty name resolution
        out.append(pcapng_block(0x40000BAD, struct.pack(o + "I", 32473) + b"custom", o))
    for r in records:
        wl = len(r.data) if r.wirelen is None else r.wirelen
        if block == "spb":
            out.append(pcapng_block(3, struct.pack(o + "I", wl) + r.data, o))
            continue
        itf = interfaces[r.interface]
        units = _units(itf.tsresol)
        t = round((r.ts - itf.tsoffset) * units)
        hi, lo = t >> 32, t & 0xFFFFFFFF
        if block == "pb":
            head = struct.pack(o + "HHIIII", r.interface, 0, hi, lo, len(r.data), wl)
        else:
            head = struct.pack(o + "IIIII", r.interface, hi, lo, len(r.data), wl)
        out.append(pcapng_block(6 if block == "epb" else 2, head + r.data, o))
    if extra_blocks:
        # interface statistics block for interface 0: timestamp + end of options
        out.append(pcapng_block(5, struct.pack(o + "III", 0, 0, 0), o))
    return b"".join(out)


def write_pcapng(
    path: Path, interfaces: Sequence[Interface], records: Iterable[Record], **kw: object
) -> Path:
    path.write_bytes(pcapng_section(interfaces, records, **kw))  # type: ignore[arg-type]
    return path


# -- benchmark traffic ------------------------------------------------------------------------


def benchmark_records(n_packets: int = 200_000, n_flows: int = 4000, seed: int = 1) -> list[Record]:
    """Small TCP/UDP Ethernet frames over `n_flows` IPv4 5-tuples, both directions, 1 ms apart.

    Headers are packed with struct from one scapy-built template per protocol (building 200k
    scapy objects would take minutes; the bytes are the same).
    """
    rng = random.Random(seed)
    tcp_t = bytearray(ether(tcp4(b"\0" * 32, flags="PA")))
    udp_t = bytearray(ether(udp4(b"\0" * 48)))
    flows = []
    for i in range(n_flows):
        a = bytes([10, (i >> 8) & 0xFF, i & 0xFF, 2])
        b = bytes([172, 16, rng.randrange(256), rng.randrange(1, 255)])
        flows.append(
            (
                rng.random() < 0.7,
                a,
                b,
                rng.randrange(1024, 65535),
                rng.choice((443, 80, 53, 8443, 3478)),
            )
        )
    out = []
    for k in range(n_packets):
        is_tcp, a, b, sp, dp = flows[rng.randrange(n_flows)]
        frame = bytearray(tcp_t if is_tcp else udp_t)
        if rng.random() < 0.5:
            a, b, sp, dp = b, a, dp, sp
        frame[26:30], frame[30:34] = a, b
        struct.pack_into(">HH", frame, 34, sp, dp)
        out.append(Record(1_700_000_000 + k * 0.001, bytes(frame)))
    return out
