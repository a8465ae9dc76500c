"""`flagd run` on a real veth pair with real TLS and UDP traffic (needs root; CI is root).

The daemon runs as a subprocess, exactly as a user starts it; a second, independent capture in
the test counts the packets of every 5-tuple so the daemon's counters can be checked exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.netns import netns_unavailable, veth_pair

pytestmark = pytest.mark.netns

why = netns_unavailable()
if why:
    pytest.skip(why, allow_module_level=True)


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_daemon_left_behind():
    """A test that fails half-way must not leave its daemon capturing."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_daemon(iface: str, log: Path, model: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flagd", "run", "--iface", iface, "--no-dashboard", "--log", str(log),
         "--model", str(model), "--stats-interval", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _started.append(proc)
    # Generous: importing torch alone has taken 46 s on this shared 2-core machine under load.
    deadline = time.monotonic() + 180
    while not log.exists():  # the log opens once the capture socket is open
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"daemon did not start: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def stop_daemon(proc: subprocess.Popen) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    took = time.monotonic() - t0
    assert proc.returncode == 0, err
    return took


class Reference:
    """An independent capture counting packets per (client, server) direction of each 5-tuple."""

    def __init__(self, iface: str) -> None:
        from flagd.capture import open_capture

        self.cap = open_capture(iface)
        self.counts: Counter = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from flagd.events import ip_text
        from flagd.packets import decode

        while not self.stop.is_set():
            p = decode(self.cap.read(0.05))
            for i in range(len(p)):
                if p.skip[i] == 0:
                    src = ip_text(p.src[i].tobytes(), int(p.version[i]))
                    dst = ip_text(p.dst[i].tobytes(), int(p.version[i]))
                    self.counts[(int(p.proto[i]), src, int(p.sport[i]), dst, int(p.dport[i]))] += 1

    def close(self) -> Counter:
        time.sleep(0.3)
        self.stop.set()
        self.thread.join()
        self.cap.close()
        return self.counts


def read_events(*paths: Path) -> list[dict]:
    events = []
    for p in paths:
        for line in p.read_text().splitlines():
            events.append(json.loads(line))  # a torn line would raise here
    return events


def test_every_connection_is_classified_once_with_exact_counters(tmp_path, tiny_bundle):
    log = tmp_path / "events.jsonl"
    with veth_pair(root_end=True) as pair:
        ref = Reference(pair.a.ifname)
        proc = start_daemon(pair.a.ifname, log, tiny_bundle)
        tls = pair.run_tls(conns=6, msgs=4, size=300)
        udp = pair.run_udp(count=12, size=120)
        time.sleep(1.0)
        took = stop_daemon(proc)
        seen = ref.close()
    assert took < 5, f"shutdown took {took:.1f} s"
    events = read_events(log)
    from jsonschema import Draft202012Validator

    from flagd.events import schema
    validator = Draft202012Validator(schema())
    for ev in events:
        validator.validate(ev)
    cls = Counter((e["proto"], e["src_ip"], e["src_port"], e["dest_ip"], e["dest_port"])
                  for e in events if e["event_type"] == "classification")
    flows = {(e["proto"], e["src_ip"], e["src_port"], e["dest_ip"], e["dest_port"]): e
             for e in events if e["event_type"] == "flow"}
    for f in [*tls, udp]:
        key = ({6: "TCP", 17: "UDP"}[f.proto], f.src, f.sport, f.dst, f.dport)
        assert cls[key] == 1, f"{key}: {cls[key]} classification events"
        ev = flows[key]
        assert ev["flow"]["pkts_toserver"] == seen[(f.proto, f.src, f.sport, f.dst, f.dport)]
        assert ev["flow"]["pkts_toclient"] == seen[(f.proto, f.dst, f.dport, f.src, f.sport)]
        assert ev["flag"]["label"] in ("chat", "streaming", "voip")
    assert flows[("UDP", udp.src, udp.sport, udp.dst, udp.dport)]["flow"]["pkts_toserver"] == 12
    assert all(flows[("TCP", f.src, f.sport, f.dst, f.dport)]["flow"]["state"] == "closed" for f in tls)
    final = [e for e in events if e["event_type"] == "stats"][-1]["stats"]
    assert final["final"] and final["drops"]["kernel"] == 0 and final["classified"] == len(tls) + 1


