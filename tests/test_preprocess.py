"""The paper's section 3.1 on crafted packets: masking, UDP padding, relevance rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from flagd.frames import LINKTYPE_ETHERNET, Frames
from flagd.packets import decode
from flagd.preprocess import DEFAULT_RULES, EXTRA_MASKS, Preprocessing, RuleTable, model_bytes

# Explicit addresses: scapy would otherwise look up routes and neighbours for every packet.
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def model_input(pkt, pre: Preprocessing | None = None) -> bytes:
    pre = pre or Preprocessing()
    raw = bytes(ETH / pkt)
    p = decode(Frames.from_records([(0.0, raw, len(raw), LINKTYPE_ETHERNET)]))
    assert p.skip[0] == 0
    return model_bytes(p.frames.data, int(p.ip_off[0]), int(p.ip_caplen[0]), int(p.l4_off[0]),
                       int(p.l4_hdr_len[0]), int(p.version[0]), int(p.proto[0]), pre)


def test_link_layer_removed_and_ipv4_addresses_zeroed():
    pkt = IP(src="198.51.100.9", dst="203.0.113.9") / TCP(sport=1234, dport=443) / b"hello"
    out = model_input(pkt)
    want = bytearray(bytes(pkt))
    want[12:20] = bytes(8)
    assert out == bytes(want)


def test_udp_header_padded_to_tcp_length():
    pkt = IP(src="198.51.100.9", dst="203.0.113.9") / UDP(sport=5000, dport=6000) / b"payload"
    out = model_input(pkt)
    raw = bytes(pkt)
    assert out[20:28] == raw[20:28]  # the UDP header itself
    assert out[28:40] == bytes(12)  # zero padding to 20 bytes
    assert out[40:] == b"payload"


def test_ipv6_addresses_zeroed():
    pkt = IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=1, dport=2) / b"z"
    out = model_input(pkt)
    assert out[8:40] == bytes(32) and out[:8] == bytes(pkt)[:8] and out[40:] == bytes(pkt)[40:]


def test_packet_bytes_cap():
    pkt = IP(src="198.51.100.9", dst="203.0.113.9") / UDP() / bytes(range(200))
    assert len(model_input(pkt, Preprocessing(packet_bytes=64))) == 64


def test_extra_masks_zero_every_shortcut_field():
    pkt = (IP(src="198.51.100.9", dst="203.0.113.9", id=0xBEEF, ttl=77)
           / TCP(sport=1234, dport=443, seq=0x11223344, ack=0x55667788,
                 options=[("NOP", None), ("NOP", None), ("Timestamp", (0xAABBCCDD, 0x01020304))])
           / b"data")
    raw = bytes(pkt)
    out = model_input(pkt, Preprocessing.honest())
    assert out[4:6] == b"\0\0" and out[8] == 0 and out[10:12] == b"\0\0"  # IP id, TTL, checksum
    assert out[20:32] == bytes(12)  # ports, seq, ack
    assert out[36:38] == b"\0\0"  # TCP checksum
    assert out[44:52] == bytes(8)  # TSval, TSecr
    assert out[42:44] == raw[42:44]  # option kind and length kept
    assert out.endswith(b"data")


def test_relevance_rules_on_ports_and_empty_tcp():
    rt = RuleTable.compile(DEFAULT_RULES)
    proto = np.array([17, 17, 6, 6, 17, 17, 6, 17], np.uint8)
    sport = np.array([5353, 40000, 40000, 53, 40000, 17500, 40000, 40000], np.uint16)
    dport = np.array([1, 123, 443, 40000, 443, 17500, 443, 427], np.uint16)
    plen = np.array([10, 10, 10, 10, 10, 10, 0, 10], np.int32)
    names = [rt.name(c) if c else None for c in rt.codes(proto, sport, dport, plen)]
    assert names == ["mdns", "ntp", None, "dns", None, None, "tcp-no-payload", None]
    rt2 = RuleTable.compile((*DEFAULT_RULES, "lan-discovery"))
    codes = rt2.codes(proto, sport, dport, plen)
    assert rt2.name(codes[5]) == rt2.name(codes[7]) == "lan-discovery"  # Dropbox, SLP


def test_unknown_rule_and_mask_are_errors():
    with pytest.raises(ValueError, match="unknown relevance rule"):
        Preprocessing(rules=("dns", "bogus"))
    with pytest.raises(ValueError, match="unknown mask"):
        Preprocessing(extra_masks=("ip",))
    assert set(Preprocessing.honest().extra_masks) == set(EXTRA_MASKS)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4, max_size=4).filter(lambda a: len(set(a)) > 1),
       st.binary(min_size=4, max_size=4).filter(lambda a: len(set(a)) > 1),
       st.sampled_from(["tcp", "udp"]), st.binary(max_size=300), st.sampled_from([4, 6]))
def test_masking_leaves_no_address_bytes(a, b, kind, payload, version):
    """No copy of the original addresses survives where they were in the header."""
    import socket
    if version == 4:
        ip = IP(src=socket.inet_ntoa(a), dst=socket.inet_ntoa(b))
        addr_span = slice(12, 20)
    else:
        ip = IPv6(src=socket.inet_ntop(socket.AF_INET6, a * 4), dst=socket.inet_ntop(socket.AF_INET6, b * 4))
        addr_span = slice(8, 40)
    l4 = TCP(sport=1000, dport=2000) if kind == "tcp" else UDP(sport=1000, dport=2000)
    out = model_input(ip / l4 / payload)
    assert out[addr_span] == bytes(addr_span.stop - addr_span.start)
    header = out[: 40 if version == 4 else 60]
    assert (a not in header) and (b not in header)
