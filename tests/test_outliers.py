"""Synthetic outliers (flagd.outliers): what each kind changes, and that only the given rows
are read."""

from __future__ import annotations

import numpy as np
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from flagd.dataset import Dataset
from flagd.flows import FlowSettings
from flagd.outliers import headers, redrawn_ports, shuffled_payload, synthesize
from flagd.preprocess import Preprocessing
from tests import crafted


def udp_model_bytes(sport: int, dport: int, payload: bytes) -> bytes:
    raw = bytes(IP(src=crafted.SRC4, dst=crafted.DST4) / UDP(sport=sport, dport=dport) / Raw(payload))
    return raw[:28] + bytes(12) + raw[28:]  # the UDP header padded to 20 bytes, as the model sees it


def test_headers_are_found_behind_ip_options_and_ipv6_extensions():
    # (TCP header, payload): IPv4 with 8 bytes of options; IPv6 behind hbh, dst, routing, frag
    assert headers([bytes(crafted.ip4_options())]) == [(28, 48)]
    assert headers([bytes(crafted.ip6_ext_chain())]) == [(40 + 4 * 8, 40 + 4 * 8 + 20)]
    assert headers([udp_model_bytes(5000, 6000, b"q")]) == [(20, 40)]  # padded UDP header
    assert headers([bytes(crafted.tcp4())[:12], b"", bytes(crafted.icmp4())]) == [None] * 3
    assert headers([]) == []


def test_shuffled_payload_keeps_headers_sizes_and_bytes():
    tcp = bytes(IP(src=crafted.SRC4, dst=crafted.DST4) / TCP(
        sport=40000, dport=443, flags="PA", options=[("MSS", 1460), ("NOP", None), ("NOP", None)]
    ) / Raw(bytes(range(64))))
    udp = udp_model_bytes(5000, 6000, bytes(range(100, 140)))
    out = shuffled_payload([tcp, udp], np.random.default_rng(1))
    for before, after, start in ((tcp, out[0], 20 + 28), (udp, out[1], 20 + 20)):
        assert len(after) == len(before) and after[:start] == before[:start]
        assert after[start:] != before[start:] and sorted(after[start:]) == sorted(before[start:])


def test_redrawn_ports_keep_the_two_directions_paired():
    there = bytes(crafted.tcp4(b"a" * 10, sport=40000, dport=443))
    back = bytes(crafted.tcp4(b"b" * 10, sport=443, dport=40000))
    a, b, c = redrawn_ports([there, back, there], np.random.default_rng(0))
    ports = [(int.from_bytes(p[20:22], "big"), int.from_bytes(p[22:24], "big")) for p in (a, b, c)]
    assert ports[0] == ports[2] == ports[1][::-1] and ports[0] != (40000, 443)
    assert all(1024 <= p < 65536 for p in ports[0])
    assert a[:20] == there[:20] and a[24:] == there[24:]  # nothing but the ports changed


def _dataset(masks: tuple[str, ...]) -> Dataset:
    rng = np.random.default_rng(3)
    flows, sides, labels = [], [], []
    for i in range(60):
        n = int(rng.integers(1, 5))
        flows.append([udp_model_bytes(1000 + i, 2000 + i, bytes([i]) * 8 + bytes([k]) * 8)
                      for k in range(n)])
        sides.append([(k % 2, 60 + k, 0.001 * k) for k in range(n)])
        labels.append(i % 3)
    settings = FlowSettings(ready_packets=4, preprocessing=Preprocessing(extra_masks=masks))
    return Dataset(flows, sides, np.array(labels, np.int16), ["a", "b", "c"],
                   np.zeros(60, np.int32), ["x.pcap"], np.arange(60.0), settings.to_dict())


def test_synthesize_reads_only_the_given_rows():
    ds = _dataset(masks=("ports",))  # ports masked: redrawing them would show the model nothing
    rows = np.arange(0, 60, 2)
    out = synthesize(ds, rows, seed=0)
    assert len(out) == len(rows) and (out.labels == -1).all()
    assert all(len(f) <= 4 and len(f) == len(s) for f, s in zip(out.flows, out.sides, strict=True))
    # every packet is one of those rows' packets, as it was or with its payload shuffled
    given = {bytes(sorted(p)) for i in rows for p in ds.flows[i]}
    assert all(bytes(sorted(p)) in given for f in out.flows for p in f)
    # some flows are spliced from two flows of different classes
    owner = {bytes(sorted(p)): ds.labels[i] for i in rows for p in ds.flows[i]}
    assert any(len({owner[bytes(sorted(p))] for p in f}) == 2 for f in out.flows)
    assert not any(f == ds.flows[i] for f, i in zip(out.flows, rows, strict=True) if len(f) > 1)


def test_synthesize_redraws_ports_when_the_model_sees_them():
    ds = _dataset(masks=())
    out = synthesize(ds, np.arange(60), seed=0)
    ports = {p[20:24] for f in ds.flows for p in f}
    assert any(p[20:24] not in ports for f in out.flows for p in f)
