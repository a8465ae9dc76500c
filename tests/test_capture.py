"""Live capture on real interfaces: veth pairs in network namespaces, lo, and tun devices.

Needs root (skipped otherwise). Traffic comes from tests/netns.py: real TLS connections and UDP
echoes, so "every packet was seen" is checked against what the kernel actually sent: UDP by count,
TCP by sequence-number coverage (no byte of either direction missing between SYN and FIN).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from flagd import capture as capture_mod
from flagd.capture import (
    CaptureError,
    LinkMonitor,
    check_interface,
    list_interfaces,
    open_capture,
)
from flagd.frames import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW, Frames
from flagd.privileges import PrivilegeError, drop_privileges
from tests.netns import Flow, VethPair, netns_unavailable, veth_pair

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_unavailable() is not None, reason=netns_unavailable() or ""),
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pair() -> VethPair:
    with veth_pair(root_end=True) as p:
        yield p


class Pkt(NamedTuple):
    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    tcp_flags: int
    seq: int
    payload_len: int


def parse(frames: Frames) -> list[Pkt]:
    """IPv4 TCP/UDP over Ethernet, just the fields these tests need (other frames are skipped)."""
    out = []
    for i in range(len(frames)):
        f = bytes(frames.data[frames.offset[i] : frames.offset[i] + frames.caplen[i]])
        if len(f) < 34 or f[12:14] != b"\x08\x00":
            continue
        ip = f[14:]
        ihl, total, proto = (ip[0] & 15) * 4, struct.unpack_from("!H", ip, 2)[0], ip[9]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        l4 = ip[ihl:]
        if proto == 6:
            sport, dport, seq = struct.unpack_from("!HHI", l4)
            doff = (l4[12] >> 4) * 4
            out.append(Pkt(6, src, sport, dst, dport, l4[13], seq, total - ihl - doff))
        elif proto == 17:
            sport, dport, length = struct.unpack_from("!HHH", l4)
            out.append(Pkt(17, src, sport, dst, dport, 0, 0, length - 8))
    return out


def direction(pkts: list[Pkt], flow: Flow, reverse: bool = False) -> list[Pkt]:
    key = (flow.proto, flow.dst, flow.dport, flow.src, flow.sport) if reverse else tuple(flow)
    return [p for p in pkts if (p.proto, p.src, p.sport, p.dst, p.dport) == key]


def assert_tcp_complete(segments: list[Pkt]) -> None:
    """SYN and FIN seen, and the payload covers every sequence number between them."""
    syn = [s for s in segments if s.tcp_flags & 0x02]
    fin = [s for s in segments if s.tcp_flags & 0x01]
    assert syn and fin, "missing SYN or FIN"
    isn, fin_seq = syn[0].seq, fin[-1].seq
    covered = sorted(((s.seq - isn - 1) % 2**32, s.payload_len) for s in segments if s.payload_len)
    pos = 0
    for start, length in covered:
        assert start <= pos, f"bytes {pos}..{start} of the stream were not captured"
        pos = max(pos, start + length)
    assert pos == (fin_seq - isn - 1) % 2**32 and pos > 0


def assert_stats_consistent(cap: capture_mod.LiveCapture) -> None:
    st = cap.stats()
    assert st.dropped == 0 and st.freeze_q_count == 0
    assert st.received == st.delivered > 0


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_every_tls_and_udp_packet_is_captured(pair: VethPair, ring: bool) -> None:
    t0 = time.time()
    with open_capture(pair.a.ifname, ring=ring) as cap:
        assert cap.ring is ring and cap.linktype == LINKTYPE_ETHERNET
        tls = pair.run_tls(conns=3, msgs=4, size=3000)  # > MSS: several segments per message
        udp = pair.run_udp(count=25, size=120)
        frames = cap.drain()
        assert_stats_consistent(cap)
    pkts = parse(frames)
    assert len(tls) == 3 and len({f.sport for f in tls}) == 3
    for flow in tls:
        assert_tcp_complete(direction(pkts, flow))
        assert_tcp_complete(direction(pkts, flow, reverse=True))
        if pair.offloads_off:  # no segment larger than the MTU allows
            assert max(p.payload_len for p in direction(pkts, flow)) <= 1500 - 40
    assert len(direction(pkts, udp)) == 25 and len(direction(pkts, udp, reverse=True)) == 25
    assert all(p.payload_len == 120 for p in direction(pkts, udp))
    assert (frames.caplen == frames.wirelen).all()
    assert (frames.ts >= t0 - 1).all() and (frames.ts <= time.time() + 1).all()


_SEND_FRAMES = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for h in sys.argv[2:]:
    s.send(bytes.fromhex(h))
"""


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_vlan_tags_the_kernel_takes_out_are_put_back(pair: VethPair, ring: bool) -> None:
    """The kernel removes the outer 802.1Q/802.1ad tag of every received frame and reports it
    beside the frame; the capture puts it back, so frames (and flow keys) are the wire's: the
    same 5-tuple on two VLANs is two flows, as in a replay of the same traffic."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

    from flagd.flows import flow_keys
    from flagd.packets import decode

    eth = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
    ip = IP(src="198.51.100.200", dst="198.51.100.201") / UDP(sport=5000, dport=9999) / (b"x" * 50)
    sent = [bytes(eth / Dot1Q(vlan=100, prio=3) / ip), bytes(eth / Dot1Q(vlan=200) / ip),
            bytes(eth / Dot1AD(vlan=300) / Dot1Q(vlan=100) / ip), bytes(eth / ip)]
    with open_capture(pair.a.ifname, ring=ring) as cap:
        pair.run(pair.b, [sys.executable, "-c", _SEND_FRAMES, pair.b.ifname, *(f.hex() for f in sent)])
        frames = cap.drain()
    got = [bytes(frames.data[o:o + n]) for o, n in zip(frames.offset, frames.caplen, strict=True)]
    assert got == sent and (frames.wirelen == [len(f) for f in sent]).all()
    p = decode(frames)
    keys, _ = flow_keys(p, np.arange(len(sent)))
    assert len(set(keys)) == 4  # VLAN 100, VLAN 200, QinQ 300/100, untagged


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_bpf_filter_keeps_only_matching_packets(pair: VethPair, ring: bool) -> None:
    with open_capture(pair.a.ifname, ring=ring, bpf="udp") as cap:
        pair.run_tls(conns=1, msgs=2)
        udp = pair.run_udp(count=7)
        frames = cap.drain()
        assert_stats_consistent(cap)
    pkts = parse(frames)
    assert len(pkts) == len(frames) == 14
    assert all(p.proto == 17 for p in pkts)
    assert len(direction(pkts, udp)) == 7 and len(direction(pkts, udp, reverse=True)) == 7


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_snaplen_cuts_frames_but_keeps_wire_length(pair: VethPair, ring: bool) -> None:
    with open_capture(pair.a.ifname, ring=ring, snaplen=64, bpf="udp port 9999") as cap:
        pair.run_udp(count=3, size=500)
        frames = cap.drain()
    assert len(frames) == 6
    assert (frames.caplen == 64).all() and (frames.wirelen == 14 + 20 + 8 + 500).all()


def test_bad_bpf_expression_is_one_clear_line(pair: VethPair) -> None:
    with pytest.raises(CaptureError, match=r"bad BPF filter 'udp port'") as err:
        open_capture(pair.a.ifname, bpf="udp port")
    assert "\n" not in str(err.value)


def test_promisc_is_set_while_open(pair: VethPair) -> None:
    from pyroute2 import IPRoute

    def promisc() -> bool:
        # IFLA_PROMISCUITY counts promiscuous users; the IFF_PROMISC flag only shows `ip link set`.
        with IPRoute() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=pair.a.ifname)[0])[0]
            return link.get_attr("IFLA_PROMISCUITY") > 0

    assert not promisc()
    with open_capture(pair.a.ifname, promisc=True) as cap:
        assert promisc()
        udp = pair.run_udp(count=2)
        pkts = parse(cap.drain())
        assert len(direction(pkts, udp)) == len(direction(pkts, udp, reverse=True)) == 2
    assert not promisc()  # the membership goes with the socket


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_loopback_shows_each_packet_once(ring: bool) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    with (
        rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        open_capture("lo", ring=ring, bpf=f"udp port {port}") as cap,
    ):
        payloads = [bytes([i]) * (10 + i) for i in range(40)]
        for p in payloads:
            tx.sendto(p, ("127.0.0.1", port))
        frames = cap.drain()
    assert cap.linktype == LINKTYPE_ETHERNET
    got = [
        bytes(frames.data[o + 42 : o + c])
        for o, c in zip(frames.offset, frames.caplen, strict=True)
    ]
    assert got == payloads  # once each (outgoing copies dropped), in order, byte for byte


@pytest.mark.parametrize(
    ("ring", "fanout"), [(True, None), (False, None), (True, 4242)], ids=["ring", "socket", "fanout"]
)
def test_drain_returns_what_the_kernel_has_not_handed_over(
    pair: VethPair, ring: bool, fanout: int | None
) -> None:
    # A minute-long block timeout: read() never sees these packets, they stay in the kernel's
    # block; drain() must still return them, and the capture is closed after it.
    with open_capture(
        pair.a.ifname, ring=ring, bpf="udp", block_timeout_ms=60_000, fanout=fanout
    ) as cap:
        udp = pair.run_udp(count=5)
        if ring:
            assert len(cap.read(0.2)) == 0
        pkts = parse(cap.drain())
        with pytest.raises(CaptureError, match="closed"):
            cap.read(0)
    assert len(direction(pkts, udp)) == len(direction(pkts, udp, reverse=True)) == 5
    st = cap.stats()
    assert st.received == st.delivered == 10 and st.dropped == 0


def test_ring_falls_back_to_plain_socket(pair: VethPair, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ring(*args: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(capture_mod, "_setup_ring", no_ring)
    with open_capture(pair.a.ifname, ring=True, bpf="udp") as cap:
        assert not cap.ring
        pair.run_udp(count=3)
        assert len(cap.drain()) == 6


def test_closed_capture(pair: VethPair) -> None:
    cap = open_capture(pair.a.ifname)
    pair.run_udp(count=2)
    cap.drain()
    cap.close()
    cap.close()  # idempotent
    assert cap.stats().delivered >= 4
    with pytest.raises(CaptureError, match="closed"):
        cap.read(0)


def test_unknown_interface_lists_real_ones(pair: VethPair) -> None:
    with pytest.raises(CaptureError) as err:
        open_capture("eth9-nope")
    msg = str(err.value)
    assert msg.startswith("no interface 'eth9-nope'; interfaces: ")
    names = msg.split(": ", 1)[1].split(", ")
    assert "lo" in names and pair.a.ifname in names
    # Other test runs may add or remove interfaces meanwhile: compare only what is stable.
    assert {"lo", pair.a.ifname} <= {link.name for link in list_interfaces()}


def test_interface_down_is_an_error(pair: VethPair) -> None:
    pair.set_link(pair.a, up=False)
    with pytest.raises(CaptureError, match=rf"interface '{pair.a.ifname}' is down"):
        open_capture(pair.a.ifname)
    pair.set_link(pair.a, up=True)
    assert check_interface(pair.a.ifname).admin_up


def _python(code: str, *prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_without_cap_net_raw_the_error_says_how_to_grant_it() -> None:
    code = (
        "from flagd.capture import open_capture, CaptureError\n"
        "try:\n    open_capture('lo')\nexcept CaptureError as e:\n    print(e)\n"
    )
    # Root without CAP_NET_RAW in its bounding set: what an unprivileged daemon user looks like.
    res = _python(code, "setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (
        "opening a packet socket on lo needs CAP_NET_RAW: run as root, or grant it: "
        "sudo setcap cap_net_raw+ep $(readlink -f $(which python3)), "
        "or use the systemd unit (AmbientCapabilities=CAP_NET_RAW)"
    )


def test_drop_privileges_keeps_the_socket_and_nothing_else() -> None:
    code = """
