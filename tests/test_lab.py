"""The traffic lab: topology, teardown, stale cleanup, doctor, validation, pcap output, manifest,
and a smoke run of every plain class whose Debian programs are installed.

Everything except the smoke test runs without the lab's Debian packages: the generation tests
use a stand-in app (a Python TLS echo server and client, the same machinery as a real app).
Namespace tests need root (CI is root) and skip with the reason otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from flagd.capture import list_interfaces
from flagd.frames import Frames
from flagd.lab import apps, conditions, doctor, topology
from flagd.lab.apps import App, RunContext, voip, wait_tcp
from flagd.lab.cli import Exit, lab_app
from flagd.lab.generate import (
    BENCHMARK_APPS,
    FORMAT,
    Settings,
    generate,
    plan,
    resumed_impairment,
    summarize,
)
from flagd.lab.pki import DOMAIN, make_pki
from flagd.lab.record import (
    Recorder,
    Rules,
    keep_first,
    session_stats,
    validate,
    write_pcap,
)
from flagd.lab.topology import (
    SERVER_ADDR,
    SERVER_NET,
    build_lab,
    in_netns,
    is_lab_address,
    lab_namespaces,
    link_packets,
    reap_stale,
    wait_quiet,
)
from flagd.lab.tunnel import Ipsec, OpenVpn, WireGuard, staged_flush
from flagd.packets import decode
from flagd.pcapfile import read_capture
from tests import crafted
from tests.netns import veth_pair

ROOT = Path(__file__).resolve().parents[1]
why_no_netns = topology.netns_unavailable()
netns = pytest.mark.skipif(why_no_netns is not None, reason=why_no_netns or "")
DOC_NETS = [ipaddress.ip_network(n) for n in ("198.51.100.0/24", "203.0.113.0/24")]


def own_namespaces() -> list[str]:
    return [ns for ns in lab_namespaces() if ns.split("-")[1] == str(os.getpid())]


# -- a stand-in app: TLS echo in Python, so generation is tested without Debian packages -------

SERVER = """
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
def serve(conn):
    with conn:
        try:
            s = conn if sys.argv[5] == "1" else ctx.wrap_socket(conn, server_side=True)
            while data := s.recv(65536):
                s.sendall(data)
        except OSError:
            pass
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""

CLIENT = """
import os, socket, ssl, sys
host, port, ca, n, plain = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
sock = socket.create_connection((host, port), timeout=10)
if not plain:
    sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname=host)
for k in range(n):
    msg = (b"hello lab, this is plain text " * 8) if plain else os.urandom(300)
    sock.sendall(msg)
    got = b""
    while len(got) < len(msg):
        got += sock.recv(65536)
sys.exit(0 if plain or got else 1)
"""


class EchoTls(App):
    label = "test-echo"
    name = "tls-echo"
    programs = ("openssl",)
    plaintext = False

    def start(self, ctx: RunContext) -> None:
        if self.name in ctx.shared:
            return
        script = ctx.lab.state / "echo_server.py"
        script.write_text(SERVER)
        port = ctx.port(8080 if self.plaintext else 8443, self.name)
        argv = [sys.executable, str(script), SERVER_ADDR, str(port), str(ctx.pki.chain)]
        argv += [str(ctx.pki.key), "1" if self.plaintext else "0"]
        proc = ctx.lab.popen(ctx.lab.server, argv, log=self.name)
        wait_tcp(ctx.lab, port, proc=proc)
        ctx.shared[self.name] = port

    def params(self, rng, seconds, budget_mbit=None):
        return {"messages": rng.randint(5, 15)}

    def session(self, ctx, client, params):
        script = ctx.lab.state / "echo_client.py"
        script.write_text(CLIENT)
        argv = [sys.executable, str(script), SERVER_ADDR, str(ctx.shared[self.name])]
        argv += [str(ctx.pki.ca), str(params["messages"]), "1" if self.plaintext else "0"]
        return ctx.lab.run(client.ns, argv, timeout=30).returncode


class EchoPlain(EchoTls):
    """The same echo without TLS: its sessions must be rejected as not encrypted."""

    label = "test-plain"
    name = "plain-echo"
    plaintext = True


@pytest.fixture
def stand_in(monkeypatch):
    for app in (EchoTls, EchoPlain):
        monkeypatch.setitem(apps.APPS, app.name, app)
        monkeypatch.setitem(apps.CLASSES, app.label, [app.name])


# -- topology ------------------------------------------------------------------------------------


@netns
def test_topology_addresses_routes_and_reachability():
    with build_lab(2) as lab:
        assert set(own_namespaces()) == set(lab.namespaces)
        for ns in lab.namespaces:
            for addr in topology.addresses(ns):
                assert any(ipaddress.ip_address(addr) in net for net in DOC_NETS), (ns, addr)
            for dst, _gw in topology.routes(ns):
                assert dst != "0.0.0.0/0", f"default route in {ns}"
        assert topology.addresses(lab.server) == [SERVER_ADDR]
        assert {c.addr for c in lab.clients} == {"203.0.113.130", "203.0.113.134"}
        assert lab.offloads_off == (shutil.which("ethtool") is not None)
        # a VPN session's isolation takes the server's only way back to that client away
        with lab.isolate(lab.clients[1]):
            dsts = [d for d, _ in topology.routes(lab.server)]
            assert lab.clients[1].subnet not in dsts and lab.clients[0].subnet in dsts
        assert lab.clients[1].subnet in [d for d, _ in topology.routes(lab.server)]
        # a TCP connection from each client to the server crosses the router
        with topology.in_netns(lab.server):
            srv = socket.create_server((SERVER_ADDR, 7000))
        with srv:
            for c in lab.clients:
                with topology.in_netns(c.ns):
                    cli = socket.socket()
                cli.settimeout(5)
                cli.connect((SERVER_ADDR, 7000))
                conn, peer = srv.accept()
                assert peer[0] == c.addr  # no NAT anywhere
                conn.close()
                cli.close()
    assert own_namespaces() == []
    assert not list(Path("/tmp").glob(f"flagdlab-{os.getpid()}-*"))


@netns
def test_nothing_in_the_callers_namespace():
    before = {link.name for link in list_interfaces()}
    with build_lab(1):
        during = {link.name for link in list_interfaces()}
    assert during == before


@netns
def test_teardown_kills_processes_including_escaped_daemons():
    with build_lab(1) as lab:
        lab.popen(lab.server, ["sleep", "300"])
        # a daemon that double-forks out of its process group: found through its namespace
        lab.run(lab.server, ["sh", "-c", "setsid sleep 301 >/dev/null 2>&1 &"])
        time.sleep(0.3)
        pids = topology.namespace_pids(lab.server)
        assert len(pids) >= 2
    time.sleep(0.2)
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    assert own_namespaces() == []


@netns
def test_teardown_on_exception():
    with pytest.raises(RuntimeError, match="boom"), build_lab(1) as lab:
        lab.popen(lab.server, ["sleep", "300"])
        raise RuntimeError("boom")
    assert own_namespaces() == []


@netns
def test_crashed_server_is_reported():
    with build_lab(1) as lab:
        lab.popen(lab.server, ["sh", "-c", "exit 3"])
        time.sleep(0.3)
        with pytest.raises(topology.LabError, match="exited with status 3"):
            lab.check_processes()


