"""decode(): every field against scapy's own dissection of the same bytes, the Skip reasons for
each edge case, and that no bytes at all make it raise."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.config import conf
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv46,
)
from scapy.layers.ipsec import AH
from scapy.packet import Packet

from flagd.frames import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    Frames,
)
from flagd.packets import Packets, Skip, decode
from tests import crafted

LINKTYPES = [
    LINKTYPE_NULL,
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    LINKTYPE_LOOP,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL2,
    9,  # PPP: not decoded
]
CASES = crafted.cases()
_EXT = (IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, IPv6ExtHdrFragment, AH)


def batch(*frames: tuple[int, bytes], wirelen: int | None = None) -> Frames:
    return Frames.from_records(
        [
            (float(i), f, len(f) if wirelen is None else wirelen, lt)
            for i, (lt, f) in enumerate(frames)
        ]
    )


def one(linktype: int, frame: bytes, wirelen: int | None = None) -> dict:
    """The decoded fields of a single frame, offsets made relative to the frame."""
    p = decode(batch((linktype, frame), wirelen=wirelen))
    return row(p, 0)


def row(p: Packets, i: int) -> dict:
    base = int(p.frames.offset[i])
    rel = lambda off: int(off) - base if off >= 0 else -1  # noqa: E731
    return dict(
        skip=Skip(int(p.skip[i])),
        version=int(p.version[i]),
        proto=int(p.proto[i]),
        src=bytes(p.src[i]),
        dst=bytes(p.dst[i]),
        sport=int(p.sport[i]),
        dport=int(p.dport[i]),
        tcp_flags=int(p.tcp_flags[i]),
        ip_off=rel(p.ip_off[i]),
        ip_caplen=int(p.ip_caplen[i]),
        l4_off=rel(p.l4_off[i]),
        l4_hdr_len=int(p.l4_hdr_len[i]),
        payload_len=int(p.payload_len[i]),
        wirelen=int(p.wirelen[i]),
        ts=float(p.ts[i]),
    )


def addr16(text: str) -> bytes:
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text)
    return socket.inet_aton(text) + bytes(12)


def scapy_fields(linktype: int, frame: bytes) -> dict:
    """What scapy says about the same bytes, in decode()'s terms."""
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        pkt: Packet = IPv46(frame[4:])
    else:
        pkt = conf.l2types[linktype](frame)
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    ip_off = len(frame) - len(bytes(ip))
    exp = dict(version=ip.version, src=addr16(ip.src), dst=addr16(ip.dst), ip_off=ip_off)
    exp["ip_caplen"] = len(frame) - ip_off
    layer, proto, later_frag = ip.payload, ip.proto if ip.version == 4 else ip.nh, False
    if ip.version == 4:
        later_frag = ip.frag != 0
    while isinstance(layer, _EXT):
        later_frag |= isinstance(layer, IPv6ExtHdrFragment) and layer.offset != 0
        proto, layer = layer.nh, layer.payload
    # scapy stops at a first fragment or after AH; read the transport header from the rest
    if not later_frag and proto in (6, 17) and not isinstance(layer, (TCP, UDP)):
        layer = (TCP if proto == 6 else UDP)(bytes(layer))
    l4_off = len(frame) - len(bytes(layer))
    ip_len = ip.len if ip.version == 4 else 40 + ip.plen
    exp.update(proto=proto, l4_off=l4_off)
    if later_frag:
        exp.update(skip=Skip.FRAGMENT, payload_len=ip_len - (l4_off - ip_off))
    elif isinstance(layer, TCP):
        exp.update(skip=Skip.OK, sport=layer.sport, dport=layer.dport, tcp_flags=int(layer.flags))
        exp.update(l4_hdr_len=layer.dataofs * 4)
    elif isinstance(layer, UDP):
        exp.update(skip=Skip.OK, sport=layer.sport, dport=layer.dport, tcp_flags=0, l4_hdr_len=8)
    else:
        exp.update(skip=Skip.OTHER_PROTO, sport=0, dport=0, l4_hdr_len=0)
    if not later_frag:
        exp["payload_len"] = ip_len - (l4_off - ip_off) - exp["l4_hdr_len"]
    return exp


IP_CASES = [c for c in CASES if c.skip in (Skip.OK, Skip.FRAGMENT, Skip.OTHER_PROTO)]


