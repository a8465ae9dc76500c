"""The dashboard is a pure render of a snapshot: rendered into a StringIO console and read."""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from flagd.dashboard import Snapshot, render

STATS = {"uptime": 12.0, "packets_per_s": 1000.0, "flows_per_s": 10.0, "packets": 12000,
         "flows": 120, "flows_open": 4, "classified": 110, "device": "cpu",
         "latency_ms": {"p50": 3.0, "p99": 9.0}, "drops": {"kernel": 0}, "queues": {"batch": 0}}


def text(snap: Snapshot) -> str:
    console = Console(file=StringIO(), width=160, color_system=None)
    console.print(render(snap))
    return console.file.getvalue()


def event(label: str, top: str) -> dict:
    return {"timestamp": "2026-11-29T19:00:01.000000+0000", "proto": "TCP",
            "src_ip": "198.51.100.1", "src_port": 40000, "dest_ip": "203.0.113.2",
            "dest_port": 443, "flag": {"label": label, "confidence": 0.42,
                                       "top_k": [{"label": top, "confidence": 0.42}]}}


def test_unknown_is_its_own_row_below_the_classes_even_when_it_is_the_largest():
    out = text(Snapshot("eth0", "iscx-vpn2016", STATS, {"chat": 10, "unknown": 90, "voip": 5}))
    lines = out.splitlines()
    row = {name: next(i for i, line in enumerate(lines) if f" {name} " in f" {line} ")
           for name in ("chat", "voip", "unknown")}
    assert row["chat"] < row["voip"] < row["unknown"]  # classes by count, then unknown
    assert " 90 " in lines[row["unknown"]]


def test_unknown_row_is_shown_at_zero_once_flows_are_classified():
    out = text(Snapshot("eth0", "m", STATS, {"chat": 3}))
    assert any("unknown" in line and " 0 " in line for line in out.splitlines())
    assert "unknown" not in text(Snapshot("eth0", "m", STATS, {}))  # nothing classified yet


def test_recent_unknown_names_what_the_model_would_have_said():
    out = text(Snapshot("eth0", "m", STATS, {"unknown": 1, "chat": 1},
                        recent=[event("unknown", "vpn-voip"), event("chat", "chat")]))
    assert "unknown (vpn-voip?)" in out
    assert any(" chat " in line and "0.42" in line for line in out.splitlines())