@netns
def test_second_run_cleans_up_after_a_killed_run(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time
        from flagd.lab.topology import build_lab
        with build_lab(1) as lab:
            lab.popen(lab.server, ["sleep", "300"])
            print(lab.tag, flush=True)
            time.sleep(300)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    tag = proc.stdout.readline().strip()
    assert tag.startswith("flagdlab-")
    mine = [ns for ns in lab_namespaces() if ns.startswith(tag + "-")]
    assert len(mine) == 3
    pids = topology.namespace_pids(f"{tag}-srv")
    proc.send_signal(signal.SIGKILL)  # no teardown runs
    proc.wait()
    assert [ns for ns in lab_namespaces() if ns.startswith(tag + "-")] == mine
    removed = reap_stale()
    assert set(mine) <= set(removed)
    assert not [ns for ns in lab_namespaces() if ns.startswith(tag + "-")]
    time.sleep(0.2)
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not list(Path("/tmp").glob(f"{tag}-*"))


@netns
def test_sigterm_tears_down(tmp_path, stand_in):
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from tests.test_lab import EchoTls
        from flagd.lab import apps
        from flagd.lab.generate import Settings, generate
        apps.APPS[EchoTls.name] = EchoTls
        apps.CLASSES[EchoTls.label] = [EchoTls.name]
        try:
            generate(Settings(out=Path({str(out)!r}), classes=("test-echo",), sessions=1000),
                     lambda rec: print("session", flush=True))
        except KeyboardInterrupt:
            sys.exit(130)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "session"
    tag = f"flagdlab-{proc.pid}-"
    assert [ns for ns in lab_namespaces() if ns.startswith(tag)]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert not [ns for ns in lab_namespaces() if ns.startswith(tag)]
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["interrupted"] is True and doc["finished"]
    assert doc["sessions"] and all(s["valid"] for s in doc["sessions"])


# -- generation with the stand-in app ----------------------------------------------------------


RESUMABLE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.test_lab import EchoTls
    from flagd.lab import apps, conditions
    from flagd.lab.generate import Settings, generate
    from tests.conftest import kernel_impairment
    # what the no_delay_line fixture does: this test is about resuming, not the delay line
    conditions.impairment = kernel_impairment
    apps.APPS[EchoTls.name] = EchoTls
    apps.CLASSES[EchoTls.label] = [EchoTls.name]
    try:
        generate(Settings(out=Path({out!r}), classes=("test-echo",), sessions=8, seed=3),
                 lambda rec: print("session", flush=True))
    except KeyboardInterrupt:
        sys.exit(130)
    """
)


@netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
@pytest.mark.usefixtures("no_delay_line")  # the second sitting runs here
def test_an_interrupted_run_resumes_with_the_same_plan(tmp_path, stand_in, sig):
    out = tmp_path / "run"
    script = RESUMABLE.format(root=str(ROOT), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        assert proc.stdout.readline().strip() == "session"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    reap_stale()  # what a kill -9 left (the next build_lab would do it too)
    before = json.loads((out / "manifest.json").read_text())
    assert before["interrupted"] is (sig == signal.SIGINT)
    assert 3 <= len(before["sessions"]) < 8
    settings = Settings(out=out, classes=("test-echo",), sessions=8, seed=3)
    doc = generate(settings)
    ids = [s["id"] for s in doc["sessions"]]
    planned = plan(settings, conditions.available_congestion())
    assert sorted(ids) == sorted(j.id for j in planned)  # each session of the plan, once
    assert doc["sessions"][: len(before["sessions"])] == before["sessions"]  # kept as they were
    how = doc["lab"]["impairment"]  # with nothing to delay, the record says what the link did
    drawn = {
        j.id: (j.params, (j.conditions if how else j.conditions.without_netem()).to_dict())
        for j in planned
    }
    assert all(drawn[s["id"]] == (s["params"], s["conditions"]) for s in doc["sessions"])
    assert not doc["interrupted"] and len(doc["sittings"]) == 2
    assert doc["summary"]["test-echo"]["sessions"] == 8
    assert len(list((out / "test-echo").glob("*.pcap"))) == 8


@netns
def test_flows_per_class_stops_a_class_and_a_resume_can_raise_it(tmp_path, stand_in):
    settings = Settings(out=tmp_path, classes=("test-echo",), sessions=10, flows_per_class=2)
    doc = generate(settings)
    order = [j.id for j in plan(settings, conditions.available_congestion())]
    assert [s["id"] for s in doc["sessions"]] == order[:2]  # one flow per echo session
    doc = generate(replace(settings, flows_per_class=3))  # the stopping rule may change
    assert [s["id"] for s in doc["sessions"]] == order[:3]
    assert doc["summary"]["test-echo"]["flows"] == 3


@netns
def test_a_capture_drains_until_its_link_is_quiet():
    with veth_pair() as pair:
        with in_netns(pair.a.ns):  # bound to end a's namespace for good
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        before = link_packets(pair.b.ns, pair.b.ifname)
        for _ in range(5):
            sock.sendto(b"x", (pair.b.addr, 9))
        deadline = time.monotonic() + 2
        while link_packets(pair.b.ns, pair.b.ifname) < before + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link_packets(pair.b.ns, pair.b.ifname) >= before + 5
        assert 0.2 <= wait_quiet(pair.b.ns, pair.b.ifname, quiet=0.2, limit=3) < 1  # quiet already

        def trickle():  # a late segment every 50 ms for 0.6 s
            for _ in range(12):
                sock.sendto(b"x", (pair.b.addr, 9))
                time.sleep(0.05)

        sender = threading.Thread(target=trickle)
        sender.start()
        waited = wait_quiet(pair.b.ns, pair.b.ifname, quiet=0.2, limit=3)
        sender.join()
        assert 0.75 <= waited < 1.5  # the trickle, then 0.2 s of nothing
        sender = threading.Thread(target=lambda: [trickle() for _ in range(3)])
        sender.start()
        assert 0.4 <= wait_quiet(pair.b.ns, pair.b.ifname, quiet=0.2, limit=0.4) < 0.6  # the cap
        sender.join()
        sock.close()
        with pytest.raises(topology.LabError, match="no interface nope0"):
            link_packets(pair.b.ns, "nope0")


def test_a_resumed_run_keeps_how_its_links_were_delayed():
    assert resumed_impairment({}, "nfqueue") == "nfqueue"  # a new run: what the machine has
    # started without delay: the delay line installed since does not join in halfway
    assert resumed_impairment({"impairment": None}, "nfqueue") is None
    assert resumed_impairment({"netem": False}, "netem") is None  # manifests before the line
    assert resumed_impairment({"netem": True}, "nfqueue") == "nfqueue"  # delay either way
    with pytest.raises(topology.LabError, match=r"\(nfqueue\) and nothing here can"):
        resumed_impairment({"impairment": "nfqueue"}, None)


def test_resume_refuses_other_settings_and_foreign_files(tmp_path, stand_in):
    settings = Settings(out=tmp_path, classes=("test-echo",), sessions=4, seed=3)
    s = {**asdict(settings), "out": str(tmp_path), "seed": 4, "sessions": 5}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "settings": s}))
    with pytest.raises(topology.LabError, match="seed 4 -> 3, sessions 5 -> 4"):
        generate(settings)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(topology.LabError, match="cannot resume from it"):
        generate(settings)
    with pytest.raises(topology.LabError, match="flows_per_class must be >= 1"):
        generate(replace(settings, flows_per_class=0))



@netns
def test_generate_writes_valid_captures_and_manifest(tmp_path, stand_in):
    out = tmp_path / "run"
    settings = Settings(out=out, classes=("test-echo", "test-plain"), sessions=2, seed=7)
    doc = generate(settings)
    assert own_namespaces() == []
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    assert doc["format"] == FORMAT and doc["seed"] == 7 and doc["finished"]
    assert doc["versions"]["flagd"] and doc["versions"]["kernel"]
    assert doc["lab"]["offloads_off"] is (shutil.which("ethtool") is not None)
    assert doc["ports"] == {"tls-echo": 8443, "plain-echo": 8080}
    by_class = {c: [s for s in doc["sessions"] if s["class"] == c] for c in settings.classes}
    assert len(by_class["test-echo"]) == 2 and len(by_class["test-plain"]) == 2
    for s in by_class["test-echo"]:
        assert s["valid"] and s["returncode"] == 0 and s["entropy"] > 7
        assert s["params"]["messages"] >= 5
        pcap = out / s["pcap"]
        assert pcap.parent.name == "test-echo"
        frames = list(read_capture(pcap))
        packets = sum(len(f) for f in frames)
        assert packets == s["kept_packets"] == s["packets"] == s["kernel_received"]
        (flow,) = s["flows"]
        assert (flow["dst"], flow["dport"], flow["proto"]) == (SERVER_ADDR, 8443, 6)
        assert is_lab_address(flow["src"])
    for s in by_class["test-plain"]:
        assert not s["valid"] and s["pcap"] is None
        assert "does not look encrypted" in s["reason"]
    assert not (out / "test-plain").exists()
    summary = doc["summary"]["test-echo"]
    assert summary["sessions"] == 2 and summary["flows"] == 2 and summary["rejected"] == 0
    assert summary["flows_per_minute"] > 0 and summary["sessions_for_500_flows"] == 500
    assert doc["summary"]["test-plain"]["rejected"] == 2


@netns
def test_random_ports(tmp_path, stand_in):
    doc = generate(
        Settings(out=tmp_path, classes=("test-echo",), sessions=1, random_ports=True, seed=5)
    )
    port = doc["ports"]["tls-echo"]
    assert port != 8443 and 20000 <= port <= 60999
    assert doc["sessions"][0]["flows"][0]["dport"] == port


@netns
def test_generate_with_parallel_clients(tmp_path, stand_in):
    doc = generate(Settings(out=tmp_path, classes=("test-echo",), sessions=6, clients=3))
    assert {s["client"] for s in doc["sessions"]} == {0, 1, 2}
    rejected = [s for s in doc["sessions"] if not s["valid"]]
    assert not rejected, json.dumps(rejected, indent=1)  # the whole record says why
    # every packet the kernel counted on each link reached the session's capture
    assert [s["kernel_received"] - s["packets"] for s in doc["sessions"]] == [0] * 6
    for s in doc["sessions"]:  # each session was captured on its own client's link
        assert s["flows"][0]["src"] == doc["lab"]["clients"][s["client"]]["addr"]
    assert len(list((tmp_path / "test-echo").glob("*.pcap"))) == 6


@netns
@pytest.mark.parametrize(
    "tunnel", [WireGuard, OpenVpn, Ipsec], ids=["wireguard", "openvpn", "ipsec"]
)
def test_vpn_sessions_show_only_the_tunnel(tmp_path, stand_in, tunnel):
    gone = doctor.missing(tunnel.programs)
    if gone:
        pytest.skip(f"the {tunnel.name} tunnel needs: {doctor.apt_line(gone)}")
    settings = Settings(out=tmp_path, classes=("test-echo",), tunnels=("none", tunnel.name))
    doc = generate(replace(settings, sessions=3))
    assert not list(Path("/run/wireguard").glob(f"w{os.getpid()}*"))
    vpn = [s for s in doc["sessions"] if s["tunnel"] == tunnel.name]
    plain = [s for s in doc["sessions"] if s["tunnel"] == "none"]
    assert len(vpn) == 3 and len(plain) == 3
    assert all(s["valid"] and s["class"] == "vpn-test-echo" for s in vpn), vpn
    for s in vpn:
        (flow,) = s["flows"]  # one tunnel flow: the handshake and the session inside it
        assert flow["proto"] == 17 and flow["dport"] == tunnel.port and flow["dst"] == "203.0.113.129"
        assert flow["sport"] == s["params"]["tunnel_port"]
        frames = list(read_capture(tmp_path / s["pcap"]))
        pk = decode(frames[0])
        assert set(pk.proto[pk.skip == 0].tolist()) == {17}
        i = int(np.flatnonzero(pk.skip == 0)[0])  # ARP may come first
        first = frames[0].data[int(pk.l4_off[i]) + 8]
        if tunnel is WireGuard:  # handshake initiation: message type 1, 148 bytes
            assert first == 1 and pk.payload_len[i] == 148
        elif tunnel is Ipsec:  # on port 4500 from the start: non-ESP marker, IKE_SA_INIT (34)
            ike = frames[0].data[int(pk.l4_off[i]) + 8 : int(pk.l4_off[i]) + 8 + 24].tobytes()
            assert ike[:4] == b"\0\0\0\0" and ike[4 + 18] == 34
            udp = np.flatnonzero(pk.skip == 0)
            spis = [frames[0].data[int(pk.l4_off[k]) + 8 : int(pk.l4_off[k]) + 12].tobytes()
                    for k in udp]  # fmt: skip
            assert sum(spi != b"\0\0\0\0" for spi in spis) >= 10  # ESP in the same flow
            assert s["params"]["tunnel_ike"] and s["params"]["tunnel_esp"]
        else:  # P_CONTROL_HARD_RESET_CLIENT_V2 (opcode 7) or _V3 (opcode 10), key id 0
            assert first >> 3 in (7, 10)
    for s in plain:
        assert s["flows"][0]["dport"] == 8443


@netns
def test_flagd_run_on_the_lab_link_reports_every_session(tmp_path, stand_in):
    """What CI's live test does with a lab run: `flagd run` inside the client namespace,
    started from `on_ready`, stopped by the lab's teardown (SIGTERM), sees each session's flow."""
    log = tmp_path / "events.jsonl"

    def start_daemon(lab):
        argv = [sys.executable, "-m", "flagd", "run", "--iface", lab.clients[0].ifname]
        argv += ["--no-model", "--log", str(log), "--no-dashboard", "--stats-interval", "0"]
        lab.popen(lab.clients[0].ns, argv, log="flagd-run")
        deadline = time.monotonic() + 20
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # the daemon opens its log once the capture is up

    doc = generate(
        Settings(out=tmp_path / "run", classes=("test-echo",), sessions=3), on_ready=start_daemon
    )
    events = [json.loads(line) for line in log.read_text().splitlines()]
    seen = {
        frozenset({(e["src_ip"], e["src_port"]), (e["dest_ip"], e["dest_port"])})
        for e in events
        if e["event_type"] == "flow"
    }
    for s in doc["sessions"]:
        (f,) = s["flows"]
        assert frozenset({(f["src"], f["sport"]), (f["dst"], f["dport"])}) in seen, s["id"]


class LinkProbe(EchoTls):
    """The echo, after writing down what its own link looks like mid-session: MTU, qdisc and
    the route to the server (with its congestion control), keyed by a drawn tag."""

    label = "test-probe"
    name = "link-probe"
    seen: Path

    def params(self, rng, seconds, budget_mbit=None):
        return {**super().params(rng, seconds), "tag": rng.randrange(1 << 30)}

    def session(self, ctx, client, params):
        run = ctx.lab.run
        link = run(client.ns, ["ip", "-o", "link", "show", "dev", client.ifname]).stdout
        qdisc = run(client.ns, ["tc", "qdisc", "show", "dev", client.ifname]).stdout
        route = run(client.ns, ["ip", "route", "show", "exact", str(SERVER_NET)]).stdout
        back = run(ctx.lab.server, ["ip", "route", "show", "exact", client.subnet]).stdout
        rules = run(ctx.lab.router, [conditions.IPTABLES, "-w", "-S", "FORWARD"]).stdout
        with open(self.seen, "a") as fh:
            fh.write(json.dumps({"tag": params["tag"], "link": link, "qdisc": qdisc,
                                 "route": route, "back": back, "rules": rules}) + "\n")  # fmt: skip
        return super().session(ctx, client, params)


@netns
def test_each_session_runs_under_its_own_conditions(tmp_path, monkeypatch, stand_in):
    """Two clients, sessions interleaved: each session's link had the MTU, rate and congestion
    control its record names (both routes), and every link is plain again afterwards."""
    from flagd.lab import conditions

    LinkProbe.seen = tmp_path / "seen.jsonl"
    monkeypatch.setitem(apps.APPS, LinkProbe.name, LinkProbe)
    monkeypatch.setitem(apps.CLASSES, LinkProbe.label, [LinkProbe.name])
    after = {}
    real_reset = conditions.reset

    def reset(lab, client, rate_mbit):  # what the link looks like once a session is over
        real_reset(lab, client, rate_mbit)
        after[client.index] = (
            lab.run(client.ns, ["ip", "-o", "link", "show", "dev", client.ifname]).stdout,
            lab.run(client.ns, ["ip", "route", "show", "exact", str(SERVER_NET)]).stdout,
            lab.run(lab.server, ["ip", "route", "show", "exact", client.subnet]).stdout,
            [r for r in lab.run(lab.router, [conditions.IPTABLES, "-w", "-S", "FORWARD"]).stdout
             .splitlines() if f" c{client.index} " in r],  # fmt: skip
            client.index in lab.delay_lines,
        )

    monkeypatch.setattr(conditions, "reset", reset)
    doc = generate(Settings(out=tmp_path / "run", classes=("test-probe",), sessions=6,
                            clients=2, seed=11))  # fmt: skip
    seen = {r["tag"]: r for r in map(json.loads, LinkProbe.seen.read_text().splitlines())}
    assert doc["settings"]["conditions"] == "random"
    how = doc["lab"]["impairment"]
    assert how in ("netem", "nfqueue", None) and "cubic" in doc["lab"]["congestion"]
    assert len({s["conditions"]["mtu"] for s in doc["sessions"]}) > 1
    for s in doc["sessions"]:
        assert s["valid"], s
        c, probe = s["conditions"], seen[s["params"]["tag"]]
        assert 1280 <= c["mtu"] <= 1500 and f"mtu {c['mtu']} " in probe["link"]
        assert 1 <= c["rate_mbit"] <= 100 and c["congestion"] in doc["lab"]["congestion"]
        assert f"congctl {c['congestion']}" in probe["route"]
        assert f"congctl {c['congestion']}" in probe["back"]
        if how:
            assert 1 <= c["delay_ms"] <= 150 and 0 <= c["loss_pct"] <= 2
        else:  # neither netem nor a delay line: the record says no delay or loss
            assert c["delay_ms"] == c["jitter_ms"] == c["loss_pct"] == 0
        assert ("netem" if how == "netem" else "tbf") in probe["qdisc"]
        queued = f"-i c{s['client']} -j NFQUEUE --queue-num {2 * s['client']}"
        assert (queued in probe["rules"]) == (how == "nfqueue"), probe["rules"]
    assert sorted(after) == [0, 1]
    for link, route, back, rules, line in after.values():
        assert " mtu 1500 " in link and "congctl" not in route + back
        assert not rules and not line


ECHO_SERVER = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9000))
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data, peer)
"""
ECHO_CLIENT = """
import socket, statistics, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
rtts = []
for i in range(20):  # one at a time: round trips
    t = time.monotonic()
    s.sendto(struct.pack("!I", i), (sys.argv[1], 9000))
    try:
        while struct.unpack("!I", s.recv(64))[0] != i:
            pass
        rtts.append(time.monotonic() - t)
    except TimeoutError:
        pass
s.settimeout(0.001)
back = set()
def drain(until):
    while time.monotonic() < until:
        try:
            back.add(struct.unpack("!I", s.recv(64))[0])
        except TimeoutError:
            pass
for i in range(1000, 1400):  # a stream: how many come back
    s.sendto(struct.pack("!I", i), (sys.argv[1], 9000))
    drain(time.monotonic() + 0.001)
drain(time.monotonic() + 0.5)
print(statistics.median(rtts) * 1000 if rtts else -1, 400 - len(back & set(range(1000, 1400))))
"""


def _echo(lab, client) -> tuple[float, int]:
    """(median round trip in ms, datagrams of 400 lost) from `client` to the server."""
    res = lab.run(client.ns, [sys.executable, "-c", ECHO_CLIENT, lab.server_addr])
    assert res.returncode == 0, res.stderr
    rtt, lost = res.stdout.split()
    return float(rtt), int(lost)


@netns
def test_delay_line_delays_and_drops_then_goes_away():
    """Without sch_netem, the router's user-space delay line (iptables NFQUEUE) puts the drawn
    delay on both directions of one client's link and drops the drawn share, and only there;
    the reset takes rules and process away and the link is plain again."""
    from flagd.lab.conditions import Conditions

    with build_lab(2) as lab:
        if not conditions.nfqueue_available(lab):
            pytest.skip(f"no {conditions.IPTABLES} or no NFQUEUE in this kernel")
        lab.popen(lab.server, [sys.executable, "-c", ECHO_SERVER])
        time.sleep(0.3)
        slow, other = lab.clients
        plain_rtt, plain_lost = _echo(lab, slow)
        conditions.apply(lab, slow, Conditions(25.0, 2.0, 0.0, 50.0, 1400, "cubic"), "nfqueue")
        rtt, lost = _echo(lab, slow)
        other_rtt, _ = _echo(lab, other)
        assert 48 <= rtt <= 80 and lost == 0, (rtt, lost)  # 2 x 25 ms, jitter +-2 each way
        assert other_rtt < 10 and plain_rtt < 10 and plain_lost == 0
        conditions.reset(lab, slow, 50.0)
        conditions.apply(lab, slow, Conditions(1.0, 0.0, 20.0, 50.0, 1500, "cubic"), "nfqueue")
        _, lost = _echo(lab, slow)
        # 20% each way: 36% of round trips lost (144 of 400; 3 sigma ~ 29)
        assert 105 <= lost <= 185, lost
        (line,) = lab.delay_lines.values()
        conditions.reset(lab, slow, 50.0)
        assert line.poll() is not None and not lab.delay_lines
        rules = lab.run(lab.router, [conditions.IPTABLES, "-w", "-S", "FORWARD"]).stdout
        assert "NFQUEUE" not in rules
        assert _echo(lab, slow)[0] < 10
        # a line that dies mid-session cut the link: the reset says so, and still cleans up
        conditions.apply(lab, slow, Conditions(5.0, 0.0, 0.0, 50.0, 1500, "cubic"), "nfqueue")
        lab.delay_lines[slow.index].kill()
        with pytest.raises(topology.LabError, match="delay line .* exited with status -9"):
            conditions.reset(lab, slow, 50.0)
        assert not lab.delay_lines and _echo(lab, slow)[0] < 10


def test_delay_line_reads_the_kernels_messages():
    """nfnetlink_queue framing: the packet ids and queue numbers of a read holding two queued
    packets; a negative acknowledgement raises with its errno; verdicts carry the id."""
    from flagd.lab import delayline as dl

    def packet(queue: int, packet_id: int) -> bytes:
        hdr = dl._attr(dl.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 2))
        mark = dl._attr(3, struct.pack("!I", 7))  # NFQA_MARK, skipped
        return dl._message(dl.NFQNL_MSG_PACKET, queue, mark + hdr)

    assert dl.parse(packet(6, 41) + packet(7, 42)) == [(6, 41), (7, 42)]
    ack = struct.pack("=IHHII", 36, dl.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", 0) + bytes(16)
    assert dl.parse(ack) == []
    nack = ack[:16] + struct.pack("=i", -16) + ack[20:]
    with pytest.raises(OSError) as err:
        dl.parse(nack)
    assert err.value.errno == 16
    verdict = dl.verdict_message(7, 42, dl.NF_DROP)
    assert verdict.endswith(struct.pack("!II", dl.NF_DROP, 42))
    assert struct.unpack_from("!H", verdict, 18)[0] == 7
    assert len(dl.config_messages(3)) == 3


def test_conditions_are_drawn_in_their_ranges_and_none_draws_nothing(stand_in):
    from flagd.lab import conditions
    from flagd.lab.conditions import Conditions

    rng = random.Random(0)
    drawn = [conditions.draw(rng, ("cubic", "bbr", "reno")) for _ in range(400)]
    assert all(1 <= c.delay_ms <= 150 and 0 <= c.jitter_ms <= c.delay_ms / 4 for c in drawn)
    assert all(0 <= c.loss_pct <= 2 and 1 <= c.rate_mbit <= 100 for c in drawn)
    assert all(1280 <= c.mtu <= 1500 for c in drawn)
    assert {c.congestion for c in drawn} == {"cubic", "bbr", "reno"}
    assert 0.3 < sum(c.loss_pct == 0 for c in drawn) / 400 < 0.7
    assert Conditions.from_dict(drawn[0].to_dict()) == drawn[0]
    # a lossy long path moves far less than its link rate: apps size their transfers to that
    slow = Conditions(150.0, 0.0, 2.0, 100.0, 1500, "cubic")
    assert slow.budget_mbit < 0.5 and drawn[0].without_netem().loss_pct == 0
    assert Conditions(10.0, 1.0, 0.0, 7.5, 1400, "bbr").budget_mbit == 7.5
    argv = conditions.netem_argv("out", Conditions(40.0, 5.0, 0.5, 20.0, 1400, "bbr"))
    assert argv[:7] == ["tc", "qdisc", "replace", "dev", "out", "root", "netem"]
    assert argv[9:] == ["delay", "40.0ms", "5.0ms", "loss", "random", "0.5%", "rate", "20.0mbit"]
    settings = Settings(out=Path("/x"), classes=("test-echo",), sessions=8, seed=2)
    plain = plan(replace(settings, conditions="none"), ("cubic", "bbr"))
    assert all(j.conditions is None for j in plain)
    assert [(j.id, j.params) for j in plain] == [
        (j.id, j.params) for j in plan(replace(settings, conditions="none"), ("reno",))
    ]
    assert all(j.conditions is not None for j in plan(settings, ("cubic",)))


def test_plan_is_deterministic_and_interleaved(stand_in):
    s = Settings(out=Path("/nonexistent"), classes=("test-echo", "test-plain"), sessions=20, seed=3)
    a, b = plan(s), plan(s)
    assert [(j.id, j.params) for j in a] == [(j.id, j.params) for j in b]
    assert [j.id for j in plan(replace(s, seed=4))] != [j.id for j in a]
    assert len(a) == 40 and len({j.id for j in a}) == 40
    first_half = [j.label for j in a[:20]]
    assert 0 < first_half.count("test-echo") < 20  # classes are shuffled together


def test_summary_figures():
    sessions = [
        {"class": "x", "seconds": 30.0, "valid": True, "flows": [{}, {}], "packets": 10},
        {"class": "x", "seconds": 30.0, "valid": False, "flows": [{}], "packets": 5},
    ]
    (x,) = summarize(sessions).values()
    assert x["flows"] == 2 and x["rejected"] == 1 and x["flows_per_minute"] == 2.0
    assert x["sessions_for_500_flows"] == 250 and x["minutes_for_500_flows"] == 250.0
    assert summarize(sessions, clients=2)["x"]["flows_per_minute"] == 4.0


def test_generate_refuses_more_clients_than_the_address_plan_holds(tmp_path):
    """A usage error before anything runs, naming the bound; --help states the same bound."""
    res = CliRunner().invoke(
        lab_app, ["generate", "--out", str(tmp_path / "run"), "--clients", str(topology.MAX_CLIENTS + 1)]
    )
    assert res.exit_code == Exit.USAGE and f"at most {topology.MAX_CLIENTS}" in res.output
    assert not (tmp_path / "run").exists()
    rendered = CliRunner().invoke(lab_app, ["generate", "--help"]).output.replace("│", " ")
    help_text = " ".join(rendered.split())  # rich boxes and wraps the help; unwrap it
    assert f"(at most {topology.MAX_CLIENTS})" in help_text


# -- doctor and missing programs -----------------------------------------------------------------


def test_doctor_all_installed(monkeypatch):
    for name, req in list(doctor.REQUIREMENTS.items()):
        monkeypatch.setitem(
            doctor.REQUIREMENTS, name, doctor.Requirement(name, req.package, lambda: True)
        )
    res = CliRunner().invoke(lab_app, ["doctor"])
    assert "prosody" in res.output and "MISSING" not in res.output
    assert "every program the lab needs is installed" in res.output
    assert res.exit_code == (Exit.OK if why_no_netns is None else Exit.ERROR)


def test_doctor_prints_one_apt_line_for_what_is_missing(monkeypatch):
    for name in ("prosody", "swaks", "perl IO::Socket::SSL"):
        req = doctor.REQUIREMENTS[name]
        monkeypatch.setitem(
            doctor.REQUIREMENTS, name, doctor.Requirement(name, req.package, lambda: False)
        )
    res = CliRunner().invoke(lab_app, ["doctor"])
    assert res.exit_code == Exit.MISSING
    apt = [line.strip() for line in res.output.splitlines() if line.strip().startswith("apt-get")]
    assert len(apt) == 1
    assert apt[0].split()[4:] == sorted(["libio-socket-ssl-perl", "prosody", "swaks"])
    assert "MISSING  prosody" in res.output


def test_generate_fails_with_the_apt_line_when_programs_are_missing(monkeypatch, tmp_path):
    req = doctor.REQUIREMENTS["sshd"]
    monkeypatch.setitem(
        doctor.REQUIREMENTS, "sshd", doctor.Requirement("sshd", req.package, lambda: False)
    )
    before = lab_namespaces()
    res = CliRunner().invoke(
        lab_app, ["generate", "--out", str(tmp_path / "o"), "--classes", "file-transfer"]
    )
    assert res.exit_code == Exit.MISSING
    assert "apt-get install -y --no-install-recommends openssh-server" in res.output
    assert lab_namespaces() == before


def test_unknown_class_and_unbuilt_tunnel_are_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(lab_app, ["generate", "--out", str(tmp_path), "--classes", "gaming"])
    assert res.exit_code == Exit.ERROR and "unknown class 'gaming'" in res.output
    res = runner.invoke(lab_app, ["generate", "--out", str(tmp_path), "--tunnel", "gre"])
    assert res.exit_code == Exit.ERROR and "not available yet" in res.output


# -- validation, pcap output, per-flow cut --------------------------------------------------------


def frames_of(
    payloads: list[bytes], src: str = "203.0.113.130", dst: str = "203.0.113.2", sport: int = 40000
) -> Frames:
    from scapy.layers.inet import IP, TCP
    from scapy.packet import Raw

    recs = []
    for k, p in enumerate(payloads):
        a, b, sp, dp = (src, dst, sport, 443) if k % 2 == 0 else (dst, src, 443, sport)
        frame = crafted.ether(IP(src=a, dst=b) / TCP(sport=sp, dport=dp, flags="PA") / Raw(p))
        recs.append((1000.0 + k * 0.001, frame, len(frame), 1))
    return Frames.from_records(recs)


def random_payloads(n: int, size: int = 200, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, np.uint8).tobytes() for _ in range(n)]