@pytest.mark.parametrize("case", IP_CASES, ids=lambda c: c.name)
def test_fields_match_scapy(case: crafted.Case) -> None:
    got = one(case.linktype, case.frame)
    exp = scapy_fields(case.linktype, case.frame)
    assert got["skip"] == case.skip
    assert {k: got[k] for k in exp} == exp
    assert got["wirelen"] == len(case.frame)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_skip_reason(case: crafted.Case) -> None:
    assert one(case.linktype, case.frame)["skip"] == case.skip


def test_whole_batch_equals_one_by_one() -> None:
    """Grouping by link type and layout must not mix records up: decode a shuffled mixed batch."""
    order = np.random.default_rng(3).permutation(len(CASES))
    frames = [(CASES[i].linktype, CASES[i].frame) for i in order]
    p = decode(batch(*frames))
    for k, (lt, f) in enumerate(frames):
        got, alone = row(p, k), one(lt, f)
        got.pop("ts"), alone.pop("ts")
        assert got == alone, CASES[order[k]].name


def test_arrays_have_the_documented_dtypes_and_share_the_buffer() -> None:
    fr = batch(*[(c.linktype, c.frame) for c in CASES])
    p = decode(fr)
    n = len(CASES)
    assert len(p) == n and p.frames is fr and p.ts is fr.ts and p.wirelen is fr.wirelen
    expected = dict(skip=np.uint8, version=np.uint8, proto=np.uint8, sport=np.uint16,
                    dport=np.uint16, tcp_flags=np.uint8, ip_off=np.int64, ip_caplen=np.int32,
                    l4_off=np.int64, l4_hdr_len=np.uint8, payload_len=np.int32)  # fmt: skip
    for name, dtype in expected.items():
        arr = getattr(p, name)
        assert arr.dtype == dtype and arr.shape == (n,), name
    assert p.src.dtype == np.uint8 and p.src.shape == (n, 16) and p.dst.shape == (n, 16)


def test_empty_batch() -> None:
    p = decode(Frames.empty())
    assert len(p) == 0 and p.src.shape == (0, 16)


# -- specific behaviours ----------------------------------------------------------------------


def test_ipv4_addresses_fill_the_first_four_bytes() -> None:
    got = one(LINKTYPE_RAW, bytes(crafted.tcp4()))
    assert got["src"] == bytes([10, 1, 2, 3]) + bytes(12)
    assert got["dst"] == bytes([192, 168, 7, 9]) + bytes(12)


def test_ipv4_options_move_the_transport_header() -> None:
    got = one(LINKTYPE_ETHERNET, crafted.ether(crafted.ip4_options()))
    assert (got["ip_off"], got["l4_off"], got["sport"], got["dport"]) == (14, 14 + 28, 1234, 80)
    assert got["payload_len"] == 30


def test_vlan_ids_are_recorded_outer_then_inner() -> None:
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    inner = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"x"
    fr = batch((LINKTYPE_ETHERNET, bytes(eth / inner)),
               (LINKTYPE_ETHERNET, bytes(eth / Dot1Q(vlan=300) / inner)),
               (LINKTYPE_ETHERNET, bytes(eth / Dot1AD(vlan=7) / Dot1Q(vlan=300) / inner)))
    p = decode(fr)
    assert list(p.skip) == [Skip.OK] * 3
    assert list(p.vlan) == [0, 300, (7 << 12) | 300]


def test_mpls_labels_then_ip() -> None:
    from scapy.contrib.mpls import MPLS
    from scapy.layers.l2 import Ether
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x8847)
    pkt = eth / MPLS(label=16, s=0) / MPLS(label=17, s=1) / IP(src="10.0.0.1", dst="10.0.0.2") \
        / TCP(sport=179, dport=40000) / b"bgp"
    got = one(LINKTYPE_ETHERNET, bytes(pkt))
    assert (got["skip"], got["ip_off"], got["sport"], got["payload_len"]) == (Skip.OK, 22, 179, 3)


def test_cisco_hdlc_carries_an_ethertype() -> None:
    from flagd.packets import LINKTYPE_C_HDLC
    ip = bytes(IP(src="2.2.2.2", dst="5.5.5.5") / TCP(sport=179, dport=49433) / b"open")
    got = one(LINKTYPE_C_HDLC, b"\x0f\x00\x08\x00" + ip)
    assert (got["skip"], got["ip_off"], got["dport"]) == (Skip.OK, 4, 49433)


