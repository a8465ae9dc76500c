"""`flagd run --workers 2` on a veth pair: fanout keeps flows whole, each classified once."""

from __future__ import annotations

import os
import select
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
    """Child processes of every thread of pid."""
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def capture_processes(pid: int) -> list[int]:
    """The daemon's capture processes: the children of its capture helper (its only child)."""
    return [k for helper in children(pid) for k in children(helper)]


def wait_for_children(pid: int, n: int, gone: int | None = None) -> list[int]:
    """The daemon's n capture processes, once `gone` is not among them."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        kids = capture_processes(pid)
        if len(kids) == n and gone not in kids:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"expected {n} capture processes, found {capture_processes(pid)}")


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


def wait_for_stderr(proc, text: str, timeout: float = 30) -> list[str]:
    """stderr lines of the daemon up to the one that contains `text` (read from the raw pipe:
    a buffered readline would hide the lines it read ahead from select)."""
    data = b""
    deadline = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while time.monotonic() < deadline and text.encode() not in data:
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    lines = data.decode(errors="replace").splitlines()
    assert any(text in line for line in lines), f"no {text!r} on stderr: {lines}"
    return lines


@pytest.mark.parametrize("user", [None, "nobody"])
def test_a_crashed_capture_process_is_restarted(tmp_path, tiny_bundle, user):
    """A killed capture process is restarted by the capture helper (a fresh, thread-free
    process that kept CAP_NET_RAW), also once the daemon itself runs as --user nobody."""
    if user and os.geteuid() != 0:
        pytest.skip("needs root to change user")
    log = tmp_path / "events.jsonl"
    extra = ["--workers", "2", *(["--user", user] if user else [])]
    with veth_pair(root_end=True) as pair:
        proc = start_daemon(pair.a.ifname, log, tiny_bundle, *extra)
        victim = wait_for_children(proc.pid, 2)[0]
        first = pair.run_tls(conns=3, msgs=2, size=100, port=8443)
        os.kill(victim, signal.SIGKILL)
        wait_for_children(proc.pid, 2, gone=victim)
        said = wait_for_stderr(proc, "is capturing again")  # its socket is in the group again
        uids = {int(line.split()[1]) for pid in wait_for_children(proc.pid, 2)
                for line in open(f"/proc/{pid}/status") if line.startswith("Uid:")}
        flows = pair.run_tls(conns=6, msgs=2, size=100, port=8444)
        time.sleep(0.5)
        stop_daemon(proc)
    assert any("died; restarting it" in line for line in said), said
    events = read_events(log)
    cls = Counter(e["src_port"] for e in events if e["event_type"] == "classification")
    assert all(cls[f.sport] == 1 for f in flows), cls  # the restarted process captures again
    assert all(cls[f.sport] <= 1 for f in first)  # never twice, even across the restart
    final = [e for e in events if e["event_type"] == "stats"][-1]["stats"]
    assert "capture_process_loss" in final["drops"]
    if user:
        import pwd

        assert uids == {pwd.getpwnam(user).pw_uid}  # the restarted one became the user too
