"""Shipping events from a sensor: shipping/rsyslog-flagd.conf run by a real rsyslogd.

The sample config is read and only its paths and collector address are swapped, so what is
tested is what ships. flagd replays a capture into a log; rsyslogd tails it, maps every event
to ECS names and forwards it over TCP to a collector thread here. Events appended while it
runs, a log rotated under it and lines written while it is stopped must all arrive, each
exactly once and in order, and each record must be the mapping of its event.

Vector and Fluent Bit cannot be installed here: the Vector sample is only parsed and its
wiring checked; the Fluent Bit sample's Lua filter runs under a plain Lua interpreter on
the same events and must produce the same mapping.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest

from flagd.events import schema
from flagd.sinks import JsonlSink

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "shipping" / "rsyslog-flagd.conf"
PCAP = ROOT / "tests" / "data" / "lab-tls.pcap"
RSYSLOGD = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")
WAIT_S = 20.0

needs_rsyslogd = pytest.mark.skipif(
    RSYSLOGD is None, reason="rsyslogd not installed (apt-get install --no-install-recommends rsyslog)")

# A classification event as flagd writes it with a model loaded (the no-model replays have
# none): IPv6 addresses, a float confidence and a top-k list.
CLASSIFICATION = {
    "timestamp": "2026-11-28T15:58:09.000001+0000", "event_type": "classification",
    "flow_id": 281474976710655, "src_ip": "2001:db8::1", "src_port": 50000,
    "dest_ip": "2001:db8::2", "dest_port": 443, "proto": "UDP", "sensor": "sensor-c",
    "flag": {"label": "vpn-voip", "confidence": 0.9731,
             "top_k": [{"label": "vpn-voip", "confidence": 0.9731},
                       {"label": "voip", "confidence": 0.0201}],
             "packets_used": 5, "model": "iscx-vpn2016@0123abcd"},
}
NOT_JSON = 'flagd: this line is "not JSON'


def rsyslog_conf(log: Path, workdir: Path, port: int) -> str:
    """The shipped sample with its paths and collector pointed at this test's."""
    text = SAMPLE.read_text()
    for old, new in [("/var/log/flagd/events.jsonl", str(log)),
                     ("/var/lib/rsyslog-flagd", str(workdir)),
                     ('target="collector.example.net"', 'target="127.0.0.1"'),
                     ('port="5140"', f'port="{port}"')]:
        assert old in text, f"{SAMPLE} no longer contains {old!r}: update this test"
        text = text.replace(old, new)
    return text


def expected_ecs(ev: dict) -> dict:
    """shipping/README.md's mapping table, as code: the record a shipper must send for `ev`."""
    out: dict = {"@timestamp": ev["timestamp"],
                 "event": {"module": "flagd", "dataset": f"flagd.{ev['event_type']}"}}
    if ev["event_type"] == "stats":
        out["event"]["kind"] = "metric"
    else:
        out["event"] |= {"kind": "event", "category": "network"}
    if "sensor" in ev:
        out["observer"] = {"name": ev["sensor"]}
    if "flow_id" in ev:
        out["flow"] = {"id": ev["flow_id"]}
        for eve, ecs in (("src", "source"), ("dest", "destination")):
            addr = ev[f"{eve}_ip"]
            out[ecs] = {"address": addr}
            if not addr.startswith("anon-"):
                out[ecs]["ip"] = addr
            out[ecs]["port"] = ev[f"{eve}_port"]
        out["network"] = {"transport": ev["proto"].lower()}
        if "community_id" in ev:
            out["network"]["community_id"] = ev["community_id"]
    if "flag" in ev:
        out["flagd"] = dict(ev["flag"])
    if "flow" in ev:
        f = ev["flow"]
        out["source"] |= {"packets": f["pkts_toserver"], "bytes": f["bytes_toserver"]}
        out["destination"] |= {"packets": f["pkts_toclient"], "bytes": f["bytes_toclient"]}
        out["network"] |= {"packets": f["pkts_toserver"] + f["pkts_toclient"],
                           "bytes": f["bytes_toserver"] + f["bytes_toclient"]}
        out["event"] |= {"start": f["start"], "end": f["end"]}
        out["flagd"]["flow"] = {k: f[k] for k in ("age", "state", "reason")}
    if "stats" in ev:
        out.setdefault("flagd", {})["stats"] = ev["stats"]
    return out


