"""IP fragment reassembly in the flow meter: the datagram the kernel would build, bounds, counts."""

from __future__ import annotations

from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Ether

from flagd.flows import END, FlowSettings, FlowTable
from flagd.frames import LINKTYPE_ETHERNET, Frames
from flagd.packets import Skip, decode
from flagd.reassembly import Reassembler, ReassemblySettings

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
C, S = "198.51.100.1", "203.0.113.7"
C6, S6 = "2001:db8::1", "2001:db8::2"


def frames(pkts: list[tuple[float, object]]) -> Frames:
    return Frames.from_records([(t, bytes(ETH / p), len(ETH / p), LINKTYPE_ETHERNET)
                                for t, p in pkts])


def udp4(payload: bytes, ident: int = 7, sport: int = 5000) -> IP:
    return IP(src=C, dst=S, id=ident) / UDP(sport=sport, dport=6000) / payload


def udp6(payload: bytes, ident: int = 7) -> IPv6:
    return IPv6(src=C6, dst=S6) / IPv6ExtHdrFragment(id=ident) / UDP(sport=5000, dport=6000) / payload


def whole4(pkt: IP) -> bytes:
    """What the kernel hands on after reassembly: the datagram with fragment fields cleared."""
    p = IP(bytes(pkt))
    p.flags, p.frag, p.chksum = 0, 0, None
    return bytes(ETH / IP(bytes(p)))


def table_run(pkts, **settings) -> tuple[FlowTable, list]:
    table = FlowTable(FlowSettings(**settings))
    out = table.add(decode(frames(pkts)))
    return table, out + table.flush()


def test_ipv4_fragments_out_of_order_become_the_kernels_datagram():
    pkt = udp4(bytes(range(256)) * 8)
    frags = fragment(pkt, fragsize=512)
    assert len(frags) == 5
    order = [2, 0, 4, 1, 3]
    r = Reassembler()
    p = r.feed(decode(frames([(1.0 + k, frags[j]) for k, j in enumerate(order)])), 0.0)
    assert len(p) == 1 and p.skip[0] == Skip.OK and not r.pending and r.skipped == {}
    got = bytes(p.frames.data[p.frames.offset[0]:p.frames.offset[0] + p.frames.caplen[0]])
    assert got == whole4(pkt)
    assert p.ts[0] == 5.0 and p.wirelen[0] == len(got)
    assert (p.sport[0], p.dport[0], p.payload_len[0]) == (5000, 6000, 2048)


def test_ipv6_fragments_lose_the_fragment_header():
    pkt = udp6(b"\xab" * 3000)
    frags = fragment6(pkt, 1280)
    assert len(frags) == 3
    r = Reassembler()
    p = r.feed(decode(frames([(1.0 + k, f) for k, f in enumerate(reversed(frags))])), 0.0)
    assert len(p) == 1 and p.skip[0] == Skip.OK
    got = bytes(p.frames.data[p.frames.offset[0]:p.frames.offset[0] + p.frames.caplen[0]])
    want = IPv6(src=C6, dst=S6) / UDP(sport=5000, dport=6000) / (b"\xab" * 3000)
    want = IPv6(bytes(want))  # UDP checksum computed without the fragment header, as sent
    assert IPv6(got[14:]).nh == 17 and got[14 + 40:] == bytes(udp6(b"\xab" * 3000))[48:]
    assert len(got) == len(ETH / want) and IPv6(got[14:]).plen == 8 + 3000


def test_fragmented_flow_counts_one_packet_per_datagram_in_place():
    big = fragment(udp4(b"x" * 3000), fragsize=1000)  # 4 fragments
    small = [udp4(b"y" * 20, ident=k + 10) for k in range(3)]
    pkts = [(0.0, small[0])] + [(0.1 + k / 100, f) for k, f in enumerate(big)] + \
        [(0.2, small[1]), (0.3, small[2])]
    table, out = table_run(pkts, ready_packets=5)
    (f,) = [f for kind, f in out if kind == END]
    assert f.pkts_toserver == 4 and f.relevant == 4
    assert [side[1] for side in f.sides] == [len(ETH / small[0]), len(ETH / udp4(b"x" * 3000)),
                                             len(ETH / small[1]), len(ETH / small[2])]
    assert table.stats.skipped == {}


