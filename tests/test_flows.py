"""The flow meter on scapy-crafted packets: keys, direction, expiry, readiness, bounds."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from flagd.flows import END, READY, Expiry, FlowSettings, FlowTable, flow_keys
from flagd.frames import LINKTYPE_ETHERNET, Frames
from flagd.packets import decode
from flagd.preprocess import Preprocessing

# Explicit addresses: scapy would otherwise look up routes and neighbours for every packet.
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

C, S = "198.51.100.1", "203.0.113.7"


def frames(pkts: list[tuple[float, object]]) -> Frames:
    return Frames.from_records([(t, bytes(ETH / p), len(ETH / p), LINKTYPE_ETHERNET)
                                for t, p in pkts])


def tcp(t, src=C, dst=S, sport=40000, dport=443, flags="PA", data=b"x" * 10):
    return t, IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / data


def back(t, **kw):
    return tcp(t, src=S, dst=C, sport=443, dport=40000, **kw)


def run(pkts, **settings):
    table = FlowTable(FlowSettings(**settings))
    out = table.add(decode(frames(pkts)))
    return table, out + table.flush()


def ended(updates):
    return [f for kind, f in updates if kind == END]


def test_both_directions_one_flow_with_client_from_first_packet():
    _, out = run([tcp(0.0), back(0.1), tcp(0.2), back(0.3), back(0.4)])
    (f,) = ended(out)
    assert (f.pkts_toserver, f.pkts_toclient) == (2, 3)
    assert f.client[:4] == bytes([198, 51, 100, 1]) and f.client_port == 40000
    assert f.server_port == 443 and f.state == "established"
    assert f.bytes_toserver == 2 * len(ETH / IP() / TCP() / (b"x" * 10))


def test_client_is_first_sender_even_from_the_high_port():
    _, out = run([back(0.0), tcp(0.1)])
    (f,) = ended(out)
    assert f.client_port == 443 and f.pkts_toserver == 1 and f.pkts_toclient == 1


@given(st.integers(1, 65535), st.integers(1, 65535), st.binary(min_size=4, max_size=4),
       st.binary(min_size=4, max_size=4))
def test_key_is_direction_independent(sport, dport, a, b):
    import socket
    ip_a, ip_b = socket.inet_ntoa(a), socket.inet_ntoa(b)
    p = decode(frames([(0, IP(src=ip_a, dst=ip_b) / UDP(sport=sport, dport=dport)),
                       (1, IP(src=ip_b, dst=ip_a) / UDP(sport=dport, dport=sport))]))
    keys, high = flow_keys(p, np.arange(2))
    assert keys[0] == keys[1]
    if (a, sport) != (b, dport):
        assert high[0] != high[1]


def test_ipv6_flow():
    pk = [(0.0, IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=5000, dport=6000) / b"hi"),
          (0.1, IPv6(src="2001:db8::2", dst="2001:db8::1") / UDP(sport=6000, dport=5000) / b"yo")]
    _, out = run(pk)
    (f,) = ended(out)
    assert f.version == 6 and (f.pkts_toserver, f.pkts_toclient) == (1, 1)


def test_ready_after_k_relevant_packets_and_handed_on_before_the_end():
    pk = [tcp(0, flags="S", data=b""), back(0.01, flags="SA", data=b""), tcp(0.02, flags="A", data=b"")]
    pk += [tcp(0.1 + i / 10) if i % 2 == 0 else back(0.1 + i / 10) for i in range(7)]
    table, out = run(pk, ready_packets=5)
    kinds = [k for k, _ in out]
    assert kinds == [READY, END]
    f = out[0][1]
    assert len(f.packets) == 5 and f.relevant == 7  # handshake packets carry no payload
    assert f.pkts_toserver + f.pkts_toclient == 10


def test_idle_timeout_splits_and_sweeps():
    table = FlowTable(FlowSettings(idle_timeout=10))
    out = table.add(decode(frames([tcp(0), back(1), tcp(20), tcp(21, sport=41000)])))
    ends = ended(out)
    assert [f.expiry for f in ends] == [Expiry.IDLE]
    assert ends[0].pkts_toserver == 1 and len(table) == 2
    out = table.tick(100.0)
    assert sorted(f.expiry for f in ended(out)) == [Expiry.IDLE, Expiry.IDLE]
    assert len(table) == 0


def test_active_timeout():
    _, out = run([tcp(i * 10.0) for i in range(5)], active_timeout=25)
    assert [f.expiry for f in ended(out)] == [Expiry.ACTIVE, Expiry.SHUTDOWN]
    assert [f.pkts_toserver for f in ended(out)] == [3, 2]


def test_fin_both_ways_ends_after_quiet_and_keeps_last_ack():
    pk = [tcp(0), back(0.1), tcp(0.2, flags="FA"), back(0.3, flags="FA"), tcp(0.4, flags="A", data=b"")]
    table = FlowTable(FlowSettings(closed_timeout=2))
    out = table.add(decode(frames(pk)))
    assert not ended(out)
    (f,) = ended(table.tick(10))
    assert f.expiry == Expiry.END and f.state == "closed" and f.pkts_toserver == 3


def test_rst_then_new_syn_starts_a_new_flow():
    pk = [tcp(0), back(0.1, flags="R", data=b""), tcp(0.5, flags="S", data=b""), back(0.6, flags="SA", data=b"")]
    _, out = run(pk)
    fl = ended(out)
    assert [f.expiry for f in fl] == [Expiry.END, Expiry.SHUTDOWN]
    assert fl[1].pkts_toserver == 1 and fl[1].pkts_toclient == 1


def test_table_is_bounded_with_lru_eviction():
    pk = [tcp(i * 0.01, sport=10000 + i) for i in range(10)] + [tcp(0.2, sport=10000)]
    table = FlowTable(FlowSettings(max_flows=4))
    out = table.add(decode(frames(pk)))
    assert len(table) == 4
    assert table.stats.evicted == 7
    assert all(f.expiry == Expiry.LIMIT for f in ended(out))


def test_irrelevant_flow_records_rule_and_keeps_no_bytes():
    dns = [(0, IP(src=C, dst=S) / UDP(sport=40000, dport=53) / b"q"),
           (0.1, IP(src=S, dst=C) / UDP(sport=53, dport=40000) / b"a")]
    _, out = run(dns)
    (f,) = ended(out)
    assert f.relevant == 0 and f.packets == [] and f.drop_rule == "dns"


def test_rules_are_configurable():
    dns = [(0, IP(src=C, dst=S) / UDP(sport=40000, dport=53) / b"q")]
    _, out = run(dns, preprocessing=Preprocessing(rules=()))
    (f,) = ended(out)
    assert f.relevant == 1 and len(f.packets) == 1


def test_non_ip_and_other_protocols_are_counted_not_flowed():
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import ARP
    recs = [(0, bytes(ETH / ARP()), 42, LINKTYPE_ETHERNET),
            (0, bytes(ETH / IP(src=C, dst=S) / ICMP()), 42, LINKTYPE_ETHERNET)]
    table = FlowTable()
    table.add(decode(Frames.from_records(recs)))
    assert len(table) == 0
    assert table.stats.skipped == {"non_ip": 1, "other_proto": 1}


def test_memory_per_flow_is_bounded_by_k_and_b():
    pk = [tcp(i * 0.01, data=bytes(1400)) for i in range(50)]
    _, out = run(pk, ready_packets=3, preprocessing=Preprocessing(packet_bytes=64))
    f = ended(out)[0]
    assert len(f.packets) == 3 and all(len(p) == 64 for p in f.packets)
