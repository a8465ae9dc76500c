"""`flagd run --workers 2` on a veth pair: fanout keeps flows whole, each classified once."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from tests.netns import netns_unavailable, veth_pair
from tests.test_daemon_live import _no_daemon_left_behind, read_events, start_daemon, stop_daemon  # noqa: F401

pytestmark = pytest.mark.netns

why = netns_unavailable()
if why:
    pytest.skip(why, allow_module_level=True)


def children(pid: int) -> list[int]:
    """Child processes of every thread of pid (a restart forks from the capture thread)."""
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def wait_for_children(pid: int, n: int, gone: int | None = None) -> list[int]:
    """The daemon's n capture processes (forked children), once `gone` is not among them."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = children(pid)
        if len(kids) == n and gone not in kids:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"expected {n} capture processes, found {children(pid)}")


def test_two_capture_processes_classify_every_flow_exactly_once(tmp_path, tiny_bundle):
    log = tmp_path / "events.jsonl"
    with veth_pair(root_end=True) as pair:
        proc = start_daemon(pair.a.ifname, log, tiny_bundle, "--workers", "2")
        wait_for_children(proc.pid, 2)
        flows = []
        for port in (8443, 8444, 8445):
            flows += pair.run_tls(conns=6, msgs=3, size=200, port=port)
        udp = [pair.run_udp(count=6, size=100, port=p) for p in (9000, 9001, 9002, 9003)]
        time.sleep(1.0)
        took = stop_daemon(proc)
    assert took < 5
    events = read_events(log)
    cls = Counter((e["proto"], e["src_port"], e["dest_port"]) for e in events
                  if e["event_type"] == "classification")
    ends = Counter((e["proto"], e["src_port"], e["dest_port"]) for e in events
                   if e["event_type"] == "flow")
    for f in flows:
        key = ("TCP", f.sport, f.dport)
        assert cls[key] == 1 and ends[key] == 1, key
    for f in udp:
        key = ("UDP", f.sport, f.dport)
        assert cls[key] == 1 and ends[key] == 1, key
    flow_ev = {(e["proto"], e["src_port"], e["dest_port"]): e for e in events if e["event_type"] == "flow"}
    # Not split across processes: each flow has both directions in one record.
    for f in udp:
        e = flow_ev[("UDP", f.sport, f.dport)]["flow"]
        assert (e["pkts_toserver"], e["pkts_toclient"]) == (6, 6)
    final = [e for e in events if e["event_type"] == "stats"][-1]["stats"]
    assert final["final"] and final["drops"]["capture_process_loss"] == 0
    assert final["packets"] >= sum(24 for _ in udp)


def test_a_crashed_capture_process_is_restarted(tmp_path, tiny_bundle):
    log = tmp_path / "events.jsonl"
    with veth_pair(root_end=True) as pair:
        proc = start_daemon(pair.a.ifname, log, tiny_bundle, "--workers", "2")
        victim = wait_for_children(proc.pid, 2)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for_children(proc.pid, 2, gone=victim)  # restarted
        time.sleep(0.5)
        flows = pair.run_tls(conns=6, msgs=2, size=100)
        time.sleep(0.5)
        stop_daemon(proc)
    events = read_events(log)
    cls = Counter(e["src_port"] for e in events if e["event_type"] == "classification")
    assert all(cls[f.sport] == 1 for f in flows)  # the restarted process captures again
    final = [e for e in events if e["event_type"] == "stats"][-1]["stats"]
    assert "capture_process_loss" in final["drops"]
