"""The JSONL sink (whole lines, reopen for rotation, full disk) and the dashboard renderer."""

from __future__ import annotations

import io
import json
import os
import stat

from rich.console import Console

from flagd.dashboard import Snapshot, render
from flagd.sinks import JsonlSink, RecentEvents


def test_lines_are_whole_and_file_mode_is_0640(tmp_path):
    path = tmp_path / "events.jsonl"
    old = os.umask(0)
    try:
        sink = JsonlSink(path)
    finally:
        os.umask(old)
    for i in range(100):
        sink.write({"event_type": "flow", "i": i, "pad": "x" * i})
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(x)["i"] for x in lines] == list(range(100))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_reopen_after_rename_loses_nothing(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    for i in range(10):
        sink.write({"i": i})
    path.rename(tmp_path / "events.jsonl.1")  # what logrotate does before sending SIGHUP
    sink.write({"i": 10})  # still goes to the renamed file
    sink.reopen()
    for i in range(11, 20):
        sink.write({"i": i})
    sink.close()
    old = [json.loads(x)["i"] for x in (tmp_path / "events.jsonl.1").read_text().splitlines()]
    new = [json.loads(x)["i"] for x in path.read_text().splitlines()]
    assert old + new == list(range(20))


def test_appends_to_an_existing_log(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"old":1}\n')
    sink = JsonlSink(path)
    sink.write({"new": 1})
    sink.close()
    assert path.read_text().splitlines() == ['{"old":1}', '{"new":1}']


def test_full_disk_is_reported_once_and_counted():
    warnings = []
    sink = JsonlSink("/dev/full", warn=warnings.append)
    for i in range(5):
        sink.write({"i": i})
    assert sink.failed == 5 and sink.written == 0
    assert len(warnings) == 1 and "/dev/full" in warnings[0] and "space" in warnings[0].lower()


def test_dashboard_renders_a_snapshot():
    recent = RecentEvents()
    recent.write({"event_type": "classification", "timestamp": "2026-11-28T10:00:00.000000+0000",
                  "proto": "TCP", "src_ip": "198.51.100.1", "src_port": 40000,
                  "dest_ip": "203.0.113.2", "dest_port": 443,
                  "flag": {"label": "vpn-chat", "confidence": 0.91}})
    stats = {"uptime": 12.0, "packets": 1000, "packets_per_s": 83.3, "flows": 10, "flows_per_s": 0.8,
             "flows_open": 3, "classified": 7, "device": "cpu",
             "drops": {"kernel": 0, "capture_queue": 2, "flow_table_eviction": 0, "batch_queue": 0},
             "skipped": {"non_ip": 4}, "queues": {"flows": 0, "batches": 1, "events": 0},
             "latency_ms": {"p50": 3.2, "p99": 18.5}}
    out = io.StringIO()
    Console(file=out, width=140, color_system=None).print(
        render(Snapshot("eth0", "iscx-vpn2016", stats, dict(recent.classes), list(recent.recent))))
    text = out.getvalue()
    for needle in ("eth0", "iscx-vpn2016", "vpn-chat", "0.91", "3.2 / 18.5 ms", "capture queue",
                   "198.51.100.1:40000", "skipped non ip"):
        assert needle in text, needle
