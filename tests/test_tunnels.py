"""Tunnel flows read from inside (flagd.tunnels): one inner conversation, wrapped by scapy in
WireGuard, OpenVPN and IPsec (ESP behind UDP) as each protocol frames it, metered by the flow
table, comes out as the same packets whichever tunnel carried it; other flows pass unchanged."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from flagd import inputs, tunnels
from flagd.flows import END, FlowSettings, FlowTable
from flagd.frames import LINKTYPE_ETHERNET, Frames
from flagd.packets import decode
from flagd.phrases import PhraseDict
from flagd.preprocess import Preprocessing

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
C, S = "198.51.100.1", "203.0.113.7"
# the inner conversation: (seconds, client->server?, inner IP packet length); multiples of 16,
# so WireGuard's padding adds nothing and every tunnel carries exactly these lengths
INNER = [(0.10, True, 64), (0.11, False, 64), (0.12, True, 48), (0.13, True, 320),
         (0.15, False, 48), (0.20, False, 1200), (0.21, True, 48), (0.50, False, 208)]


def meter(pkts, honest=True) -> tuple[list[bytes], list[tuple[int, int, float]]]:
    """Model bytes and sides of the one flow these (time, IP packet) make."""
    pre = Preprocessing.honest(packet_bytes=64) if honest else Preprocessing(packet_bytes=64)
    table = FlowTable(FlowSettings(ready_packets=32, preprocessing=pre))
    frames = Frames.from_records([(t, bytes(ETH / p), len(ETH / p), LINKTYPE_ETHERNET)
                                 for t, p in pkts])
    flows = [f for kind, f in table.add(decode(frames)) + table.flush() if kind == END]
    assert len(flows) == 1
    return flows[0].packets, flows[0].sides


def udp(t, to_server, payload, port):
    src, dst, sport, dport = (C, S, 40000, port) if to_server else (S, C, port, 40000)
    return t, IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload)


def wireguard(handshake=True, keepalive=True):
    out = [udp(0.0, True, b"\x01\0\0\0" + os.urandom(144), 51820),
           udp(0.05, False, b"\x02\0\0\0" + os.urandom(88), 51820)] if handshake else []
    for i, (t, up, n) in enumerate(INNER):
        out.append(udp(t, up, b"\x04\0\0\0" + os.urandom(4) + i.to_bytes(8, "little")
                       + os.urandom(n + 16), 51820))
    if keepalive:
        out.append(udp(0.6, True, b"\x04\0\0\0" + os.urandom(28), 51820))
    return out


def openvpn():
    out = [udp(0.0, True, b"\x38" + os.urandom(8) + b"\0\0\0\0\0\0", 1194),  # hard reset v2
           udp(0.03, False, b"\x40" + os.urandom(8) + b"\x01" + os.urandom(16), 1194),
           udp(0.05, True, b"\x20" + os.urandom(100), 1194)]  # P_CONTROL_V1 (TLS)
    return out + [udp(t, up, b"\x48\0\0\x01" + i.to_bytes(4, "big") + os.urandom(n + 16), 1194)
                  for i, (t, up, n) in enumerate(INNER)]


def esp(i, n):
    # SPI, sequence, IV, ciphertext of inner + padding + pad length + next header, ICV
    return os.urandom(4) + i.to_bytes(4, "big") + os.urandom(8) + os.urandom(n + 2 + 2) \
        + os.urandom(16)


def ipsec_udp():
    ike = b"\0\0\0\0" + os.urandom(8) + bytes(8) + b"\x21\x20\x22\x08" + bytes(4) + os.urandom(60)
    out = [udp(0.0, True, ike, 4500), udp(0.05, False, ike, 4500),
           udp(0.07, True, b"\xff", 4500)]  # a NAT-keepalive
    return out + [udp(t, up, esp(i, n), 4500) for i, (t, up, n) in enumerate(INNER)]


def test_every_tunnel_kind_is_recognised_from_its_own_framing():
    assert tunnels.kind(meter(wireguard())[0]) == "wireguard"
    assert tunnels.kind(meter(wireguard(handshake=False))[0]) == "wireguard"  # mid-tunnel
    assert tunnels.kind(meter(openvpn())[0]) == "openvpn"
    assert tunnels.kind(meter(ipsec_udp())[0]) == "ipsec"


def test_one_conversation_looks_the_same_through_every_tunnel():
    views = {name: tunnels.unwrap(*meter(make())) for name, make in
             [("wireguard", wireguard), ("openvpn", openvpn), ("ipsec", ipsec_udp)]}
    ref_packets, ref_sides = views["wireguard"]
    # the inner packets only, at their length (+ Ethernet, IP and UDP headers), gaps between them
    assert [(d, w) for d, w, _ in ref_sides] == [(0 if up else 1, 14 + 20 + 8 + n)
                                                 for _, up, n in INNER]
    times = [t for t, _, _ in INNER]
    assert [g for _, _, g in ref_sides] == pytest.approx([0.0] + list(np.diff(times)), abs=1e-5)
    for name, (packets, sides) in views.items():
        assert packets == ref_packets, name  # byte for byte (ports, IP ID, TTL masked)
        assert sides == pytest.approx(ref_sides, abs=1e-5), name


def test_packets_keep_their_model_length_and_say_udp_of_the_inner_length():
    raw, _ = meter(openvpn(), honest=False)
    packets, _ = tunnels.unwrap(*meter(openvpn(), honest=False))
    assert [len(p) for p in packets] == [len(p) for p in raw[3:]]
    for p, (_, _, n) in zip(packets, INNER, strict=True):
        assert p[9] == 17 and int.from_bytes(p[2:4], "big") == 20 + 8 + n
        assert int.from_bytes(p[24:26], "big") == 8 + n  # the UDP length field
        assert p[40:] == bytes(len(p) - 40)  # the encrypted bytes: nothing to learn from


def test_other_flows_and_handshakes_without_data_pass_unchanged():
    tcp = [(0.1 * i, IP(src=C, dst=S) / TCP(sport=40000, dport=443, flags="PA") / (b"x" * 30))
           for i in range(4)]
    quic = [udp(0.1 * i, i % 2 == 0, b"\x48" + os.urandom(60), 443) for i in range(4)]
    syslog = [udp(0.1 * i, True, b"<34>Oct 11 22:14:15 host su: 'su root' failed", 514)
              for i in range(4)]  # "<" is 0x3c: an OpenVPN v2 hard reset's opcode, key 4
    only_handshake = wireguard()[:2]
    for pkts in (tcp, quic, syslog, only_handshake):
        packets, sides = meter(pkts)
        assert tunnels.unwrap(packets, sides) == (packets, sides)
    assert tunnels.kind(meter(quic)[0]) is tunnels.kind(meter(syslog)[0]) is None


def test_unwrapping_twice_changes_nothing_and_the_model_input_follows_the_flag():
    flows = [meter(make()) for make in (wireguard, openvpn, ipsec_udp)]
    once = inputs.unwrapped([f for f, _ in flows], [s for _, s in flows])
    assert inputs.unwrapped(*once) == once  # a zeroed payload is no tunnel's framing
    phrases = PhraseDict.bytes_only()
    ids, ctx = inputs.encode(phrases, [f for f, _ in flows], [s for _, s in flows], 128, True,
                             unwrap_tunnels=True)
    want_ids, want_ctx = inputs.encode(phrases, *once, 128, True)
    assert (ids == want_ids).all() and (ctx == want_ctx).all()
    assert (ids[0] == ids[1]).all() and (ids[1] == ids[2]).all()


def test_a_model_trained_to_unwrap_tunnels_unwraps_them_when_it_classifies(tmp_path):
    """`flagd train --unwrap-tunnels --tunnel-packets N`: the bundle says so, and reads a
    WireGuard flow exactly as the first N packets of its unwrapped form (the daemon's path:
    Bundle.encode_packets)."""
    from typer.testing import CliRunner

    from flagd.cli import app
    from flagd.frames import LINKTYPE_ETHERNET
    from flagd.infer import Bundle
    from tests import crafted

    def session(make, i):  # a client port of its own: one flow per session
        base, recs = 1_700_000_000.0 + 10 * i, []
        for t, p in make():
            if p[UDP].sport == 40000:
                p[UDP].sport = 40001 + i
            else:
                p[UDP].dport = 40001 + i
            recs.append(crafted.Record(base + t, crafted.ether(p)))
        return recs

    for cls, make in (("vpn-voip", wireguard), ("voip", openvpn)):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for part in range(2):
            recs = [r for i in range(12) for r in session(make, 12 * part + i)]
            crafted.write_pcap(tmp_path / "tree" / cls / f"{part}.pcap", recs, LINKTYPE_ETHERNET)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", str(tmp_path / "tree"), "-o", str(out), "--mode",
                                 "product", "--preset", "tiny", "--max-len", "48", "--vocab-size",
                                 "300", "--packets", "16", "--packet-bytes", "64",
                                 "--pretrain-epochs", "1", "--finetune-epochs", "1", "--fraction",
                                 "1", "--variant", "flag", "--variant", "rf", "--unwrap-tunnels",
                                 "--tunnel-packets", "4"])
    assert r.exit_code == 0, r.output
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["unwrap_tunnels"] and protocol["tunnel_packets"] == 4
    bundle = Bundle.load(out / "product" / "flag-100" / "model", device="cpu")
    assert bundle.model.cfg.unwrap_tunnels and bundle.model.cfg.tunnel_packets == 4
    packets, sides = meter(wireguard(), honest=False)
    inner, inner_sides = inputs.unwrapped([packets], [sides])
    assert len(inner[0]) > 4 and inputs.unwrapped([packets], [sides], 4) == (
        [inner[0][:4]], [inner_sides[0][:4]])
    ids, ctx = bundle.encode_packets([packets], [sides])
    want_ids, want_ctx = inputs.encode(bundle.phrases, [inner[0][:4]], [inner_sides[0][:4]],
                                       bundle.max_len, True)
    raw_ids, _ = inputs.encode(bundle.phrases, [packets], [sides], bundle.max_len, True)
    assert (ids == want_ids).all() and (ctx == want_ctx).all() and not (ids == raw_ids).all()
    assert bundle.predict((ids, ctx), [len(packets)])[0].packets_used == 4  # what it read