def test_validation_accepts_an_encrypted_lab_session():
    stats = session_stats(frames_of(random_payloads(20)))
    assert stats.packets == 20 and len(stats.flows) == 1 and stats.foreign == []
    assert stats.flows[0].packets == 20 and stats.flows[0].payload == 4000
    assert stats.entropy > 7.5
    assert validate(0, stats) is None


def test_validation_rejects_bad_sessions():
    good = frames_of(random_payloads(20))
    assert validate(1, session_stats(good)) == "client exited with status 1"
    plain = frames_of([b"EHLO client.lab.test\r\nMAIL FROM:<a@lab.test>\r\n" * 4] * 20)
    assert "does not look encrypted" in validate(0, session_stats(plain))
    few = frames_of(random_payloads(4))
    assert "only 4 packets" in validate(0, session_stats(few))
    other = session_stats(frames_of(random_payloads(20), src="203.0.113.134"))
    assert validate(0, other, client="203.0.113.134") is None
    assert "client's address 203.0.113.130" in validate(0, other, client="203.0.113.130")
    outside = frames_of(random_payloads(20), dst="8.8.8.8")
    assert "outside the lab's ranges: 8.8.8.8" in validate(0, session_stats(outside))
    tiny = frames_of([b"\x17"] * 20)
    assert "payload bytes" in validate(0, session_stats(tiny), Rules(min_payload=100))