import json, os, socket, time
from flagd.capture import open_capture, CaptureError
from flagd.privileges import drop_privileges
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(('127.0.0.1', 0))
port = rx.getsockname()[1]
cap = open_capture('lo', bpf=f'udp port {port}')
drop_privileges('nobody')
status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'still here', ('127.0.0.1', port))
n, end = 0, time.time() + 2
while not n and time.time() < end:
    n = len(cap.read(0.1))
try:
    open_capture('lo')
    again = 'opened'
except CaptureError as e:
    again = str(e)
print(json.dumps(dict(uid=os.getuid(), euid=os.geteuid(), gid=os.getgid(), groups=os.getgroups(),
                      capeff=status['CapEff'].strip(), capprm=status['CapPrm'].strip(),
                      nnp=status['NoNewPrivs'].strip(), frames=n, again=again)))
"""
    res = _python(code)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    nobody = __import__("pwd").getpwnam("nobody")
    assert (out["uid"], out["euid"], out["gid"]) == (nobody.pw_uid, nobody.pw_uid, nobody.pw_gid)
    assert out["groups"] in ([], [nobody.pw_gid])
    assert int(out["capeff"], 16) == 0 and int(out["capprm"], 16) == 0 and out["nnp"] == "1"
    assert out["frames"] == 1  # the already-open capture still works
    assert "needs CAP_NET_RAW" in out["again"]


def test_drop_privileges_to_unknown_user_changes_nothing() -> None:
    with pytest.raises(PrivilegeError, match="no user 'flagd-no-such-user'"):
        drop_privileges("flagd-no-such-user")
    assert os.geteuid() == 0


def test_link_monitor_reports_down_and_up(pair: VethPair) -> None:
    def wait_for(mon: LinkMonitor, up: bool) -> list:
        events: list = []
        end = time.monotonic() + 5
        while time.monotonic() < end and not any(e.up is up for e in events):
            events += mon.poll(0.2)
        return events

    with LinkMonitor([pair.a.ifname]) as mon:
        assert mon.poll(0.1) == []  # nothing changed yet
        pair.set_link(pair.b, up=False)  # the peer goes away: our end loses carrier
        down = wait_for(mon, up=False)
        assert [(e.name, e.up) for e in down] == [(pair.a.ifname, False)]
        assert down[0].operstate in ("DOWN", "LOWERLAYERDOWN")  # no carrier; kernels differ
        pair.set_link(pair.b, up=True)
        back = wait_for(mon, up=True)
        assert [(e.name, e.up, e.operstate) for e in back] == [(pair.a.ifname, True, "UP")]
        pair.set_link(pair.a, up=False)
        assert [(e.up, e.operstate) for e in wait_for(mon, up=False)] == [(False, "DOWN")]


_TUN_CODE = """
import fcntl, json, os, struct, sys, time
from pyroute2 import IPRoute
from flagd.capture import open_capture
ring, arphrd = sys.argv[1] == 'ring', int(sys.argv[2])
fd = os.open('/dev/net/tun', os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack('16sH22x', b'flagdtun0', 0x0001 | 0x1000))  # TUNSETIFF: IFF_TUN|IFF_NO_PI
if arphrd:
    fcntl.ioctl(fd, 0x400454CD, arphrd)  # TUNSETLINK: another device type (only while down)