def test_sighup_rotation_under_traffic_loses_and_tears_nothing(tmp_path, tiny_bundle):
    log = tmp_path / "events.jsonl"
    rotated = tmp_path / "events.jsonl.1"
    with veth_pair(root_end=True) as pair:
        proc = start_daemon(pair.a.ifname, log, tiny_bundle)
        flows = []
        for round_ in range(4):
            flows += pair.run_tls(conns=4, msgs=2, size=100, port=8443 + round_)
            if round_ == 1:
                time.sleep(0.3)
                log.rename(rotated)
                proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        stop_daemon(proc)
    assert log.exists() and rotated.exists()
    events = read_events(rotated, log)
    cls = [e for e in events if e["event_type"] == "classification"]
    ends = [e for e in events if e["event_type"] == "flow"]
    assert len(cls) == len(flows) == 16
    assert len({e["flow_id"] for e in ends}) == len(ends) and len(ends) == 16
    assert any(e["event_type"] == "classification" for e in read_events(log))


def test_unknown_interface_lists_the_real_ones(tmp_path, tiny_bundle):
    r = subprocess.run([sys.executable, "-m", "flagd", "run", "--iface", "nosuch0", "--no-dashboard",
                        "--model", str(tiny_bundle)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "no interface 'nosuch0'" in r.stderr and "lo" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_without_cap_net_raw_names_the_capability(tmp_path, tiny_bundle):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop the capability")
    r = subprocess.run(["setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw",
                        sys.executable, "-m", "flagd", "run", "--iface", "lo", "--no-dashboard",
                        "--model", str(tiny_bundle)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "CAP_NET_RAW" in r.stderr and "Traceback" not in r.stderr


def test_runs_as_an_unprivileged_user_after_opening_the_socket(tmp_path, tiny_bundle):
    if os.geteuid() != 0:
        pytest.skip("needs root to change user")
    import pwd

    nobody = pwd.getpwnam("nobody")
    log = tmp_path / "events.jsonl"
    with veth_pair(root_end=True) as pair:
        proc = start_daemon(pair.a.ifname, log, tiny_bundle, "--user", "nobody")
        deadline = time.monotonic() + 60
        while True:  # the drop follows the log's opening: wait for it, do not guess a delay
            status = Path(f"/proc/{proc.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            caps = next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1]
            if set(uids) != {"0"} or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        flows = pair.run_tls(conns=3, msgs=2, size=100)
        time.sleep(0.5)
        stop_daemon(proc)
    assert set(map(int, uids)) == {nobody.pw_uid}
    assert int(caps, 16) == 0
    cls = [e for e in read_events(log) if e["event_type"] == "classification"]
    assert sorted(e["src_port"] for e in cls) == sorted(f.sport for f in flows)


def test_link_down_and_up_is_reported_not_fatal(tmp_path, tiny_bundle):
    log = tmp_path / "events.jsonl"
    with veth_pair(root_end=True) as pair:
        proc = start_daemon(pair.a.ifname, log, tiny_bundle)
        time.sleep(0.3)
        pair.set_link(pair.a, up=False)
        time.sleep(0.5)
        pair.set_link(pair.a, up=True)
        time.sleep(1.0)
        flows = pair.run_tls(conns=2, msgs=2, size=100)  # still capturing after the flap
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert f"link {pair.a.ifname} is down" in err and f"link {pair.a.ifname} is up" in err
    cls = [e for e in read_events(log) if e["event_type"] == "classification"]
    assert sorted(e["src_port"] for e in cls) == sorted(f.sport for f in flows)


def test_removed_interface_stops_the_daemon_with_its_reason(tmp_path, tiny_bundle):
    log = tmp_path / "events.jsonl"
    with veth_pair(root_end=True) as pair:
        proc = start_daemon(pair.a.ifname, log, tiny_bundle)
        pair.run_udp(count=4, size=50)
        subprocess.run(["ip", "link", "del", pair.a.ifname], check=True)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert f"interface {pair.a.ifname} was removed" in err and "Traceback" not in err
    events = read_events(log)  # what was captured before is still written, stats included
    assert [e["event_type"] for e in events].count("classification") == 1
    assert events[-1]["event_type"] == "stats" and events[-1]["stats"]["final"]