def test_session_flows_are_the_flow_meters():
    """A session's flows are `flows.flow_keys` flows: both directions of a 5-tuple are one flow,
    listed in order of first appearance, keyed from their first packet; IPv6 flows keep their
    whole addresses (and still fail validation as outside the lab)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import Raw

    from flagd.flows import flow_keys
    from flagd.packets import Skip

    second = frames_of(random_payloads(6), sport=40001)
    first = frames_of(random_payloads(4), sport=40000)
    v6 = [
        crafted.ether(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=5000, dport=6000) / Raw(b"x" * 50))
    ]
    arp_like = [crafted.ether(IP(src="203.0.113.130", dst="203.0.113.2", proto=50) / Raw(b"esp" * 20))]
    extra = Frames.from_records(
        [(2000.0 + k, f, len(f), 1) for k, f in enumerate([*v6, *arp_like])]
    )
    frames = Frames.concat([second, first, extra])
    stats = session_stats(frames)
    pk = decode(frames)
    keys, _ = flow_keys(pk, np.flatnonzero(pk.skip == Skip.OK))
    assert len(stats.flows) == len(set(keys)) == 3
    a, b, c = stats.flows
    assert (a.sport, a.packets, b.sport, b.packets) == (40001, 6, 40000, 4)
    assert (a.src, a.dst, a.dport) == ("203.0.113.130", "203.0.113.2", 443)
    assert (c.proto, c.src, c.dst, c.sport, c.packets, c.payload) == (
        17, "2001:db8::1", "2001:db8::2", 5000, 1, 50
    )
    assert stats.packets == 12  # the ESP packet is counted, but is no flow
    assert stats.foreign == ["ipv6"]
    kept = keep_first(frames, 2)
    assert len(kept) == 2 + 2 + 1 + 1  # two of each TCP flow, the UDP flow, the ESP packet


def test_the_tail_of_an_earlier_sessions_connection_is_not_written():
    """A TCP flow whose first captured packet is no SYN began before the capture (a server
    still writing to a client that quit): recorded as such, left out of the written capture."""
    from scapy.layers.inet import IP, TCP

    syn = crafted.ether(IP(src="203.0.113.130", dst="203.0.113.2") / TCP(sport=40001, dport=443, flags="S"))
    fresh = Frames.concat(
        [Frames.from_records([(999.0, syn, len(syn), 1)]), frames_of(random_payloads(6), sport=40001)]
    )
    tail = frames_of(random_payloads(5), sport=40000)  # mid-connection: no SYN
    frames = Frames.concat([tail, fresh])
    stats = session_stats(frames)
    assert [(f.sport, f.began) for f in stats.flows] == [(40000, False), (40001, True)]
    kept = keep_first(frames, 0, drop_earlier=True)
    assert len(kept) == 7 and [f.sport for f in session_stats(kept).flows] == [40001]
    assert len(keep_first(frames, 3, drop_earlier=True)) == 3
    assert len(keep_first(frames, 0)) == 12  # without drop_earlier nothing goes


def wireguard_frames(messages: list[tuple[bool, int]]) -> Frames:
    """A WireGuard tunnel flow on the client's link: (from the router?, message type) each,
    the router at 203.0.113.129:51820, the client at 203.0.113.130:40508."""
    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw

    recs = []
    for k, (from_router, kind) in enumerate(messages):
        ends = [("203.0.113.130", 40508), ("203.0.113.129", 51820)][:: -1 if from_router else 1]
        body = bytes([kind, 0, 0, 0]) + random_payloads(1, 124, seed=k)[0]
        ip = IP(src=ends[0][0], dst=ends[1][0]) / UDP(sport=ends[0][1], dport=ends[1][1])
        frame = crafted.ether(ip / Raw(body))
        recs.append((1000.0 + k * 0.001, frame, len(frame), 1))
    return Frames.from_records(recs)


def test_a_tunnel_flow_opening_with_held_packets_is_rejected():
    """Handshake (types 1, 2), then the client's SYN: one router answer (two under loss) before
    its ACK is a clean session; more are packets the router held from before the session."""
    handshake = [(False, 1), (True, 2), (False, 4)]
    later = [(False, 4), (True, 4), (True, 4), (True, 4), (False, 4)]
    assert staged_flush(wireguard_frames(handshake + [(True, 4), *later])) is None
    assert staged_flush(wireguard_frames(handshake + [(True, 4)] * 2 + later)) is None
    why = staged_flush(wireguard_frames(handshake + [(True, 4)] * 40 + later))
    assert why and "40 router packets" in why


@netns
def test_packets_for_a_client_between_its_wireguard_sessions_never_reach_the_next():
    """A server still sending to a client whose session ended (a voip call's RTP) must not open
    the client's next tunnel flow: the router holds no peer for it between sessions."""
    gone = doctor.missing(WireGuard.programs)
    if gone:
        pytest.skip(f"the wireguard tunnel needs: {doctor.apt_line(gone)}")
    send = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(int(sys.argv[3])): s.sendto(b'x' * 200, (sys.argv[1], int(sys.argv[2])))")
    with build_lab(1) as lab:
        (client,) = lab.clients
        wg = WireGuard(lab)
        router = wg.ifname(lab.router)
        from_router = []  # per session: packets the router sent into the tunnel flow
        for port in (40508, 40509):
            rec = Recorder(client.ns, client.ifname)
            try:
                with wg.session(client, port) as addr:
                    peers = lab.run(lab.router, ["wg", "show", router, "peers"]).stdout.split()
                    assert peers == [wg.keys[client.index][1]]
                    for _ in range(2):  # the client's first and second data message
                        lab.run(client.ns, [sys.executable, "-c", send, SERVER_ADDR, "9", "1"])
                        time.sleep(0.3)
            finally:
                frames, _ = rec.stop()
            assert staged_flush(frames) is None
            pk = decode(frames)
            from_router.append(int(((pk.skip == 0) & (pk.sport == 51820)).sum()))
            # the session is over: the server writes to the client's tunnel address anyway
            assert lab.run(lab.router, ["wg", "show", router, "peers"]).stdout.split() == []
            lab.run(lab.server, [sys.executable, "-c", send, addr, "9", "40"])
    # the handshake response and the server's ICMP port unreachables (two at most: the kernel
    # may rate-limit them), none of the 40
    assert max(from_router) <= 3


def test_pcap_round_trip(tmp_path):
    frames = frames_of(random_payloads(7, 90))
    frames.ts[:] = 1_700_000_000.123456789 + np.arange(7)
    write_pcap(tmp_path / "s.pcap", frames)
    (back,) = list(read_capture(tmp_path / "s.pcap"))
    assert len(back) == 7
    for i in range(7):
        a = frames.data[frames.offset[i] : frames.offset[i] + frames.caplen[i]].tobytes()
        b = back.data[back.offset[i] : back.offset[i] + back.caplen[i]].tobytes()
        assert a == b
    assert np.allclose(back.ts, frames.ts, atol=1e-6)
    assert (back.wirelen == frames.wirelen).all()
    assert not list(tmp_path.glob("*.part"))


def test_keep_first_cuts_each_flow():
    a = frames_of(random_payloads(10), sport=40000)
    b = frames_of(random_payloads(3), sport=40001)

    both = Frames.concat([a, b])
    kept = keep_first(both, 4)
    assert len(kept) == 7  # 4 of the first flow, all 3 of the second
    stats = session_stats(kept)
    assert sorted(f.packets for f in stats.flows) == [3, 4]
    assert len(keep_first(both, 0)) == 13


# -- smoke: one short session per plain class whose programs are installed ---------------------


PLAIN_CLASSES = ("chat", "email", "file-transfer", "streaming", "voip", "torrent")


@netns
@pytest.mark.slow
@pytest.mark.parametrize("label", PLAIN_CLASSES)
@pytest.mark.usefixtures("no_delay_line")
def test_smoke_one_session_per_class(label, tmp_path):
    """One session of every app of the class whose programs are installed; the test is marked
    skipped, with the apt-get line, when some app of the class could not run."""
    if label not in apps.CLASSES:
        pytest.skip(f"class {label} is not built in the lab yet")
    names = [n for n in apps.CLASSES[label] if not doctor.missing(apps.APPS[n].programs)]
    gone = {n: doctor.missing(apps.APPS[n].programs) for n in apps.CLASSES[label]}
    gone = {n: doctor.apt_line(reqs) for n, reqs in gone.items() if reqs}
    missing = "; ".join(f"{label}/{n} needs: {apt}" for n, apt in gone.items())
    if not names:
        pytest.skip(missing)
    settings = Settings(out=tmp_path, classes=(label,), apps=tuple(names), seconds=4, seed=1)
    doc = generate(replace(settings, sessions=len(names)))
    assert own_namespaces() == []
    bad = [(s["id"], s["reason"]) for s in doc["sessions"] if not s["valid"]]
    assert not bad
    assert {s["app"] for s in doc["sessions"]} == set(names)
    for s in doc["sessions"]:
        assert (tmp_path / s["pcap"]).stat().st_size > 1000
        assert all(is_lab_address(f["src"]) and is_lab_address(f["dst"]) for f in s["flows"])
    if gone:  # what ran passed; say what did not run
        pytest.skip(f"ran {', '.join(names)}; {missing}")


# -- second apps: irc-tls (ngircd), icecast-https (icecast2) ------------------------------------


def test_irc_line_parsing():
    from flagd.lab.irc_client import parse

    assert parse(":bot!~bot@203.0.113.2 PRIVMSG #lab0 :hi :there") == (
        "bot!~bot@203.0.113.2",
        "PRIVMSG",
        ["#lab0", "hi :there"],
    )
    assert parse("PING :irc.lab.test") == ("", "PING", ["irc.lab.test"])
    assert parse(":irc.lab.test 353 user0 = #lab0 :@bot user0")[2] == [
        "user0", "=", "#lab0", "@bot user0"
    ]  # fmt: skip
    assert parse(":irc.lab.test 001 user0") == ("irc.lab.test", "001", ["user0"])


@pytest.mark.parametrize(
    ("app", "program", "package", "label"),
    [
        ("irc-tls", "ngircd", "ngircd", "chat"),
        ("icecast-https", "icecast2", "icecast2", "streaming"),
        ("linphone-tls", "linphonec", "linphone-cli", "voip"),
        ("wget-https", "wget", "wget", "file-transfer"),
        ("curl-imaps", "curl", "curl", "email"),
        ("curl-smtps", "curl", "curl", "email"),
        ("icecast-ffmpeg", "icecast2", "icecast2", "streaming"),
        ("sendxmpp-tls", "sendxmpp", "sendxmpp", "chat"),
        ("rtorrent", "rtorrent", "rtorrent", "torrent"),
        ("smtps-aiosmtpd", "aiosmtpd", "python3-aiosmtpd", "email"),
        ("imaps-imap4d", "imap4d", "mailutils-imap4d", "email"),
    ],
)
def test_second_apps_name_their_debian_package(monkeypatch, app, program, package, label):
    monkeypatch.setitem(
        doctor.REQUIREMENTS, program, doctor.Requirement(program, package, lambda: False)
    )
    gone = doctor.missing(apps.APPS[app].programs)
    assert doctor.apt_line(gone) == f"apt-get install -y --no-install-recommends {package}"
    assert app in apps.CLASSES[label] and len(apps.CLASSES[label]) >= 2
    assert app in BENCHMARK_APPS


@netns
@pytest.mark.parametrize(("app", "service"), [("irc-tls", "ircs"), ("icecast-https", "icecast")])
def test_second_apps_listen_on_tls_only(app, service):
    """ngircd and icecast2 open their TLS port on the server's address, no plaintext port at
    all, and run unprivileged; their helpers (IRC echo bot, icecast source) are ready."""
    gone = doctor.missing(apps.APPS[app].programs)
    if gone:
        pytest.skip(f"{app} needs: {doctor.apt_line(gone)}")
    with build_lab(1) as lab:
        ctx = RunContext(lab, make_pki(lab.state / "pki"), random.Random(0), random_ports=True)
        apps.APPS[app]().start(ctx)
        res = lab.run(lab.server, ["ss", "-Htlnp"])
        listening = {line.split()[3] for line in res.stdout.splitlines()}
        assert listening == {f"{SERVER_ADDR}:{ctx.ports[service]}"}
        (pid,) = {int(p) for p in re.findall(r"pid=(\d+)", res.stdout)}
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        (uids,) = [line.split()[1:] for line in status if line.startswith("Uid:")]
        assert "0" not in uids  # real, effective, saved and filesystem uid


@netns
def test_second_email_stack_delivers_what_it_is_sent():
    """aiosmtpd and imap4d are one stack: a message swaks submits over SMTPS is in the INBOX
    a client reads over IMAPS, and both listen on TLS ports of their own beside postfix and
    dovecot (which keep 465 and 993 on the same address)."""
    needs = apps.APPS["smtps-aiosmtpd"].programs
    gone = doctor.missing(needs)
    if gone:
        pytest.skip(f"smtps-aiosmtpd needs: {doctor.apt_line(gone)}")
    with build_lab(1) as lab:
        ctx = RunContext(lab, make_pki(lab.state / "pki"), random.Random(0))
        apps.APPS["smtps-aiosmtpd"]().start(ctx)
        apps.APPS["imaps"]().start(ctx)  # the first stack, on the default ports
        smtps, imaps = ctx.ports["smtps-aiosmtpd"], ctx.ports["imaps-imap4d"]
        assert {smtps, imaps}.isdisjoint({ctx.ports["smtps"], ctx.ports["imaps"]})
        client = lab.clients[0]
        subject = f"lab check {random.Random().randrange(1 << 30)}"
        res = lab.run(client.ns, [
            "swaks", "--server", SERVER_ADDR, "--port", str(smtps), "--tlsc", "--tls-verify",
            "--tls-ca-path", str(ctx.pki.ca), "--from", f"user0@{DOMAIN}", "--to",
            f"box@{DOMAIN}", "--header", f"Subject: {subject}", "--timeout", "20",
        ])  # fmt: skip
        assert res.returncode == 0, res.stdout[-500:]
        read = textwrap.dedent(f"""
            import imaplib, ssl
            imap = imaplib.IMAP4_SSL("{SERVER_ADDR}", {imaps},
                                     ssl_context=ssl.create_default_context(cafile="{ctx.pki.ca}"))
            imap.login("user0@{DOMAIN}", "labpass")
            imap.select("INBOX")
            print(imap.search(None, "SUBJECT", '"{subject}"')[1][0].decode())
        """)
        res = lab.run(client.ns, [sys.executable, "-c", read])
        assert res.returncode == 0, res.stderr[-500:]
        assert res.stdout.split() == ["1"]


# -- linphone-tls: its config and the driver of linphonec's prompt ------------------------------


def test_linphone_config_names_nothing_outside_the_lab():
    """No account, STUN or provisioning server; media bound to the client's address; SRTP
    mandatory; exactly the drawn codec configured."""
    client = topology.Client(0, "ns", "203.0.113.130", "203.0.113.129")
    ctx = SimpleNamespace(pki=SimpleNamespace(ca=Path("/run/lab/pki/ca.pem")))
    params = apps.Linphone().params(random.Random(0), 6)
    text = voip._linphone_config(ctx, client, params)  # type: ignore[arg-type]
    addresses = re.findall(r"\d+\.\d+\.\d+\.\d+", text)
    assert addresses and all(is_lab_address(a) for a in addresses)
    assert not re.search(r"linphone\.org|stun|turn|proxy|uri|url", text, re.IGNORECASE)
    assert "bind_address=203.0.113.130" in text and "media_encryption_mandatory=1" in text
    assert f"srtp_crypto_suites={params['srtp_suite']}" in text
    assert text.count("[audio_codec_") == 1


# A stand-in for linphonec's prompt: echoes each command after its prompt, like the real one.
FAKE_LINPHONEC = """
import sys, time
mode = sys.argv[1]
print("Warning: video is disabled in linphonec", flush=True)
for line in sys.stdin:
    command = line.strip()
    print(f"linphonec> {command}", flush=True)
    if command.startswith("call "):
        if mode == "refused":
            print("Call 1 with <sip:x> error.", flush=True)
            continue
        print("Media streams established with <sip:x> for call 1 (audio).", flush=True)
        if mode == "dropped":
            print("Call 1 with <sip:x> ended (Call declined).", flush=True)
    elif command == "terminate":
        if mode == "hang":  # stuck in the middle of the call
            time.sleep(120)
        print("Call 1 with <sip:x> ended (No error).", flush=True)
    elif command == "quit":
        sys.exit(0)
"""


@netns
@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "expect"), [("ok", 0), ("refused", 1), ("dropped", 1), ("hang", 124)]
)
def test_linphone_driver_ends_every_call_in_bounded_time(tmp_path, mode, expect):
    """0 only for a call that ran until our hang-up; a refused or dropped call is a failure,
    and a linphonec that stops taking commands is killed within about 20 s."""
    script = tmp_path / "linphonec.py"
    script.write_text(FAKE_LINPHONEC)
    with build_lab(1) as lab:
        ctx = RunContext(lab, make_pki(lab.state / "pki"), random.Random(0))
        started = time.monotonic()
        rc = voip._linphone_call(
            ctx, lab.clients[0], [sys.executable, str(script), mode],
            ["soundcard use files", "call sip:x"], 1,
        )  # fmt: skip
        took = time.monotonic() - started
        assert not lab._procs  # reaped
    assert rc == expect
    assert took < 30


