"""Least privilege: the systemd unit grants CAP_NET_RAW only, `--user` leaves no capability in any
thread, and the event log is created 0640 whatever the umask."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import crafted

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "flagd.service"


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_grants_cap_net_raw_and_nothing_else():
    s = unit_settings()
    assert s["AmbientCapabilities"] == ["CAP_NET_RAW"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_RAW"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s.get("DynamicUser") == ["yes"] or s.get("User")  # never root
    assert "User" not in s or s["User"] != ["root"]
    assert "AF_PACKET" in s["RestrictAddressFamilies"][0].split()
    assert "AF_INET" not in s["RestrictAddressFamilies"][0].split()
    assert int(s["UMask"][0], 8) & 0o007 == 0o007  # nothing for others


def test_systemd_analyze_rates_the_unit_ok():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"systemd-analyze security --offline not supported here: {r.stderr.strip()[:200]}")
    assert float(m.group(1)) <= 2.0, r.stdout[-2000:]


def test_log_is_created_0640_even_with_umask_0(tmp_path):
    cap = crafted.write_pcap(tmp_path / "one.pcap", [crafted.Record(1.0, crafted.ether(crafted.tcp4()))], 1)
    log = tmp_path / "events.jsonl"
    r = subprocess.run([sys.executable, "-m", "flagd", "replay", str(cap), "--no-model", "--log",
                        str(log), "--no-dashboard"], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: os.umask(0))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(log.stat().st_mode) == 0o640


def caps(status: str) -> dict[str, int]:
    return {k: int(v.split()[0], 16) for k, v in
            (line.split(":", 1) for line in status.splitlines()) if k.startswith("Cap")}


@pytest.fixture(scope="module")
def daemon_threads(tmp_path_factory, tiny_bundle) -> list[str]:
    """/proc status of every thread of `flagd run --user nobody` on lo, once it runs."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change user")
    bundle = tiny_bundle
    log = tmp_path_factory.mktemp("user") / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "flagd", "run", "--iface", "lo", "--no-dashboard",
                             "--log", str(log), "--model", str(bundle), "--user", "nobody"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and log.stat().st_size):  # first stats event: pipeline running
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        tasks = list(Path(f"/proc/{proc.pid}/task").iterdir())
        statuses = [(t / "status").read_text() for t in tasks]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len(tasks) >= 3  # capture, batcher, worker (and torch's own)
    return statuses


def test_user_option_leaves_no_capability_in_any_thread(daemon_threads):
    """Capabilities are per thread: torch starts threads before the socket is opened, so every
    thread of the running daemon must have lost them, not only the main one."""
    statuses = daemon_threads
    nobody = str(pwd.getpwnam("nobody").pw_uid)
    for st_ in statuses:
        c = caps(st_)
        assert c["CapEff"] == c["CapPrm"] == c["CapAmb"] == 0, st_
        uid = next(line for line in st_.splitlines() if line.startswith("Uid:")).split()[1:]
        assert set(uid) == {nobody}
    main = [st_ for st_ in statuses if _is_main(st_)]
    assert len(main) == 1 and "NoNewPrivs:\t1" in main[0]


def _is_main(status: str) -> bool:
    f = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return f["Pid"] == f["Tgid"]


def test_user_option_sets_no_new_privs_in_every_thread(daemon_threads):
    assert all("NoNewPrivs:\t1" in s for s in daemon_threads)


@pytest.fixture(scope="module")
def ambient_daemon_threads(tmp_path_factory, tiny_bundle) -> tuple[list[str], list[dict]]:
    """/proc status of every thread of `flagd run` started the way systemd starts the unit: its
    only capability is CAP_NET_RAW, in the ambient set (AmbientCapabilities=CAP_NET_RAW).

    The uid stays 0 here, with the securebits that take root's automatic capabilities away
    (noroot: exec grants nothing for being uid 0), because the interpreter of this test
    machine lives under /root, which no other user can read; capabilities are what is tested.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process with an ambient capability")
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux setpriv")
    log = tmp_path_factory.mktemp("ambient") / "events.jsonl"
    proc = subprocess.Popen(
        ["setpriv", "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
         "--bounding-set=-all,+net_raw", "--inh-caps=-all,+net_raw", "--ambient-caps=+net_raw",
         sys.executable, "-m", "flagd", "run", "--iface", "lo", "--no-dashboard",
         "--log", str(log), "--model", str(tiny_bundle), "--stats-interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (log.exists() and log.stat().st_size):  # first stats event: pipeline running
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        tasks = list(Path(f"/proc/{proc.pid}/task").iterdir())
        statuses = [(t / "status").read_text() for t in tasks]
        helper = [int(k) for t in tasks for k in (t / "children").read_text().split()]
        helper_caps = [caps(Path(f"/proc/{pid}/status").read_text()) for pid in helper]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return statuses, helper_caps


def test_ambient_cap_net_raw_is_gone_from_every_thread(ambient_daemon_threads):
    """The daemon gives its ambient CAP_NET_RAW up before any thread starts (torch's
    included), in every set of every thread; only its capture helper keeps it."""
    statuses, helper_caps = ambient_daemon_threads
    before = caps(Path("/proc/self/status").read_text())  # sanity: the test itself is root
    assert before["CapEff"] != 0
    assert len(statuses) >= 3  # capture, batcher, worker (and torch's own)
    for st_ in statuses:
        c = caps(st_)
        assert c["CapEff"] == c["CapPrm"] == c["CapAmb"] == c["CapInh"] == 0, st_
        assert "NoNewPrivs:\t1" in st_
    net_raw = 1 << 13
    assert len(helper_caps) == 1 and helper_caps[0]["CapEff"] == net_raw


_HELPER_PROBE = """
import json, os, pickle, socket, sys
from flagd.helper import Helper, _recv

class RunsCode:  # what a daemon taken over through its packet parser could send
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[1],))

h = Helper.start()
h._sock.send(pickle.dumps(RunsCode()))
reply, _ = _recv(h._sock)
sock = h.packet_socket(socket.SOCK_RAW)  # still does its job afterwards
status = open(f"/proc/{h.pid}/status").read()
print(json.dumps({"reply": reply, "status": status, "socket": sock.fileno() >= 0}))
h.close()
"""


def test_the_capture_helper_keeps_only_capture_capabilities_and_runs_no_pickle(tmp_path):
    """The helper is the one process that stays privileged: it narrows itself to CAP_NET_RAW,
    CAP_SETUID and CAP_SETGID (bounding set too), and a pickle sent to it is refused, not run."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the helper narrows root's capabilities")
    canary = tmp_path / "ran"
    r = subprocess.run([sys.executable, "-c", _HELPER_PROBE, str(canary)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["reply"][0] == "error" and out["socket"]
    assert not canary.exists()
    want = 1 << 6 | 1 << 7 | 1 << 13  # CAP_SETGID, CAP_SETUID, CAP_NET_RAW
    c = caps(out["status"])
    assert c["CapEff"] == c["CapPrm"] == c["CapBnd"] == want, c
    assert c["CapInh"] == c["CapAmb"] == 0
