"""The whole pipeline on capture files: events, schema, counts, classification once per flow."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest
from scapy.layers.inet import IP, TCP, UDP
from typer.testing import CliRunner

from flagd.cli import app
from flagd.events import schema
from flagd.frames import LINKTYPE_ETHERNET
from tests import crafted

runner = CliRunner()
C, S = "198.51.100.10", "203.0.113.20"


def conversation(n_flows: int, packets: int, t0: float = 1_700_000_000.0, seed: int = 0):
    """n_flows TLS-looking TCP conversations (handshake, data both ways, FIN) and one DNS flow."""
    rng = random.Random(seed)
    recs = []
    t = t0
    for i in range(n_flows):
        sport = 30000 + i

        def add(pkt, dt=0.001):
            nonlocal t
            t += dt
            recs.append(crafted.Record(t, crafted.ether(pkt)))

        add(IP(src=C, dst=S) / TCP(sport=sport, dport=443, flags="S"))
        add(IP(src=S, dst=C) / TCP(sport=443, dport=sport, flags="SA"))
        add(IP(src=C, dst=S) / TCP(sport=sport, dport=443, flags="A"))
        for k in range(packets):
            fwd = k % 2 == 0
            body = b"\x17\x03\x03" + bytes(rng.randrange(256) for _ in range(40))
            if fwd:
                add(IP(src=C, dst=S) / TCP(sport=sport, dport=443, flags="PA") / body)
            else:
                add(IP(src=S, dst=C) / TCP(sport=443, dport=sport, flags="PA") / body)
        add(IP(src=C, dst=S) / TCP(sport=sport, dport=443, flags="FA"))
        add(IP(src=S, dst=C) / TCP(sport=443, dport=sport, flags="FA"))
        add(IP(src=C, dst=S) / TCP(sport=sport, dport=443, flags="A"))
    recs.append(crafted.Record(t + 0.01, crafted.ether(IP(src=C, dst=S) / UDP(sport=5000, dport=53) / b"query")))
    return recs


def events_of(path):
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def capture(tmp_path):
    return crafted.write_pcap(tmp_path / "conv.pcap", conversation(20, 6), LINKTYPE_ETHERNET)


def test_replay_without_model_writes_one_flow_event_per_flow(capture, tmp_path):
    log = tmp_path / "events.jsonl"
    r = runner.invoke(app, ["replay", str(capture), "--no-model", "--log", str(log)])
    assert r.exit_code == 0, r.output
    evs = events_of(log)
    validator = jsonschema.Draft202012Validator(schema())
    for ev in evs:
        validator.validate(ev)
    flows = [e for e in evs if e["event_type"] == "flow"]
    assert len(flows) == 21
    tls = [e for e in flows if e["dest_port"] == 443]
    assert all(e["flow"]["pkts_toserver"] == 7 and e["flow"]["pkts_toclient"] == 5 for e in tls)
    assert all(e["src_ip"] == C and e["flow"]["state"] == "closed" for e in tls)
    (dns,) = [e for e in flows if e["dest_port"] == 53]
    assert dns["flag"]["dropped_by"] == "dns"
    assert evs[-1]["event_type"] == "stats" and evs[-1]["stats"]["final"] is True
    assert evs[-1]["stats"]["packets"] == 20 * 12 + 1


def test_replay_classifies_every_flow_exactly_once(capture, tmp_path, tiny_bundle):
    log = tmp_path / "events.jsonl"
    r = runner.invoke(app, ["replay", str(capture), "--model", str(tiny_bundle), "--log", str(log)])
    assert r.exit_code == 0, r.output
    evs = events_of(log)
    validator = jsonschema.Draft202012Validator(schema())
    for ev in evs:
        validator.validate(ev)
    cls = [e for e in evs if e["event_type"] == "classification"]
    flows = {e["flow_id"]: e for e in evs if e["event_type"] == "flow"}
    assert len(cls) == 20 and len({e["flow_id"] for e in cls}) == 20
    for c in cls:
        f = flows[c["flow_id"]]
        assert f["flag"]["label"] == c["flag"]["label"]  # the flow event repeats the label
        assert c["flag"]["packets_used"] == 3  # K of the bundle
        assert c["flag"]["model"] == "tiny"
        assert abs(sum(t["confidence"] for t in c["flag"]["top_k"]) - 1) < 0.01
        assert (c["src_ip"], c["dest_ip"], c["dest_port"]) == (C, S, 443)
    # a flow's classification comes before its end
    order = [(e["event_type"], e.get("flow_id")) for e in evs]
    for c in cls:
        assert order.index(("classification", c["flow_id"])) < order.index(("flow", c["flow_id"]))


def test_short_flows_are_classified_at_their_end(tmp_path, tiny_bundle):
    cap = crafted.write_pcap(tmp_path / "short.pcap", conversation(5, 2), LINKTYPE_ETHERNET)
    log = tmp_path / "events.jsonl"
    r = runner.invoke(app, ["replay", str(cap), "--model", str(tiny_bundle), "--log", str(log)])
    assert r.exit_code == 0, r.output
    cls = [e for e in events_of(log) if e["event_type"] == "classification"]
    assert len(cls) == 5 and all(c["flag"]["packets_used"] == 2 for c in cls)


def test_replay_is_deterministic(capture, tmp_path, tiny_bundle):
    runs = []
    for i in range(2):
        log = tmp_path / f"e{i}.jsonl"
        runner.invoke(app, ["replay", str(capture), "--model", str(tiny_bundle), "--log", str(log)])
        runs.append([e for e in events_of(log) if e["event_type"] != "stats"])
    key = lambda e: (e["event_type"], e["flow_id"])  # noqa: E731
    assert sorted(runs[0], key=key) == sorted(runs[1], key=key)


def test_unreadable_and_malformed_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture at all")
    r = runner.invoke(app, ["replay", str(bad), "--no-model", "--log", str(tmp_path / "x")])
    assert r.exit_code == 1
    assert "bad.pcap" in r.output and "not a pcap" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["replay", str(tmp_path / "missing.pcap"), "--no-model"])
    assert r.exit_code == 1 and "missing.pcap" in r.output


def test_truncated_file_keeps_what_was_read_and_warns(capture, tmp_path):
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(capture.read_bytes()[:-30])
    log = tmp_path / "events.jsonl"
    r = runner.invoke(app, ["replay", str(cut), "--no-model", "--log", str(log)])
    assert r.exit_code == 0
    assert "warning" in r.output and "cut.pcap" in r.output
    assert sum(e["event_type"] == "flow" for e in events_of(log)) >= 20


def test_unreadable_model_directory(capture, tmp_path):
    r = runner.invoke(app, ["replay", str(capture), "--model", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "nope" in r.output and "model bundle" in r.output


def test_stdout_log(capture):
    r = runner.invoke(app, ["replay", str(capture), "--no-model", "--log", "-"])
    assert r.exit_code == 0
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert sum(e["event_type"] == "flow" for e in lines) == 21


STEADY_MALLOC_PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pinned":
    from flagd.daemon import steady_malloc
    steady_malloc()
big = libc.malloc(4 << 20); libc.free(big)  # unpinned, glibc now raises its threshold to 4 MiB
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblkhd >= 1 << 20)  # was the 1 MiB block mmapped?
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"), reason="not glibc >= 2.33")
def test_steady_malloc_keeps_large_blocks_mmapped():
    """After a large block is freed, glibc serves the next large ones from the heap, where churn
    fragments it (a live soak's RSS crept +1 MiB/min); steady_malloc keeps them mmapped."""
    import subprocess
    import sys

    def mmapped(mode: str) -> str:
        res = subprocess.run([sys.executable, "-c", STEADY_MALLOC_PROBE, mode],
                             capture_output=True, text=True, check=True)
        return res.stdout.strip()

    assert mmapped("default") == "False"
    assert mmapped("pinned") == "True"


# -- many captures in one replay ------------------------------------------------------------


def _part(recs: list, first: int, n: int) -> list:
    """Records of conversations first..first+n-1 of conversation(...) with 12 records each."""
    return recs[first * 12:(first + n) * 12]


def test_replay_of_files_and_a_directory_is_one_run(tmp_path):
    """`flagd replay A.pcap B.pcapng DIR/`: one after the other (the directory's captures in
    name order), one event log, one final stats event, like `suricata -r DIR`."""
    recs = conversation(8, 6)[:-1]  # 8 TLS conversations, 12 records each (DNS left out)
    a = crafted.write_pcap(tmp_path / "a.pcap", _part(recs, 0, 2), LINKTYPE_ETHERNET)
    b = crafted.write_pcapng(tmp_path / "b.pcapng", [crafted.Interface(LINKTYPE_ETHERNET)],
                             _part(recs, 2, 2))
    d = tmp_path / "dir"
    d.mkdir()
    crafted.write_pcap(d / "2.cap", _part(recs, 6, 2), LINKTYPE_ETHERNET)
    crafted.write_pcap(d / "1.pcap", _part(recs, 4, 2), LINKTYPE_ETHERNET)
    (d / "notes.txt").write_text("not a capture: not read")
    log = tmp_path / "events.jsonl"
    r = runner.invoke(app, ["replay", str(a), str(b), str(d), "--no-model", "--log", str(log)])
    assert r.exit_code == 0, r.output
    evs = events_of(log)
    flows = [e for e in evs if e["event_type"] == "flow"]
    assert sorted(e["src_port"] for e in flows) == list(range(30000, 30008))
    assert [e["event_type"] for e in evs].count("stats") == 1
    assert evs[-1]["stats"]["final"] and evs[-1]["stats"]["packets"] == 8 * 12
    # in order: a, b, then dir/1.pcap before dir/2.cap (each flow ends before the next starts)
    assert [e["src_port"] for e in flows] == sorted(e["src_port"] for e in flows)


def test_replay_goes_on_past_an_unreadable_file_and_exits_1(tmp_path):
    recs = conversation(4, 6)[:-1]
    a = crafted.write_pcap(tmp_path / "a.pcap", _part(recs, 0, 2), LINKTYPE_ETHERNET)
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture at all")
    c = crafted.write_pcap(tmp_path / "c.pcap", _part(recs, 2, 2), LINKTYPE_ETHERNET)
    log = tmp_path / "events.jsonl"
    r = runner.invoke(app, ["replay", str(a), str(bad), str(tmp_path / "gone.pcap"), str(c),
                            "--no-model", "--log", str(log)])
    assert r.exit_code == 1
    assert "bad.pcap: not a pcap or pcapng file" in r.output
    assert "gone.pcap: no such file" in r.output
    assert "2 of 4 captures could not be read" in r.output and "Traceback" not in r.output
    evs = events_of(log)
    assert sum(e["event_type"] == "flow" for e in evs) == 4  # a and c were replayed
    assert evs[-1]["event_type"] == "stats" and evs[-1]["stats"]["final"]


def test_replay_of_a_directory_without_captures_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["replay", str(tmp_path / "empty"), "--no-model"])
    assert r.exit_code == 1 and "no capture files" in r.output and "Traceback" not in r.output


def test_the_shipped_flagd_toml_sets_every_key_and_reaches_the_flow_table():
    """systemd/flagd.toml is the documented config: every RunConfig key appears (set or
    commented out), it loads, and its timeouts are the flow table's."""
    from dataclasses import fields

    from flagd.daemon import RunConfig
    from flagd.flows import FlowSettings

    path = Path(__file__).resolve().parents[1] / "systemd" / "flagd.toml"
    text = path.read_text()
    missing = [f.name for f in fields(RunConfig) if f"{f.name} =" not in text]
    assert not missing, missing
    cfg = RunConfig.load(path, established_timeout=30.0)
    flows = cfg.pipeline_settings(FlowSettings()).flows
    assert (flows.idle_timeout, flows.established_timeout, flows.active_timeout) == (120, 30, 1800)