class Collector(socketserver.ThreadingTCPServer):
    """A TCP listener on a free port of 127.0.0.1 that keeps every line it is sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _LineHandler)
        self.lines: list[bytes] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def received(self) -> list[bytes]:
        with self.lock:
            return list(self.lines)

    def wait_for(self, n: int, timeout: float = WAIT_S) -> int:
        """Waits until `n` lines have arrived (or `timeout`); returns how many did."""
        deadline = time.monotonic() + timeout
        while len(self.received()) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # let anything extra (a duplicate) show up too
        return len(self.received())

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _LineHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            with self.server.lock:
                self.server.lines.append(line)


class Rsyslogd:
    """rsyslogd in the foreground on a generated config: own pid file, own work directory."""

    def __init__(self, conf: Path, tmp: Path) -> None:
        self.argv = [RSYSLOGD, "-n", "-f", str(conf), "-i", str(tmp / "rsyslogd.pid")]
        self.output = tmp / "rsyslogd.out"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.output.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """SIGTERM (rsyslogd saves how far it has read), SIGKILL if it does not exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


def replay(log: Path, config: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "flagd", "replay", str(PCAP), "--no-model", "--no-dashboard",
            "--log", str(log)]
    if config is not None:
        argv += ["--config", str(config)]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    return log.read_text().splitlines()


def append(log: Path, *lines: str) -> None:
    with log.open("a") as f:
        f.writelines(line + "\n" for line in lines)


@dataclass
class Replayed:
    local: list[str]  # flagd's default sensor name (this host), real addresses
    sensor_b: list[str]  # sensor = "sensor-b", anonymized addresses


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> Replayed:
    tmp = tmp_path_factory.mktemp("replays")
    config = tmp / "sensor-b.toml"
    config.write_text('sensor = "sensor-b"\nanonymize = true\nanonymize_key = "shipping-test"\n')
    return Replayed(replay(tmp / "local.jsonl"), replay(tmp / "sensor-b.jsonl", config))


@dataclass
class Shipped:
    lines: list[str] = field(default_factory=list)  # every line flagd (or the test) wrote
    records: list[bytes] = field(default_factory=list)  # every line the collector got
    # (lines written, lines received) at the end of each phase, by phase name
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)
    rsyslog_log: str = ""


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, replayed) -> Shipped:
    if RSYSLOGD is None:
        pytest.skip("rsyslogd not installed (apt-get install --no-install-recommends rsyslog)")
    tmp = tmp_path_factory.mktemp("shipping")
    log, work = tmp / "events.jsonl", tmp / "work"
    work.mkdir()
    rotated = tmp / "events.jsonl.1"
    out = Shipped()

    def phase(name: str) -> None:
        written = [*(rotated.read_text().splitlines() if rotated.exists() else []),
                   *log.read_text().splitlines()]
        got = collector.wait_for(len(written))
        out.phases[name] = (len(written), got)

    append(log, *replayed.local)  # there before the shipper starts: read from the beginning
    collector = Collector()
    rsyslogd = None
    try:
        conf = tmp / "rsyslog-flagd.conf"
        conf.write_text(rsyslog_conf(log, work, collector.port))
        rsyslogd = Rsyslogd(conf, tmp)
        rsyslogd.start()
        phase("initial")
        # another sensor's events, appended by flagd's own writer while rsyslogd runs
        sink = JsonlSink(log)
        for line in replayed.sensor_b:
            sink.write(json.loads(line))
        sink.close()
        phase("appended")
        log.rename(rotated)  # logrotate, then flagd reopens its log on SIGHUP
        append(log, json.dumps(CLASSIFICATION, separators=(",", ":")))
        phase("rotated")
        rsyslogd.stop()
        append(log, NOT_JSON)  # written while the shipper is down
        rsyslogd.start()
        phase("restarted")
        rsyslogd.stop()
        out.lines = [*rotated.read_text().splitlines(), *log.read_text().splitlines()]
        out.records = collector.received()
    finally:
        if rsyslogd is not None:
            rsyslogd.stop()
            out.rsyslog_log = rsyslogd.log()
        collector.close()
    return out


def _short(text: str) -> str:
    return text[-2000:]


