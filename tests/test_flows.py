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
    table = FlowTable(FlowSettings(idle_timeout=10, established_timeout=10))
    out = table.add(decode(frames([tcp(0), back(1), tcp(20), tcp(21, sport=41000)])))
    ends = ended(out)
    assert [f.expiry for f in ends] == [Expiry.IDLE]
    assert ends[0].pkts_toserver == 1 and len(table) == 2
    out = table.tick(100.0)
    assert sorted(f.expiry for f in ended(out)) == [Expiry.IDLE, Expiry.IDLE]
    assert len(table) == 0


def test_a_two_way_flow_outlives_the_one_way_idle_timeout():
    # one-way flows end after idle_timeout; conversations only after established_timeout
    table = FlowTable(FlowSettings(idle_timeout=10, established_timeout=60))
    table.add(decode(frames([tcp(0), back(1), tcp(2, sport=41000)])))
    assert {f.client_port for _, f in table.tick(30)} == {41000}
    out = table.add(decode(frames([tcp(40), back(41)])))  # the pause did not split it
    assert out == [] and len(table) == 1
    (f,) = ended(table.tick(102))
    assert f.expiry == Expiry.IDLE and (f.pkts_toserver, f.pkts_toclient) == (2, 2)


def test_clock_going_backwards_keeps_expiry_on_time():
    # A capture whose clock steps back: the packet stamped 1 counts as seen at the table's clock
    # (100), so `last` never goes backwards and the LRU order stays the order of `last`. Before,
    # X's last became 1 behind the fresh Y, and the idle scan stopped at Y and never reached X.
    table = FlowTable(FlowSettings(idle_timeout=120, established_timeout=120))
    table.add(decode(frames([tcp(0), tcp(100, sport=41000), tcp(1)])))
    table.tick(125)
    assert all(table.now - f.last <= 120 for f in table.flows.values()) and len(table) == 2
    lasts = [f.last for f in table.flows.values()]
    assert lasts == sorted(lasts) == [100, 100]
    assert ended(table.tick(220)) == []
    out = ended(table.tick(220.5))
    assert sorted(f.client_port for f in out) == [40000, 41000]
    (x,) = [f for f in out if f.client_port == 40000]
    assert x.pkts_toserver == 2 and x.start == 0 and x.last == 100 and x.sides[1][2] == 100


def test_clock_stepping_back_an_hour_still_expires_flows_on_the_tables_clock():
    # a capture concatenated from two runs, the second an hour earlier: the first run's flows
    # end once the table's clock (the newest stamp) passes their idle timeout, the second run's
    # flows are timed on that clock too, and nothing ends early (active timeout included)
    first = [tcp(3600 + i, sport=30000 + i) for i in range(5)]
    second = [tcp(i, sport=40000 + i % 3) for i in range(0, 300, 10)]
    table = FlowTable(FlowSettings(idle_timeout=120, established_timeout=120, active_timeout=200))
    out = table.add(decode(frames(first + second)))
    assert ended(out) == [] and len(table) == 8
    assert all(f.last <= table.now for f in table.flows.values())
    out = ended(table.tick(3604 + 121))
    assert sorted(f.client_port for f in out) == list(range(30000, 30005)) + [40000, 40001, 40002]
    assert sum(f.pkts_toserver for f in out) == 35


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


def _syn(t, seq):
    return t, IP(src=C, dst=S) / TCP(sport=40000, dport=443, flags="S", seq=seq)


def test_syn_retried_after_rst_stays_one_flow_but_a_new_isn_is_port_reuse():
    rst = back(0.1, flags="RA", data=b"")
    _, out = run([_syn(0, 1000), rst, _syn(1.0, 1000), back(1.1, flags="RA", data=b""),
                  _syn(3.0, 1000), back(3.1, flags="RA", data=b"")])
    (f,) = ended(out)
    assert (f.pkts_toserver, f.pkts_toclient) == (3, 3) and f.expiry == Expiry.END
    _, out = run([_syn(0, 1000), rst, _syn(1.0, 5000), back(1.1, flags="SA", data=b"")])
    assert [(f.pkts_toserver, f.pkts_toclient) for f in ended(out)] == [(1, 1), (1, 1)]


def test_one_five_tuple_on_two_vlans_is_two_flows():
    from scapy.layers.l2 import Dot1Q
    pk = [ETH / Dot1Q(vlan=v) / IP(src=C, dst=S) / UDP(sport=5000, dport=6000) / b"x"
          for v in (300, 50, 300)]
    table = FlowTable()
    table.add(decode(Frames.from_records([(i, bytes(p), len(p), LINKTYPE_ETHERNET)
                                          for i, p in enumerate(pk)])))
    assert sorted(f.pkts_toserver for f in table.flows.values()) == [1, 2]


def test_table_is_bounded_with_lru_eviction():
    pk = [tcp(i * 0.01, sport=10000 + i) for i in range(10)] + [tcp(0.2, sport=10000)]
    table = FlowTable(FlowSettings(max_flows=4))
    out = table.add(decode(frames(pk)))
    assert len(table) == 4
    assert table.stats.evicted == table.stats.evicted_payload == 7
    assert all(f.expiry == Expiry.LIMIT for f in ended(out))


def test_full_table_evicts_flows_without_payload_first():
    # two real flows with payload, then a SYN flood: the SYN-only flows evict each other
    real = [tcp(0.0, sport=20000), tcp(0.01, sport=20001)]
    syns = [tcp(0.1 + i * 0.01, sport=30000 + i, flags="S", data=b"") for i in range(50)]
    later = [tcp(1.0, sport=20000), tcp(1.01, sport=20001)]
    table = FlowTable(FlowSettings(max_flows=5))
    out = table.add(decode(frames(real + syns + later)))
    assert {f.client_port for f in table.flows.values()} >= {20000, 20001}
    assert table.flows[next(k for k, f in table.flows.items() if f.client_port == 20000)].pkts_toserver == 2
    st = table.stats
    assert st.evicted_empty == st.evicted == 47 and st.evicted_payload == 0
    assert all(f.relevant == 0 for f in ended(out))
    assert sum(st.ended.values()) == len(ended(out))
    # six flows with payload: the three SYN-only flows left go first, then (none empty left)
    # the least recently seen flows of all: the two real ones and the first newcomer
    more = [tcp(2.0 + i * 0.01, sport=40000 + i) for i in range(6)]
    out = ended(table.add(decode(frames(more))))
    assert [f.client_port for f in out if f.relevant] == [20000, 20001, 40000]
    assert (st.evicted_empty, st.evicted_payload, len(table)) == (50, 3, 5)


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
