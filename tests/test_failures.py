"""Every failure path ends cleanly: a stage that raises, a second signal, SIGTERM in a big
replay, queue losses in live mode, stats() during shutdown.

In-process tests run the real Pipeline with a classifier that raises; the signal tests run
`python -m flagd replay` as a subprocess, exactly as a user starts it, on generated captures.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flagd.flows import FlowSettings
from flagd.frames import LINKTYPE_ETHERNET, Frames
from flagd.infer import Prediction
from flagd.pipeline import Pipeline, PipelineSettings
from flagd.sinks import MemorySink
from flagd.source import FileSource
from tests import floodgen


class Broken:
    """A classifier whose encode or predict raises (after `after` good batches)."""

    name, device = "broken", "cpu"
    settings = FlowSettings(ready_packets=1)  # what a bundle says its flows must look like

    def __init__(self, where: str, after: int = 0) -> None:
        self.where, self.after, self.calls = where, after, 0

    def encode(self, flows):
        if self.where == "encode" and self.calls >= self.after:
            self.failed_at = time.monotonic()
            raise ValueError("encode exploded")
        return np.zeros((len(flows), 4), np.int64)

    def predict(self, ids, packets_used):
        self.calls += 1
        if self.where == "predict" and self.calls > self.after:
            self.failed_at = time.monotonic()
            raise RuntimeError("predict exploded")
        return [Prediction("chat", 0.9, (("chat", 0.9),), n, self.name) for n in packets_used]


def run_with_deadline(pipe: Pipeline, seconds: float) -> float:
    """Run the pipeline in a thread; fail if it has not ended within `seconds`."""
    import torch  # noqa: F401  (the worker imports it; a daemon has, with its model, long before)

    t0 = time.monotonic()
    t = threading.Thread(target=pipe.run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"pipeline still running after {seconds} s"
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def flood(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("flood")
    return floodgen.write_flood(d / "flood.pcap", "random", 20_000, real_flows=10).path


@pytest.mark.parametrize("where", ["encode", "predict"])
def test_a_stage_that_raises_stops_the_pipeline_with_its_error(flood, where):
    """A file source blocks on full queues: without the finally in every stage, a dead batcher
    or worker left capture blocked on its put and run() waiting forever."""
    sink = MemorySink()
    settings = PipelineSettings(flows=FlowSettings(ready_packets=1), batch_size=8,
                                batch_queue=2, flow_queue=4, stats_interval=0)
    broken = Broken(where, after=3)
    pipe = Pipeline(FileSource(flood), broken, [sink], settings)
    run_with_deadline(pipe, 60)
    took = time.monotonic() - broken.failed_at
    stage = "batcher" if where == "encode" else "worker"
    assert pipe.counters.stage_error.startswith(f"{stage}: ")
    assert f"{where} exploded" in pipe.counters.stage_error
    final = sink.events[-1]
    assert final["event_type"] == "stats" and final["stats"]["final"]
    assert where in final["stats"]["error"]
    assert took < 5


def test_replay_with_a_failing_classifier_exits_non_zero_with_the_error(flood, tmp_path, monkeypatch):
    """Through the CLI: the error on stderr (one line, no traceback), a final stats event, exit 1."""
    import flagd.cli

    broken = Broken("predict")
    monkeypatch.setattr(flagd.cli, "_load_model", lambda model, no_model, top_k: broken)
    log = tmp_path / "events.jsonl"
    r = CliRunner().invoke(flagd.cli.app, ["replay", str(flood), "--log", str(log),
                                           "--no-dashboard", "--stats-interval", "0"])
    assert r.exit_code == 1, r.output
    assert time.monotonic() - broken.failed_at < 5, r.output  # from the error to the exit
    assert "worker: RuntimeError: predict exploded" in r.output and "Traceback" not in r.output
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[-1]["event_type"] == "stats" and events[-1]["stats"]["final"]


def replay(capture: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flagd", "replay", str(capture), "--log", str(log),
                             "--no-dashboard", "--stats-interval", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_log(proc: subprocess.Popen, log: Path, size: int, timeout: float = 300) -> None:
    # Generous: on this shared machine importing torch alone has taken 46 s.
    deadline = time.monotonic() + timeout
    while not log.exists() or log.stat().st_size < size:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "replay wrote too little"
        time.sleep(0.02)


def test_sigterm_during_a_big_replay_stops_reading_and_exits_within_10_s(tmp_path, tiny_bundle):
    """2,000,000 one-packet flows: a stop classifies for a short grace, then sheds the rest,
    so it ends in seconds (it took ~3 minutes when every open flow was classified)."""
    cap = floodgen.write_flood(tmp_path / "big.pcap", "random", 2_000_000, real_flows=20).path
    log = tmp_path / "events.jsonl"
    proc = replay(cap, log, "--model", str(tiny_bundle))
    wait_for_log(proc, log, 200_000)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in log.read_text().splitlines()]
    final = events[-1]["stats"]
    assert final["final"]
    assert final["packets"] < 2_000_000  # reading stopped
    flows = [e for e in events if e["event_type"] == "flow"]
    cls = Counter(e["flow_id"] for e in events if e["event_type"] == "classification")
    drops = final["drops"]
    # every flow metered has one flow event (labelled, shed or ruled out), or was ended by the
    # stop after the grace and is counted
    assert len(flows) == len({e["flow_id"] for e in flows})
    assert len(flows) + drops["shutdown_unlogged"] == final["flows"]
    shed = sum(e["flag"].get("unclassified") == "shed" for e in flows)
    # a shed flow's event may be past the grace too: then it is counted, not written
    assert shed <= drops["shutdown_shed"] + drops["batch_queue"]
    assert max(cls.values()) == 1 and len(cls) == final["classified"]
    print(f"SIGTERM -> exit: {took:.2f} s, {final['flows']} flows, {shed} shed, "
          f"{drops['shutdown_unlogged']} unlogged")
    assert took < 10, f"{took:.1f} s from SIGTERM to exit"


def test_a_second_signal_exits_at_once(tmp_path, tiny_bundle):
    cap = floodgen.write_flood(tmp_path / "big.pcap", "random", 400_000).path
    cfg = tmp_path / "flagd.toml"
    cfg.write_text("batch_size = 4\n")  # slow classification: the orderly stop takes a while
    log = tmp_path / "events.jsonl"
    proc = replay(cap, log, "--model", str(tiny_bundle), "--config", str(cfg))
    wait_for_log(proc, log, 50_000)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert proc.poll() is None, "the first signal already ended the run: nothing tested"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    took = time.monotonic() - t0
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "second signal" in err
    assert took < 1.0, f"{took:.2f} s after the second signal"
    data = log.read_bytes()
    assert data.endswith(b"\n")  # whole lines only
    for line in data.splitlines():
        json.loads(line)


class LiveFrames:
    """A live source (drops instead of waiting) replaying frames in small bursts."""

    name = "burst"
    live = True

    def __init__(self, frames: Frames, burst: int) -> None:
        self.frames, self.burst = frames, burst

    def batches(self, stop):
        f = self.frames
        for lo in range(0, len(f), self.burst):
            if stop.is_set():
                return
            idx = slice(lo, lo + self.burst)
            yield Frames(f.data, f.offset[idx], f.caplen[idx], f.wirelen[idx], f.ts[idx],
                         f.linktype[idx])

    def kernel_drops(self) -> int:
        return 0

    def close(self) -> None:
        pass


class Slow(Broken):
    def __init__(self, delay: float) -> None:
        super().__init__("nowhere")
        self.delay = delay

    def predict(self, ids, packets_used):
        time.sleep(self.delay)
        return super().predict(ids, packets_used)


class SlowSink(MemorySink):
    """A sink that stalls now and then: with a one-event queue the batcher waits on it."""

    def write(self, event: dict) -> None:
        if len(self.events) % 50 == 0:
            time.sleep(0.005)
        super().write(event)


def test_queue_losses_never_classify_a_flow_twice():
    """Tiny queues and a slow sink on a live source: flow updates are lost at the capture queue.
    A flow whose READY was lost is classified at its end instead, once. The old batcher kept a
    'queued' set and cleared it past 2 x max_flows entries (ends lost to the full queue never
    came to remove theirs), after which a still-open flow was classified again at its end: 30
    of 1,500 flows here."""
    rec = floodgen.real_records(1500, 6)  # TCP flows with payload, READY at 3 of 6 packets
    n = len(rec)
    frames = Frames(data=np.ascontiguousarray(rec["frame"]).reshape(-1),
                    offset=np.arange(n, dtype=np.int64) * floodgen.FRAME,
                    caplen=np.full(n, floodgen.FRAME, np.int32),
                    wirelen=np.full(n, floodgen.FRAME, np.int32),
                    ts=floodgen.T0 + np.arange(n) * 1e-4,
                    linktype=np.full(n, LINKTYPE_ETHERNET, np.int32))
    sink = SlowSink()
    settings = PipelineSettings(flows=FlowSettings(ready_packets=3, max_flows=16), batch_size=2,
                                batch_delay=0, flow_queue=1, batch_queue=1, event_queue=1,
                                stats_interval=0)
    pipe = Pipeline(LiveFrames(frames, 3), Slow(0.0), [sink], settings)
    run_with_deadline(pipe, 120)
    cls = Counter(e["flow_id"] for e in sink.events if e["event_type"] == "classification")
    final = sink.events[-1]["stats"]
    assert final["drops"]["capture_queue"] > 0  # losses happened
    assert cls and max(cls.values()) == 1, [k for k, v in cls.items() if v > 1]
    flows = Counter(e["flow_id"] for e in sink.events if e["event_type"] == "flow")
    assert max(flows.values()) == 1


def test_stats_never_raises_while_a_live_capture_shuts_down():
    """stats() runs on the main thread while the capture thread drains and closes the socket:
    hammer it across the shutdown of a live capture on a veth pair."""
    from tests.netns import netns_unavailable, veth_pair

    why = netns_unavailable()
    if why:
        pytest.skip(why)
    from flagd.capture import open_capture
    from flagd.source import LiveSource

    errors: list[BaseException] = []
    for _ in range(5):
        with veth_pair(root_end=True) as pair:
            pipe = Pipeline(LiveSource(open_capture(pair.a.ifname)), None, [MemorySink()],
                            PipelineSettings(stats_interval=0))
            runner = threading.Thread(target=pipe.run)
            runner.start()
            pair.run_udp(count=5, size=64)
            done = threading.Event()

            def hammer(pipe: Pipeline = pipe, done: threading.Event = done) -> None:
                while not done.is_set():
                    try:
                        pipe.stats()
                    except BaseException as e:  # noqa: BLE001 - what we look for
                        errors.append(e)
                        return

            hammers = [threading.Thread(target=hammer) for _ in range(2)]
            for h in hammers:
                h.start()
            pipe.stop.set()
            runner.join(20)
            done.set()
            for h in hammers:
                h.join()
            assert not runner.is_alive()
            assert pipe.stats(final=True)["drops"]["kernel"] == 0  # after close, too
    assert not errors, errors