@needs_rsyslogd
def test_sample_config_is_valid(tmp_path):
    conf = tmp_path / "rsyslog-flagd.conf"
    conf.write_text(rsyslog_conf(tmp_path / "events.jsonl", tmp_path, 5140))
    res = subprocess.run([RSYSLOGD, "-N1", "-f", str(conf)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_every_line_arrives_once_in_order(shipped):
    assert len(shipped.lines) == len(shipped.records), _short(shipped.rsyslog_log)
    for phase, (written, received) in shipped.phases.items():
        assert received == written, f"{phase}: {received} of {written} lines\n" + _short(
            shipped.rsyslog_log)


@pytest.mark.slow
def test_tails_appends_rotation_and_resumes_after_restart(shipped):
    initial = shipped.phases["initial"][0]
    # each phase added lines, and each phase's lines arrived before the next began
    counts = [written for written, _ in shipped.phases.values()]
    assert initial > 0 and counts == sorted(set(counts)), shipped.phases
    assert [received for _, received in shipped.phases.values()] == counts


@pytest.mark.slow
def test_every_record_is_the_ecs_mapping_of_its_event(shipped):
    validator = jsonschema.Draft202012Validator(schema())
    events = [json.loads(line) for line in shipped.lines if line != NOT_JSON]
    assert {ev["event_type"] for ev in events} == {"flow", "classification", "stats"}
    host = {socket.gethostname(), socket.gethostname().split(".")[0], socket.getfqdn()}
    for line, raw in zip(shipped.lines, shipped.records, strict=True):
        rec = json.loads(raw)
        if line == NOT_JSON:
            continue
        ev = json.loads(line)
        validator.validate(ev)
        want = expected_ecs(ev)
        if "sensor" not in ev:
            # no sensor in the event: the shipping host names it
            assert rec["observer"]["name"] in host, rec
            want["observer"] = rec["observer"]
        assert rec == want


@pytest.mark.slow
def test_flow_event_fields_one_by_one(shipped):
    ev = json.loads(shipped.lines[0])
    rec = json.loads(shipped.records[0])
    assert ev["event_type"] == "flow"
    assert rec["@timestamp"] == ev["timestamp"]
    assert rec["observer"]["name"] == ev["sensor"] == socket.gethostname()
    assert rec["flow"]["id"] == ev["flow_id"]
    assert rec["source"]["ip"] == rec["source"]["address"] == ev["src_ip"]
    assert rec["source"]["port"] == ev["src_port"]
    assert rec["destination"]["ip"] == rec["destination"]["address"] == ev["dest_ip"]
    assert rec["destination"]["port"] == ev["dest_port"]
    assert rec["network"]["transport"] == ev["proto"].lower() == "tcp"
    assert rec["source"]["packets"] == ev["flow"]["pkts_toserver"]
    assert rec["source"]["bytes"] == ev["flow"]["bytes_toserver"]
    assert rec["destination"]["packets"] == ev["flow"]["pkts_toclient"]
    assert rec["destination"]["bytes"] == ev["flow"]["bytes_toclient"]
    assert rec["network"]["bytes"] == ev["flow"]["bytes_toserver"] + ev["flow"]["bytes_toclient"]
    assert rec["event"]["start"] == ev["flow"]["start"]
    assert rec["event"]["end"] == ev["flow"]["end"]
    assert rec["event"]["dataset"] == "flagd.flow"
    assert rec["flagd"]["relevant_packets"] == ev["flag"]["relevant_packets"]
    assert rec["flagd"]["unclassified"] == ev["flag"]["unclassified"] == "no-model"
    assert rec["flagd"]["flow"]["reason"] == ev["flow"]["reason"]


@pytest.mark.slow
def test_merged_sensors_stay_attributable(shipped):
    names = {json.loads(r)["observer"]["name"] for r in shipped.records}
    assert {socket.gethostname(), "sensor-b", "sensor-c"} <= names
    anonymized = [json.loads(r) for r in shipped.records if b"anon-" in r]
    assert anonymized, "the sensor-b replay should have written pseudonyms"
    for rec in anonymized:
        # a pseudonym is no IP address: kept in .address, left out of .ip
        assert rec["observer"]["name"] == "sensor-b"
        assert rec["source"]["address"].startswith("anon-") and "ip" not in rec["source"]


@pytest.mark.slow
def test_classification_keeps_types(shipped):
    rec = next(json.loads(r) for r in shipped.records if b"flagd.classification" in r)
    assert rec["flagd"] == CLASSIFICATION["flag"]  # floats and the top-k list unchanged
    assert rec["source"]["ip"] == "2001:db8::1" and rec["network"]["transport"] == "udp"


@pytest.mark.slow
def test_a_line_that_is_not_json_is_forwarded_tagged(shipped):
    rec = json.loads(shipped.records[shipped.lines.index(NOT_JSON)])
    assert rec["event"]["original"] == NOT_JSON
    assert rec["tags"] == "flagd_parse_failure"
    assert rec["event"]["dataset"] == "flagd.unparsed"


@pytest.mark.slow
def test_stats_events_name_their_sensor(replayed):
    lines = replayed.local + replayed.sensor_b
    stats = [json.loads(line) for line in lines if '"event_type":"stats"' in line]
    assert len(stats) == 2  # one final stats event per replay
    assert [ev.get("sensor") for ev in stats] == [socket.gethostname(), "sensor-b"]


def test_vector_sample_tails_the_same_log_into_daily_indices():
    """Vector is not installable here: at least the sample must parse and be wired up."""
    cfg = tomllib.loads((ROOT / "shipping" / "vector.toml").read_text())
    assert cfg["sources"]["flagd_log"]["include"] == ["/var/log/flagd/events.jsonl"]
    assert "/var/log/flagd/events.jsonl" in SAMPLE.read_text()
    remap = cfg["transforms"]["flagd_ecs"]
    assert remap["inputs"] == ["flagd_log"] and "parse_json!" in remap["source"]
    es = cfg["sinks"]["elasticsearch"]
    assert set(es["inputs"]) == {"flagd_ecs", "flagd_unparsed"}
    assert es["bulk"]["index"] == "flagd-%Y.%m.%d"
    assert cfg["log_schema"]["timestamp_key"] == "@timestamp"  # what %Y.%m.%d reads


LUA = next(filter(None, map(shutil.which, ("luajit", "lua5.1", "lua5.4", "lua"))), None)
LUA_FILTER = ROOT / "shipping" / "fluent-bit" / "flagd-ecs.lua"

# Stands in for Fluent Bit: flb_null (its JSON null with enable_flb_null), the filter call,
# and a JSON encoder for what the filter returns.
LUA_PRELUDE = "flb_null = setmetatable({}, {})\n"
LUA_HARNESS = r"""
dofile(FILTER)
local function enc(v)
  if v == flb_null then return "null" end
  local t = type(v)
  if t == "string" then
    return '"' .. (v:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end)) .. '"'
  elseif t == "boolean" then
    return tostring(v)
  elseif t == "number" then
    if (math.type and math.type(v) == "integer") or (not math.type and v == math.floor(v)) then
      return string.format("%d", v)
    end
    return string.format("%.17g", v)
  end
  local parts = {}
  if #v > 0 then
    for _, x in ipairs(v) do parts[#parts + 1] = enc(x) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  for k, x in pairs(v) do parts[#parts + 1] = enc(k) .. ":" .. enc(x) end
  return "{" .. table.concat(parts, ",") .. "}"
end
for _, ev in ipairs(EVENTS) do
  local code, ts, out = flagd_ecs("flagd", 12.5, ev)
  io.write(code, "\t", ts, "\t", enc(out), "\n")
end
"""


def lua_literal(v: object) -> str:
    if v is None:
        return "flb_null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "{" + ", ".join(map(lua_literal, v)) + "}"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"[{lua_literal(k)}] = {lua_literal(x)}" for k, x in v.items()) + "}"


@pytest.mark.slow
def test_fluent_bit_lua_filter_maps_like_rsyslog(replayed, tmp_path):
    if LUA is None:
        pytest.skip("no Lua interpreter (apt-get install lua5.4) to run the Fluent Bit filter")
    events = [json.loads(line) for line in replayed.local + replayed.sensor_b] + [CLASSIFICATION]
    # what Fluent Bit's tail input hands on for a line its json parser rejects
    records = [*events, {"log": NOT_JSON}]
    script = tmp_path / "harness.lua"
    script.write_text(LUA_PRELUDE + f"FILTER = {lua_literal(str(LUA_FILTER))}\n"
                      f"EVENTS = {lua_literal(records)}\n" + LUA_HARNESS)
    res = subprocess.run([LUA, str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    rows = [line.split("\t") for line in res.stdout.splitlines()]
    assert len(rows) == len(records)
    host = socket.gethostname()
    for ev, (code, ts, out) in zip(events, rows, strict=False):
        assert (code, float(ts)) == ("2", 12.5)  # record replaced, its time (the event's) kept
        want = expected_ecs(ev)
        del want["@timestamp"]  # written by the es output from the record's time
        want.setdefault("observer", {"name": host})
        assert json.loads(out) == want
    unparsed = json.loads(rows[-1][2])
    assert unparsed["event"]["original"] == NOT_JSON
    assert unparsed["tags"] == "flagd_parse_failure"