def test_ip_in_ip_and_6in4_decode_the_inner_packet() -> None:
    inner4 = IP(src="10.10.100.25", dst="10.10.101.2") / UDP(sport=62367, dport=17000) / b"q"
    inner6 = IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=60205, dport=443) / b"tls"
    outer = IP(src="192.0.2.1", dst="192.0.2.2")
    for pkt, version, off, port in ((outer / inner4, 4, 20, 62367), (outer / inner6, 6, 20, 60205),
                                    (IPv6() / inner4, 4, 40, 62367)):
        got = one(LINKTYPE_RAW, bytes(pkt))
        assert (got["skip"], got["version"], got["ip_off"], got["sport"]) == (Skip.OK, version,
                                                                               off, port)
        assert got["payload_len"] == len(pkt.payload.payload.payload)


def test_non_first_fragments_keep_addresses_and_proto() -> None:
    for frame in (crafted.ether(crafted.frag4(False)), crafted.ether(crafted.ip6_ext_chain(185))):
        got = one(LINKTYPE_ETHERNET, frame)
        assert got["skip"] == Skip.FRAGMENT
        assert got["version"] in (4, 6) and got["src"] != bytes(16) and got["sport"] == 0


def test_snaplen_cut_still_counts_wire_payload() -> None:
    """A record cut by the snaplen: payload_len comes from the IP total length."""
    frame = crafted.ether(crafted.tcp4(b"p" * 1000))
    got = one(LINKTYPE_ETHERNET, frame[:96], wirelen=len(frame))
    assert got["skip"] == Skip.OK and got["payload_len"] == 1000
    assert got["ip_caplen"] == 96 - 14 and got["wirelen"] == len(frame)


def test_tcp_header_cut_after_the_flags_is_still_usable() -> None:
    frame = crafted.ether(crafted.tcp_with_options())
    got = one(LINKTYPE_ETHERNET, frame[: 14 + 20 + 14])
    assert got["skip"] == Skip.OK and got["l4_hdr_len"] == 40 and got["tcp_flags"] == 0x02
    assert one(LINKTYPE_ETHERNET, frame[: 14 + 20 + 13])["skip"] == Skip.TRUNCATED


def test_udp_needs_its_ports() -> None:
    frame = bytes(crafted.udp4())
    assert one(LINKTYPE_IPV4, frame[:24])["sport"] == 5353
    assert one(LINKTYPE_IPV4, frame[:23])["skip"] == Skip.TRUNCATED


def test_total_length_below_header_uses_the_wire_length() -> None:
    """TSO/GSO captures write total length 0: not BAD_IP, the payload comes from the capture."""
    frame = bytearray(bytes(crafted.tcp4(b"d" * 100)))
    frame[2:4] = b"\0\0"
    got = one(LINKTYPE_IPV4, bytes(frame))
    assert got["skip"] == Skip.OK and got["payload_len"] == 100


def test_total_length_beyond_the_wire_is_capped() -> None:
    frame = bytearray(bytes(crafted.udp4(b"u" * 10)))
    frame[2:4] = struct.pack(">H", 60000)
    got = one(LINKTYPE_IPV4, bytes(frame))
    assert got["skip"] == Skip.OK and got["payload_len"] == 10


def test_ipv6_payload_length_zero_uses_the_wire_length() -> None:
    frame = bytearray(bytes(crafted.udp6(b"j" * 50)))
    frame[4:6] = b"\0\0"
    assert one(LINKTYPE_IPV6, bytes(frame))["payload_len"] == 50


@pytest.mark.parametrize(
    ("linktype", "frame", "skip"),
    [
        (LINKTYPE_RAW, b"\x55" + bytes(39), Skip.BAD_IP),  # version 5
        (LINKTYPE_IPV4, bytes(crafted.tcp6()), Skip.BAD_IP),  # link says v4, header says 6
        (LINKTYPE_IPV6, bytes(crafted.tcp4()), Skip.BAD_IP),
        (LINKTYPE_IPV4, b"\x44" + bytes(crafted.tcp4())[1:], Skip.BAD_IP),  # IHL 4
        (LINKTYPE_RAW, b"", Skip.TRUNCATED),
        (LINKTYPE_NULL, b"\2\0", Skip.TRUNCATED),
        (LINKTYPE_LOOP, struct.pack("<I", 2) + bytes(crafted.tcp4()), Skip.NON_IP),  # wrong order
        (LINKTYPE_LINUX_SLL, bytes(15), Skip.TRUNCATED),
        (LINKTYPE_LINUX_SLL2, bytes(19), Skip.TRUNCATED),
        (147, crafted.ether(crafted.tcp4()), Skip.UNKNOWN_LINK),
        (LINKTYPE_ETHERNET, crafted.ether(crafted.tcp4(), [(0x8100, 1)] * 9), Skip.NON_IP),
    ],
)
def test_malformed_frames(linktype: int, frame: bytes, skip: Skip) -> None:
    assert one(linktype, frame)["skip"] == skip