# -- TLS versions and suites drawn per session ---------------------------------------------------

# IANA numbers of the suites `draw_tls` picks from
SUITES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256": 0xC02B, "ECDHE-ECDSA-AES256-GCM-SHA384": 0xC02C,
    "ECDHE-ECDSA-CHACHA20-POLY1305": 0xCCA9, "TLS_AES_128_GCM_SHA256": 0x1301,
    "TLS_AES_256_GCM_SHA384": 0x1302, "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
}  # fmt: skip


def server_hellos(pcap: Path) -> list[tuple[str, int]]:
    """(version, suite) of every ServerHello at the start of a TCP payload in the capture: the
    version from the supported_versions extension when there is one (TLS 1.3), else the
    ServerHello's own."""
    (frames,) = list(read_capture(pcap))
    pk = decode(frames)
    out = []
    for i in np.flatnonzero((pk.skip == 0) & (pk.proto == 6) & (pk.payload_len > 50)).tolist():
        start = int(pk.l4_off[i]) + int(pk.l4_hdr_len[i])
        b = frames.data[start : int(frames.offset[i]) + int(frames.caplen[i])].tobytes()
        if b[0] != 22 or b[1] != 3 or b[5] != 2:  # handshake record, ServerHello
            continue
        sid = b[43]
        at = 44 + sid
        suite = int.from_bytes(b[at : at + 2], "big")
        version = {0x0303: "1.2", 0x0304: "1.3"}.get(int.from_bytes(b[9:11], "big"), "?")
        ext, end = at + 5, at + 5 + int.from_bytes(b[at + 3 : at + 5], "big")
        while ext + 4 <= min(end, len(b)):
            kind, size = int.from_bytes(b[ext : ext + 2], "big"), int.from_bytes(b[ext + 2 : ext + 4], "big")
            if kind == 43:  # supported_versions
                version = {0x0303: "1.2", 0x0304: "1.3"}[int.from_bytes(b[ext + 4 : ext + 6], "big")]
            ext += 4 + size
        out.append((version, suite))
    return out


