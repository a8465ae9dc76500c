"""Events are never lost or torn: kill -9 mid-write, SIGHUP rotation under load, a full disk.

The daemon runs as a subprocess (`python -m flagd replay`), exactly as a user starts it, on
generated flood captures (tests/floodgen.py) that produce tens of thousands of events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagd.pipeline import Pipeline, PipelineSettings
from flagd.sinks import JsonlSink, MemorySink
from flagd.source import FileSource
from tests import floodgen


def replay_cmd(capture: Path, log: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flagd", "replay", str(capture), "--log", str(log),
            "--no-dashboard", "--stats-interval", "0", *extra]


def whole_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends inside a line"
    return [json.loads(line) for line in data.splitlines()]  # a torn line would raise here


def test_kill_9_while_writing_leaves_only_whole_lines(tmp_path, tiny_bundle):
    cap = floodgen.write_flood(tmp_path / "flood.pcap", "random", 60_000, real_flows=20).path
    log = tmp_path / "events.jsonl"
    proc = subprocess.Popen(replay_cmd(cap, log, "--model", str(tiny_bundle), "--batch-size", "8"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not log.exists() or log.stat().st_size < 2_000_000:  # well into the run
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "replay wrote too little"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    events = whole_lines(log)
    assert len(events) > 2000
    assert not any(e["event_type"] == "stats" and e["stats"].get("final") for e in events)


def test_sighup_rotation_under_load_loses_no_event(tmp_path):
    """A paced replay (~4 s) of 20,000 flows while the log is renamed and SIGHUP sent every
    0.25 s: every flow's event is in exactly one of the files, and no line is torn."""
    n = 20_000
    cap = floodgen.write_flood(tmp_path / "flood.pcap", "random", n, pps=n / 4.0).path
    log = tmp_path / "events.jsonl"
    cfg = tmp_path / "flagd.toml"
    cfg.write_text("idle_timeout = 0.5\n")  # one-packet flows end all along, not at the end
    proc = subprocess.Popen(replay_cmd(cap, log, "--no-model", "--speed", "1", "--config", str(cfg)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # The log opens a moment before the SIGHUP handler is installed (daemon.serve); rotate only
    # once events flow, as logrotate would on a running daemon.
    deadline = time.monotonic() + 60
    while not log.exists() or log.stat().st_size == 0:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    rotated = []
    while proc.poll() is None:
        time.sleep(0.25)
        # Not once the final stats line is out: the daemon then restores SIGHUP's default action.
        if proc.poll() is None and b'"final":true' not in log.read_bytes()[-2000:]:
            dest = tmp_path / f"events.jsonl.{len(rotated) + 1}"
            log.rename(dest)
            rotated.append(dest)
            proc.send_signal(signal.SIGHUP)
    assert proc.wait() == 0, proc.stderr.read()
    assert len(rotated) >= 8
    files = [*rotated, log] if log.exists() else rotated
    per_file = [whole_lines(p) for p in files]
    flows = [e for evs in per_file for e in evs if e["event_type"] == "flow"]
    assert len(flows) == n and len({e["flow_id"] for e in flows}) == n
    assert sum(1 for evs in per_file if any(e["event_type"] == "flow" for e in evs)) >= 6
    final = [e for evs in per_file for e in evs if e["event_type"] == "stats"]
    assert final and final[-1]["stats"]["final"] and final[-1]["stats"]["flows"] == n


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that fills after a few hundred events (needs root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_whole_lines_and_the_pipeline_keeps_counting(tmp_path, tiny_disk):
    cap = floodgen.write_flood(tmp_path / "flood.pcap", "syn", 3000).path
    warnings: list[str] = []
    log = JsonlSink(tiny_disk / "events.jsonl", warn=warnings.append)
    other = MemorySink()
    pipe = Pipeline(FileSource(str(cap)), None, [log, other], PipelineSettings(stats_interval=0))
    pipe.run()
    log.close()
    # the pipeline went on to the end: every flow was counted and reached the other sink
    assert pipe.table.stats.flows == 3000
    assert sum(e["event_type"] == "flow" for e in other.events) == 3000
    assert other.events[-1]["stats"]["final"]
    # the log holds whole lines only, and says nothing it did not write
    kept = whole_lines(tiny_disk / "events.jsonl")
    assert 0 < len(kept) == log.written < len(other.events)
    assert log.written + log.failed == len(other.events)
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert str(tiny_disk / "events.jsonl") in warnings[0]


def test_full_disk_from_the_cli_says_so_once_on_stderr(tmp_path, tiny_disk):
    cap = floodgen.write_flood(tmp_path / "flood.pcap", "syn", 3000).path
    log = tiny_disk / "events.jsonl"
    r = subprocess.run(replay_cmd(cap, log, "--no-model"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and str(log) in lines[0] and "No space left on device" in lines[0]
    whole_lines(log)
    assert os.statvfs(tiny_disk).f_bavail == 0  # it really filled