with IPRoute() as ipr:
    ipr.link('set', index=ipr.link_lookup(ifname='flagdtun0')[0], state='up')
# An IPv4/UDP packet from 198.51.100.9 to 198.51.100.10, written as if it arrived on the tun.
pkt = bytes.fromhex('45000021000140004011') + b'\\0\\0' + bytes([198, 51, 100, 9, 198, 51, 100, 10]) + bytes.fromhex('13881389000d0000') + b'hello'
with open_capture('flagdtun0', ring=ring, bpf='udp') as cap:
    os.write(fd, pkt)
    frames, end = [], time.time() + 3
    while not frames and time.time() < end:
        f = cap.read(0.1)
        frames += [bytes(f.data[o:o + c]).hex() for o, c in zip(f.offset, f.caplen)]
    print(json.dumps(dict(linktype=cap.linktype, frames=frames, pkt=pkt.hex())))
"""


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
@pytest.mark.parametrize("arphrd", [0, 512], ids=["tun-raw", "ppp-cooked"])
def test_non_ethernet_link_types(ring: bool, arphrd: int) -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    # Inside a throwaway namespace: the packet written into the tun can go nowhere else.
    with veth_pair() as p:
        res = p.run(
            p.b,
            [sys.executable, "-c", _TUN_CODE, "ring" if ring else "socket", str(arphrd)],
            cwd=REPO,
        )
    out = json.loads(res.stdout)
    pkt = bytes.fromhex(out["pkt"])
    assert len(out["frames"]) == 1
    frame = bytes.fromhex(out["frames"][0])
    if arphrd == 0:  # ARPHRD_NONE: raw IP, nothing in front
        assert out["linktype"] == LINKTYPE_RAW and frame == pkt
    else:  # cooked: pkttype HOST, hatype 512 (PPP), no link address, protocol IPv4
        assert out["linktype"] == LINKTYPE_LINUX_SLL
        assert frame == struct.pack("!HHH8sH", 0, 512, 0, b"", 0x0800) + pkt


def test_link_monitor_reports_new_links_coming_up_and_removed_links() -> None:
    with LinkMonitor() as mon:
        with veth_pair(root_end=True) as p:
            events: list = []
            end = time.monotonic() + 5
            while time.monotonic() < end and not any(e.name == p.a.ifname for e in events):
                events += mon.poll(0.2)
            mine = [(e.up, e.removed) for e in events if e.name == p.a.ifname]
            assert mine == [(True, False)]  # appeared down (not reported), then came up
        events = []
        end = time.monotonic() + 5
        while time.monotonic() < end and not any(e.removed for e in events):
            events += mon.poll(0.2)
        gone = [(e.up, e.removed) for e in events if e.name == p.a.ifname]
        assert gone[-1] == (False, True)