def test_ipv4_options_cut_by_the_capture_are_truncated() -> None:
    frame = bytes(crafted.ip4_options())
    got = one(LINKTYPE_IPV4, frame[:24])
    assert got["skip"] == Skip.TRUNCATED and got["version"] == 4


def test_ipv6_extension_chain_cut_is_truncated() -> None:
    frame = bytes(crafted.ip6_ext_chain())
    for cut in (41, 40 + 8 + 1, 40 + 8 + 8 + 8 + 7):
        assert one(LINKTYPE_IPV6, frame[:cut])["skip"] == Skip.TRUNCATED, cut


def test_endless_ipv6_extension_chain_is_other_proto() -> None:
    hop = bytes([0, 0]) + bytes(6)  # hop-by-hop pointing at another hop-by-hop, forever
    frame = bytes(crafted.udp6())[:40]
    frame = frame[:6] + b"\0" + frame[7:] + hop * 20
    got = one(LINKTYPE_IPV6, frame)
    assert got["skip"] == Skip.OTHER_PROTO and got["proto"] == 0


def test_inconsistent_batch_does_not_read_outside_the_buffer() -> None:
    fr = batch((LINKTYPE_IPV4, bytes(crafted.tcp4())))
    fr.caplen[:] = 10_000  # claims more than the buffer holds
    assert decode(fr).skip[0] == Skip.OK
    fr.offset[:] = 5_000
    assert decode(fr).skip[0] == Skip.TRUNCATED


# -- property tests ---------------------------------------------------------------------------


def check_invariants(p: Packets) -> None:
    fr = p.frames
    assert set(np.unique(p.skip).tolist()) <= {int(s) for s in Skip}
    start, end = fr.offset, fr.offset + fr.caplen
    ok = p.skip == Skip.OK
    assert np.isin(p.version[ok], (4, 6)).all()
    assert np.isin(p.proto[ok], (6, 17)).all()
    assert ((p.l4_off[ok] >= start[ok]) & (p.l4_off[ok] + 4 <= end[ok])).all()
    has_ip = p.ip_off >= 0
    assert ((p.ip_off[has_ip] >= start[has_ip]) & (p.ip_off[has_ip] <= end[has_ip])).all()
    assert (p.ip_caplen[has_ip] == (end - p.ip_off)[has_ip]).all()
    assert (p.payload_len >= 0).all()
    assert ((p.sport == 0) | ok).all()
    assert (p.src[p.version == 4, 4:] == 0).all()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LINKTYPES), st.binary(max_size=120)), max_size=8))
def test_arbitrary_bytes_never_raise(frames: list[tuple[int, bytes]]) -> None:
    check_invariants(decode(batch(*frames)))


@st.composite
def mutated_case(draw: st.DrawFn) -> tuple[int, bytes]:
    """A crafted frame with some bytes overwritten and maybe cut short: near-valid headers reach
    the deeper decoding paths that random bytes rarely do."""
    case = draw(st.sampled_from(CASES))
    frame = bytearray(case.frame)
    for _ in range(draw(st.integers(0, 4))):
        if frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(frame)))
    linktype = draw(st.sampled_from([case.linktype] * 4 + LINKTYPES))
    return linktype, bytes(frame[:cut] if draw(st.booleans()) else frame)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_case(), min_size=1, max_size=6))
def test_mutated_frames_never_raise_and_batch_like_alone(frames: list[tuple[int, bytes]]) -> None:
    p = decode(batch(*frames))
    check_invariants(p)
    for k, (lt, f) in enumerate(frames):
        got, alone = row(p, k), one(lt, f)
        got.pop("ts"), alone.pop("ts")
        assert got == alone
