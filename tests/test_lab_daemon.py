"""The live daemon on a real lab application's traffic: `flagd run --model models/lab12` on a lab
client's link while one short session of each plain class runs (needs root and the lab's Debian
programs; CI has both).

tests/test_daemon_live.py runs the daemon on traffic the test makes itself, and test_lab.py's
on-the-lab-link test on a stand-in app; this one is what a user of the lab model sees: the daemon,
started as a user starts it, inside the client's namespace, on the link the lab records. The
session captures say which flows there were, and the daemon must classify each exactly once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from flagd.lab import apps, doctor, topology
from flagd.lab.generate import Settings, generate

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "lab12"
# one app per plain class: the ones with the quickest server start-up
APPS = {
    "chat": "irc-tls",
    "email": "smtps",
    "file-transfer": "sftp",
    "streaming": "icecast-https",
    "voip": "sip-tls",
    "torrent": "aria2",
}

why = topology.netns_unavailable()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(why is not None, reason=why or ""),
]


def endpoints(proto: int | str, a: tuple[str, int], b: tuple[str, int]) -> tuple:
    """A flow both ways round: (proto number, {endpoint, endpoint})."""
    number = {"TCP": 6, "UDP": 17}.get(proto, proto) if isinstance(proto, str) else proto
    return number, frozenset({a, b})


@pytest.mark.usefixtures("no_delay_line")
def test_the_daemon_classifies_every_flow_of_real_lab_sessions_once(tmp_path):
    gone = {n: doctor.missing(apps.APPS[n].programs) for n in APPS.values()}
    gone = {n: reqs for n, reqs in gone.items() if reqs}
    if gone:
        line = doctor.apt_line([r for reqs in gone.values() for r in reqs])
        pytest.skip(f"{', '.join(gone)} need programs that are not installed: {line}")
    if not (MODEL / "bundle.json").exists():
        pytest.skip(f"no model bundle at {MODEL}")
    log = tmp_path / "events.jsonl"
    daemon: list[subprocess.Popen] = []

    def start(lab) -> None:  # once the servers run, before the first session
        client = lab.clients[0]
        argv = [sys.executable, "-m", "flagd", "run", "--model", str(MODEL), "--iface",
                client.ifname, "--log", str(log), "--no-dashboard", "--stats-interval", "0"]  # fmt: skip
        proc = lab.popen(client.ns, argv, log="flagd-run", must_live=False)
        daemon.append(proc)
        deadline = time.monotonic() + 120  # loading torch and the model on a busy machine
        while not log.exists():  # the log opens once the capture socket is
            assert proc.poll() is None, lab.log("flagd-run")[-2000:]
            assert time.monotonic() < deadline, "flagd run did not open its log"
            time.sleep(0.1)

    done: list[dict] = []

    def progress(record: dict) -> None:
        done.append(record)
        if len(done) == len(APPS):  # the last session: stop the daemon before the teardown
            proc = daemon[0]
            time.sleep(1.0)  # the last packets through the ring
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    started = time.monotonic()
    settings = Settings(
        out=tmp_path / "run", classes=tuple(APPS), apps=tuple(APPS.values()), sessions=1,
        seconds=4, seed=3,
    )  # fmt: skip
    doc = generate(settings, progress, on_ready=start)
    took = time.monotonic() - started
    assert daemon[0].returncode == 0

    events = [json.loads(line) for line in log.read_text().splitlines()]
    classified = Counter(
        endpoints(e["proto"], (e["src_ip"], e["src_port"]), (e["dest_ip"], e["dest_port"]))
        for e in events
        if e["event_type"] == "classification"
    )
    labels = set(json.loads((MODEL / "bundle.json").read_text())["labels"])
    assert {e["flag"]["label"] for e in events if e["event_type"] == "classification"} <= labels | {"unknown"}
    assert {s["class"] for s in doc["sessions"]} == set(APPS)
    for s in doc["sessions"]:
        assert s["valid"], (s["id"], s["reason"])
        for f in s["flows"]:
            key = endpoints(f["proto"], (f["src"], f["sport"]), (f["dst"], f["dport"]))
            assert classified[key] == 1, (s["id"], f, classified[key])
    session_flows = {
        endpoints(f["proto"], (f["src"], f["sport"]), (f["dst"], f["dport"]))
        for s in doc["sessions"]
        for f in s["flows"]
    }
    assert len(session_flows) >= len(APPS)  # a torrent session alone has two (tracker, peer)
    # nothing classified that no session had (the daemon started after the servers did)
    assert set(classified) <= session_flows
    assert took < 180, f"the test took {took:.0f} s"