TLS_APPS = {
    "imaps": "email", "smtps": "email", "curl-imaps": "email", "curl-smtps": "email",
    "irc-tls": "chat", "https-download": "file-transfer", "wget-https": "file-transfer",
    "icecast-https": "streaming", "smtps-aiosmtpd": "email", "imaps-imap4d": "email",
}  # fmt: skip


@netns
@pytest.mark.slow
@pytest.mark.parametrize("app", list(TLS_APPS))
@pytest.mark.usefixtures("no_delay_line")
def test_sessions_speak_their_drawn_tls_version_and_suite(app, tmp_path):
    """With conditions, a client with TLS knobs gets a TLS version and suite per session; the
    captured ServerHello shows exactly those (1.3 suites only where the client can choose)."""
    gone = doctor.missing(apps.APPS[app].programs)
    if gone:
        pytest.skip(f"{app} needs: {doctor.apt_line(gone)}")
    settings = Settings(out=tmp_path, classes=(TLS_APPS[app],), apps=(app,), sessions=3, seconds=4)
    doc = generate(replace(settings, seed=4))
    for s in doc["sessions"]:
        assert s["valid"], (s["id"], s["reason"])
        version, cipher = s["params"]["tls_version"], s["params"]["tls_cipher"]
        hellos = server_hellos(tmp_path / s["pcap"])
        assert hellos, s["id"]
        assert {v for v, _ in hellos} == {version}, (s["id"], hellos)
        if cipher:
            assert {c for _, c in hellos} == {SUITES[cipher]}, (s["id"], hellos)
        elif version == "1.2":
            pytest.fail(f"{s['id']}: a TLS 1.2 session without a drawn suite")


