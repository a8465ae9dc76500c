"""Fragmented UDP live: one capture process (user-space reassembly) and two (the kernel's fanout
defrag) meter the same flows, with the same counters and the same model input.

Both daemons run at once on the same veth end, so they see the very same packets (IP ids and
checksums included); the model input is compared through the tiny model's output, which is a
function of it (label, confidence and top-k to four decimals).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.netns import netns_unavailable, veth_pair
from tests.test_daemon_live import _no_daemon_left_behind, read_events, start_daemon, stop_daemon  # noqa: F401
from tests.test_fanout import wait_for_children

pytestmark = pytest.mark.netns

why = netns_unavailable()
if why:
    pytest.skip(why, allow_module_level=True)

# Datagrams of each flow, in bytes of UDP payload: over the 1500-byte MTU they leave as 2-3
# fragments (DF off), the small ones whole.
SIZES = (3000, 120, 2000, 1400, 4000, 60)
FLOWS = 6

_SENDER = """
import socket, sys, time
dst, n, sizes = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0
for k, size in enumerate(sizes):
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 21000 + i))
        s.sendto(bytes([0x17, 3, 3, i, k]) + bytes((j * 7 + i) % 251 for j in range(size - 5)),
                 (dst, 4433))
        s.close()
    time.sleep(0.05)
"""


def _by_port(events: list[dict], kind: str) -> dict[int, dict]:
    return {e["src_port"]: e for e in events if e["event_type"] == kind and e["proto"] == "UDP"
            and 21000 <= e["src_port"] < 21000 + FLOWS}


def test_fragmented_udp_flows_meter_the_same_with_one_and_two_capture_processes(tmp_path,
                                                                               tiny_bundle):
    logs = {n: tmp_path / f"workers{n}.jsonl" for n in (1, 2)}
    with veth_pair(root_end=True) as pair:
        one = start_daemon(pair.a.ifname, logs[1], tiny_bundle, "--workers", "1")
        two = start_daemon(pair.a.ifname, logs[2], tiny_bundle, "--workers", "2")
        wait_for_children(two.pid, 2)
        time.sleep(0.5)
        pair.run(pair.b, [sys.executable, "-c", _SENDER, pair.a.addr, str(FLOWS),
                          ",".join(map(str, SIZES))], timeout=60)
        time.sleep(1.0)
        stop_daemon(one)
        stop_daemon(two)
    ev = {n: read_events(log) for n, log in logs.items()}
    flows = {n: _by_port(e, "flow") for n, e in ev.items()}
    cls = {n: _by_port(e, "classification") for n, e in ev.items()}
    assert len(flows[1]) == len(flows[2]) == FLOWS
    for port in flows[1]:
        a, b = flows[1][port]["flow"], flows[2][port]["flow"]
        # one packet per datagram, its wire size the whole datagram's (14 + 20 + 8 + payload)
        assert a["pkts_toserver"] == len(SIZES), a
        assert a["bytes_toserver"] == sum(14 + 28 + s for s in SIZES), a
        for field in ("pkts_toserver", "pkts_toclient", "bytes_toserver", "bytes_toclient"):
            assert a[field] == b[field], (port, field, a, b)
        ca, cb = cls[1][port]["flag"], cls[2][port]["flag"]
        assert ca["packets_used"] == cb["packets_used"] == 3  # the tiny bundle's K
        assert (ca["label"], ca["confidence"], ca["top_k"]) == (cb["label"], cb["confidence"],
                                                                cb["top_k"])
    # the one-process daemon reassembled (nothing given up), the kernel did it for the other two
    final1 = [e["stats"] for e in ev[1] if e["event_type"] == "stats"][-1]
    assert not any(k.startswith("frag") for k in final1["skipped"]), final1["skipped"]


def test_sender_really_fragments(tmp_path):
    """The traffic above is fragmented on the wire (else the test would prove nothing)."""
    from flagd.capture import open_capture
    from flagd.packets import decode

    with veth_pair(root_end=True) as pair:
        cap = open_capture(pair.a.ifname)
        try:
            subprocess.run(pair.command(pair.b, [sys.executable, "-c", _SENDER, pair.a.addr, "1",
                                                 "3000"]), check=True, timeout=30)
            time.sleep(0.3)
            p = decode(cap.drain())
        finally:
            cap.close()
    assert int(p.frag.sum()) == 3