def test_overlapping_fragments_discard_the_datagram_and_are_counted():
    a, b = fragment(udp4(b"z" * 64), fragsize=32)[:2]
    bad = IP(bytes(b))
    bad.frag -= 1  # starts 8 bytes into the previous fragment
    bad.chksum = None
    table, out = table_run([(0.0, a), (0.1, IP(bytes(bad)))])
    assert out == []
    assert table.stats.skipped == {"frag_overlap": 2}


def test_repeated_fragment_is_dropped_alone():
    frags = fragment(udp4(b"z" * 64), fragsize=32)
    table, out = table_run([(0.0, frags[0]), (0.1, frags[0]), (0.2, frags[1]), (0.3, frags[2])])
    (f,) = [f for kind, f in out if kind == END]
    assert f.pkts_toserver == 1 and table.stats.skipped == {"frag_overlap": 1}


def test_incomplete_datagram_times_out_on_the_meter_clock():
    frags = fragment(udp4(b"q" * 64), fragsize=32)
    table = FlowTable()
    table.add(decode(frames([(0.0, frags[0]), (0.1, frags[1])])))
    assert len(table.reassembler) == 1
    table.tick(29.9)
    assert len(table.reassembler) == 1
    table.tick(30.5)
    assert len(table.reassembler) == 0 and table.stats.skipped == {"frag_timeout": 2}
    # the missing fragment alone, later, starts a datagram of its own that never completes
    table.add(decode(frames([(31.0, frags[2])])))
    assert table.flush() == [] and table.stats.skipped == {"frag_timeout": 3}


def test_a_fragment_after_the_timeout_in_the_same_batch_starts_over():
    frags = fragment(udp4(b"q" * 64), fragsize=32)
    table = FlowTable()
    out = table.add(decode(frames([(0.0, frags[0]), (0.1, frags[1]), (40.0, frags[2])])))
    assert out == [] and table.stats.skipped == {"frag_timeout": 2}
    assert len(table.reassembler) == 1  # the late fragment waits for a new datagram


def test_bounds_on_datagrams_held_and_fragments_per_datagram():
    r = Reassembler(ReassemblySettings(max_datagrams=2, max_fragments=3))
    firsts = [fragment(udp4(b"w" * 64, ident=k), fragsize=32)[0] for k in range(3)]
    r.feed(decode(frames([(0.0, f) for f in firsts])), 0.0)
    assert len(r) == 2 and r.skipped == {"frag_limit": 1}  # the oldest was given up
    many = fragment(udp4(b"m" * 160, ident=99), fragsize=32)  # 6 fragments
    r.feed(decode(frames([(1.0, f) for f in many])), 0.0)
    assert r.skipped["frag_limit"] > 1 and (4, None) not in r.pending


def test_batches_without_fragments_pass_through_untouched():
    p = decode(frames([(0.0, udp4(b"a")), (0.1, udp4(b"b"))]))
    assert Reassembler().feed(p, 0.0) is p


def test_truncated_capture_keeps_the_captured_prefix_and_the_wire_length():
    frags = fragment(udp4(b"t" * 96), fragsize=48)
    recs = []
    for k, f in enumerate(frags):
        raw = bytes(ETH / f)
        cut = raw[:40] if k == 1 else raw  # the middle fragment's payload was not captured
        recs.append((float(k), cut, len(raw), LINKTYPE_ETHERNET))
    p = Reassembler().feed(decode(Frames.from_records(recs)), 0.0)
    assert len(p) == 1 and p.skip[0] == Skip.OK
    assert p.wirelen[0] == len(ETH / udp4(b"t" * 96))
    assert p.frames.caplen[0] == 14 + 20 + 48 + 6  # up to where the middle one was cut