def test_doctor_knows_the_ipsec_tunnel(monkeypatch):
    """charon lives outside PATH and needs two plugin packages: doctor names all three."""
    for name in ("charon", "charon kernel-libipsec", "charon openssl"):
        req = doctor.REQUIREMENTS[name]
        monkeypatch.setitem(
            doctor.REQUIREMENTS, name, doctor.Requirement(name, req.package, lambda: False)
        )
    assert doctor.apt_line(doctor.missing(Ipsec.programs)).split()[4:] == [
        "libcharon-extra-plugins", "libstrongswan-standard-plugins", "strongswan-charon",
    ]  # fmt: skip
    res = CliRunner().invoke(lab_app, ["doctor"])
    assert "MISSING  charon" in res.output and "vpn-* / ipsec" in res.output


# -- the leave-one-implementation-out split over lab runs -----------------------------------------


def test_loio_split_holds_out_whole_implementations_and_condition_bins(tmp_path):
    from flagd.dataset import Dataset
    from flagd.experiment import condition_bins, split_loio

    # chat: three apps, IRC with a server of its own; vpn-chat: the same through three tunnels
    apps_ = ["xmpp-tls", "sendxmpp-tls", "irc-tls"]
    kinds = {"chat": ["none"], "vpn-chat": ["wireguard", "openvpn", "ipsec"]}
    rng = random.Random(0)
    records, sources = [], []
    for label, tunnels in kinds.items():
        for k in range(60):
            app, tunnel = apps_[k % 3], tunnels[k // 3 % len(tunnels)]
            cond = conditions.draw(rng, ("cubic", "reno")).to_dict()
            records.append({"id": f"{label}-{k}", "app": app, "tunnel": tunnel, "conditions": cond})
            sources.append(str(tmp_path / "run" / label / f"{label}-{k}.pcap"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"sessions": records}))
    source = np.repeat(np.arange(len(sources)), 2).astype(np.int32)  # two flows per session
    labels = (source >= 60).astype(np.int64)
    n = len(source)
    ds = Dataset([[b""]] * n, [[]] * n, labels, list(kinds), source, sources, np.zeros(n), {})

    for vpn in ("tunnel", "client"):  # a vpn-* class holds out a tunnel kind, or a client app
        split = split_loio(ds, seed=0, vpn=vpn)
        assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(n))
        assert len(split["unlabelled"]) == 0 and len(split["val"]) and len(split["train"])
        trained = np.concatenate([split["train"], split["val"]])
        for c, key in ((0, "app"), (1, "tunnel" if vpn == "tunnel" else "app")):
            # one implementation per class only in test; IRC (no second client) never
            held = {records[source[i]][key] for i in split["test"] if labels[i] == c}
            held -= {records[source[i]][key] for i in trained if labels[i] == c}
            assert len(held) == 1 and held != {"irc-tls"}, (vpn, c, held)
        if vpn == "client":  # the tunnels stay known: every kind is trained
            assert {records[source[i]]["tunnel"] for i in trained if labels[i] == 1} == set(
                kinds["vpn-chat"])
        for i in trained:  # the held-out condition bins only in test
            bins = condition_bins(records[source[i]])
            assert bins["rate_mbit"] != "1-2 Mbit/s" and bins["mtu"] != "1280-1319"
        assert set(source[split["val"]]).isdisjoint(source[split["train"]])  # whole captures

    elsewhere = [str(tmp_path / "elsewhere" / "x" / "y.pcap")] * len(sources)
    bad = Dataset(ds.flows, ds.sides, labels, ds.classes, source, elsewhere, ds.start, {})
    with pytest.raises(ValueError, match="flagd lab generate"):
        split_loio(bad, seed=0)
