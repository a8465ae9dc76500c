"""Threads and bounded queues: source -> flows -> batcher -> worker -> events -> sinks.

    capture thread   frames from the source, decoded and fed to the flow table
    batcher thread   tokenizes flows as they become ready (or end before that), batches them
    worker thread    runs the classifier on each batch
    main thread      turns flow ends and predictions into events, writes the sinks, emits
                     stats, renders the dashboard, and handles signals

`replay` and `run` differ only in the source and in what a full queue does: a file source waits
(nothing is lost), a live source never blocks capture: a full queue drops and counts.
Shutdown runs in order: stop capture -> end all flows -> drain -> flush sinks -> join.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from flagd.events import EventHeader, Prediction, classification_event, flow_event, stats_event
from flagd.flows import END, READY, Flow, FlowSettings, FlowTable, FlowUpdate
from flagd.frames import Frames
from flagd.packets import decode
from flagd.sinks import Sink


class Source(Protocol):
    """Where frames come from. A live source yields empty batches when the link is quiet; every
    source ends its batches once `stop` is set (a live one after what the kernel still holds)."""

    name: str
    live: bool

    def batches(self, stop: threading.Event) -> Iterator[Frames]: ...
    def kernel_drops(self) -> int: ...
    def close(self) -> None: ...


class Classifier(Protocol):
    """A loaded model bundle: the batcher calls `encode`, the worker `predict`."""

    name: str
    device: str

    def encode(self, flows: list[Flow]) -> np.ndarray: ...
    def predict(self, ids: np.ndarray, packets_used: list[int]) -> list[Prediction]: ...


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    flows: FlowSettings = field(default_factory=FlowSettings)
    batch_size: int = 64  # N: most flows in one inference batch
    batch_delay: float = 0.02  # T: seconds a ready flow may wait for its batch to fill
    flow_queue: int = 1024  # capture -> batcher, in chunks of at most 64 flow updates
    event_queue: int = 8192  # batcher/worker -> main thread (events to write), in events
    batch_queue: int = 32  # batcher -> worker, in batches
    stats_interval: float = 10.0  # seconds between stats events (0: only the final one)
    header: EventHeader = field(default_factory=EventHeader)
    tick_interval: float = 1.0  # live sources: wall-clock tick of the flow table


@dataclass(slots=True)
class Counters:
    capture_queue_drops: int = 0  # flow updates lost because the batcher fell behind
    batch_queue_drops: int = 0  # flows shed because the worker fell behind
    classified: int = 0
    batches: int = 0
    capture_error: str | None = None


_DONE = object()
_CHUNK = 64  # most flow updates in one flow_q item
_SHED = "shed"


class Pipeline:
    def __init__(self, source: Source, classifier: Classifier | None, sinks: list[Sink],
                 settings: PipelineSettings | None = None) -> None:
        self.source = source
        self.classifier = classifier
        self.sinks = sinks
        self.s = settings or PipelineSettings()
        self.table = FlowTable(self.s.flows)
        self.counters = Counters()
        self.stop = threading.Event()
        self.reopen = threading.Event()  # set by SIGHUP
        self.lossless = not source.live
        self.flow_q: queue.Queue = queue.Queue(self.s.flow_queue)
        self.batch_q: queue.Queue = queue.Queue(self.s.batch_queue)
        # Bounded too: when the sinks fall behind, a file source waits and a live one drops at
        # flow_q (counted); unbounded, a flood of evictions grew it past 1.5 GiB.
        self.event_q: queue.Queue = queue.Queue(self.s.event_queue)  # batcher, worker -> main
        self.latencies: deque[float] = deque(maxlen=10_000)  # seconds, ready -> event written
        self.started = time.monotonic()
        self._preds: dict[int, Prediction] = {}  # classified flows not yet ended
        self._waiting: dict[int, Flow] = {}  # ended flows whose prediction is still coming
        self._shed: set[int] = set()  # flows shed at the batch queue whose end is still coming
        self._max_pending = 2 * self.s.flows.max_flows
        self._ready_at: dict[int, float] = {}
        self._samples: deque[tuple[float, int, int]] = deque()

    # --- capture thread -------------------------------------------------------------------
    def _capture(self) -> None:
        if hasattr(self.source, "flow_updates"):  # capture processes meter flows themselves
            try:
                for updates in self.source.flow_updates(self.stop):
                    self._hand_on(updates)
            except Exception as e:
                self.counters.capture_error = f"{type(e).__name__}: {e}"
            finally:
                self.flow_q.put(_DONE)
            return
        table, tick = self.table, self.s.tick_interval
        next_tick = time.monotonic() + tick
        try:
            for frames in self.source.batches(self.stop):
                if len(frames):
                    self._hand_on(table.add(decode(frames)))
                if self.source.live and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + tick
                    self._hand_on(table.tick(time.time()))
        except Exception as e:  # a source failure ends the run cleanly, with its reason
            self.counters.capture_error = f"{type(e).__name__}: {e}"
        finally:
            # Capture has stopped: the last flows may wait for the batcher, never be dropped
            # (dropping them lost 54,082 of 600,220 flow events at the end of a live soak).
            self._hand_on(table.flush(), wait=True)
            self.flow_q.put(_DONE)

    def _hand_on(self, updates: list[FlowUpdate], wait: bool = False) -> None:
        # In chunks, so flow_q is bounded in flows: one 65536-frame file batch can end 65536.
        for i in range(0, len(updates), _CHUNK):
            part = updates[i:i + _CHUNK]
            if self.lossless or wait:
                self.flow_q.put(part)
                continue
            try:
                self.flow_q.put_nowait(part)
            except queue.Full:
                self.counters.capture_queue_drops += len(part)

    # --- batcher thread -------------------------------------------------------------------
    def _batcher(self) -> None:
        pending: list[Flow] = []
        queued: set[int] = set()  # flows sent for classification that have not ended yet
        oldest = 0.0
        delay, size = self.s.batch_delay, self.s.batch_size
        classify = self.classifier is not None
        while True:
            timeout = max(0.0, oldest + delay - time.monotonic()) if pending else None
            try:
                item = self.flow_q.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _DONE:
                break
            for kind, f in item or ():
                if not classify:
                    if kind == END:
                        self.event_q.put((END, f))
                    continue
                if kind == READY or (f.relevant and f.flow_id not in queued):
                    # READY, or an end before K relevant packets (or whose READY was dropped):
                    # classify what the flow has.
                    if not pending:
                        oldest = time.monotonic()
                    self._ready_at[f.flow_id] = time.monotonic()
                    queued.add(f.flow_id)
                    pending.append(f)
                if kind == END:
                    queued.discard(f.flow_id)
                    self.event_q.put((END, f))
            if len(queued) > self._max_pending:  # ends lost to a full queue never come
                queued.clear()
            if pending and (len(pending) >= size or time.monotonic() - oldest >= delay):
                self._send(pending)
                pending = []
        if pending:
            self._send(pending)
        if classify:
            self.batch_q.put(_DONE)
        self.event_q.put(_DONE)

    def _send(self, flows: list[Flow]) -> None:
        ids = self.classifier.encode(flows)
        if self.lossless:
            self.batch_q.put((flows, ids))
            return
        try:
            self.batch_q.put_nowait((flows, ids))
        except queue.Full:
            self.counters.batch_queue_drops += len(flows)
            for f in flows:
                self.event_q.put((_SHED, f))

    # --- worker thread --------------------------------------------------------------------
    def _worker(self) -> None:
        import torch

        with torch.inference_mode():
            while (item := self.batch_q.get()) is not _DONE:
                flows, ids = item
                preds = self.classifier.predict(ids, [len(f.packets) for f in flows])
                self.counters.batches += 1
                for f, p in zip(flows, preds, strict=True):
                    self.event_q.put(("pred", f, p))
        self.event_q.put(_DONE)

    # --- main thread: events --------------------------------------------------------------
    def _emit(self, event: dict) -> None:
        for sink in self.sinks:
            sink.write(event)

    def _on_event(self, item: tuple) -> None:
        h = self.s.header
        kind, f = item[0], item[1]
        fid = f.flow_id
        if kind == "pred":
            pred = item[2]
            self.counters.classified += 1
            self._emit(classification_event(f, pred, f.last, h))
            t0 = self._ready_at.pop(fid, None)
            if t0 is not None:
                self.latencies.append(time.monotonic() - t0)
            if fid in self._waiting:
                self._emit(flow_event(self._waiting.pop(fid), pred, h))
            else:
                self._preds[fid] = pred
                if len(self._preds) > self._max_pending:  # its end was lost to a full queue
                    self._preds.pop(next(iter(self._preds)))
        elif kind == END:
            if fid in self._preds:
                self._emit(flow_event(f, self._preds.pop(fid), h))
            elif f.relevant == 0 or self.classifier is None:
                self._emit(flow_event(f, None, h, unclassified=None if self.classifier else "no-model"))
            elif fid in self._shed:
                self._shed.discard(fid)
                self._emit(flow_event(f, None, h, unclassified=_SHED))
            else:
                self._waiting[fid] = f
        elif kind == _SHED:
            self._ready_at.pop(fid, None)
            if fid in self._waiting:
                self._emit(flow_event(self._waiting.pop(fid), None, h, unclassified=_SHED))
            else:
                self._shed.add(fid)
                if len(self._shed) > self._max_pending:  # its end was lost to a full queue
                    self._shed.clear()

    def stats(self, final: bool = False) -> dict:
        now = time.monotonic()
        fanout = hasattr(self.source, "flow_stats")
        fs = self.source.flow_stats() if fanout else self.table.stats
        # Rates over the last ~10 s, whoever asks (stats events and the dashboard alike).
        samples = self._samples
        if not samples or now - samples[-1][0] >= 0.5:
            samples.append((now, fs.packets, fs.flows))
        while len(samples) > 2 and now - samples[1][0] >= 10:
            samples.popleft()
        t_prev, p_prev, f_prev = samples[0] if len(samples) > 1 else (self.started, 0, 0)
        dt = max(now - t_prev, 1e-9)
        lat = np.array(self.latencies) * 1000 if self.latencies else None
        st = {
            "uptime": round(now - self.started, 3),
            "packets": fs.packets,
            "packets_per_s": round((fs.packets - p_prev) / dt, 1),
            "flows": fs.flows,
            "flows_per_s": round((fs.flows - f_prev) / dt, 1),
            "flows_open": self.source.open_flows() if fanout else len(self.table),
            "classified": self.counters.classified,
            "drops": {
                "kernel": self.source.kernel_drops(),
                "capture_queue": self.counters.capture_queue_drops
                + (self.source.queue_drops() if fanout else 0),
                "flow_table_eviction": fs.evicted,
                "batch_queue": self.counters.batch_queue_drops,
                "log_write": sum(getattr(sink, "failed", 0) for sink in self.sinks),
            },
            "skipped": dict(fs.skipped),
            "queues": {"flows": self.flow_q.qsize(), "batches": self.batch_q.qsize(),
                       "events": self.event_q.qsize()},
            "latency_ms": {
                "p50": None if lat is None else round(float(np.percentile(lat, 50)), 2),
                "p99": None if lat is None else round(float(np.percentile(lat, 99)), 2),
            },
            "device": self.classifier.device if self.classifier else "none",
        }
        if fanout:
            st["drops"]["capture_process_loss"] = self.source.lost_flows
        if final:
            st["final"] = True
        return st

    def run(self, on_tick: Callable[[Pipeline], None] | None = None) -> Counters:
        """Run until the source ends or `stop` is set; returns the counters."""
        threads = [threading.Thread(target=self._capture, name="flagd-capture", daemon=True),
                   threading.Thread(target=self._batcher, name="flagd-batcher", daemon=True)]
        if self.classifier is not None:
            threads.append(threading.Thread(target=self._worker, name="flagd-worker", daemon=True))
        for t in threads:
            t.start()
        producers = len(threads) - 1  # batcher and worker each end the event stream once
        next_stats = time.monotonic() + self.s.stats_interval if self.s.stats_interval else None
        while producers:
            try:
                item = self.event_q.get(timeout=0.1)
            except queue.Empty:
                item = None
            if item is _DONE:
                producers -= 1
            elif item is not None:
                self._on_event(item)
            if self.reopen.is_set():
                self.reopen.clear()
                for sink in self.sinks:
                    sink.reopen()
            if next_stats is not None and time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.s.stats_interval
                self._emit(stats_event(time.time(), self.stats(), self.s.header.sensor))
            if on_tick is not None:
                on_tick(self)
        for t in threads:
            t.join()
        for fid, f in list(self._waiting.items()):  # cannot happen once all stages drained
            self._emit(flow_event(f, None, self.s.header, unclassified="shutdown"))
            del self._waiting[fid]
        self._emit(stats_event(time.time(), self.stats(final=True), self.s.header.sensor))
        self.source.close()
        return self.counters


class FileSource:
    """Frames from a capture file, as fast as possible or paced by the capture's own clock."""

    live = False

    def __init__(self, path: str, speed: float | None = None) -> None:
        from flagd.pcapfile import read_capture

        self.name = path
        self.speed = speed  # None = as fast as possible; 1.0 = real time; 2.0 = twice as fast
        # Paced replays read small batches so packets are released close to their time.
        self.capture = read_capture(path, batch_size=65536 if speed is None else 64)

    def batches(self, stop: threading.Event) -> Iterator[Frames]:
        t0 = wall0 = None
        for frames in self.capture:
            if stop.is_set():
                return
            if self.speed is not None and len(frames):
                if t0 is None:
                    t0, wall0 = float(frames.ts[0]), time.monotonic()
                due = wall0 + (float(frames.ts[-1]) - t0) / self.speed
                if stop.wait(max(0.0, due - time.monotonic())):
                    return
            yield frames

    def kernel_drops(self) -> int:
        return 0

    def problem(self) -> str:
        return self.capture.stats.problem

    def close(self) -> None:
        self.capture.close()


class LiveSource:
    """Frames from an open live capture; reports link changes without stopping."""

    live = True

    def __init__(self, capture, notice: Callable[[str], None] | None = None) -> None:
        from flagd.capture import LinkMonitor

        self.capture = capture
        self.name = capture.iface
        self.notice = notice or (lambda msg: None)
        try:
            self.links = LinkMonitor([capture.iface])
        except OSError:  # no netlink (unusual sandboxes): capture still works
            self.links = None

    def batches(self, stop: threading.Event) -> Iterator[Frames]:
        while not stop.is_set():
            yield self.capture.read(timeout=0.1)
            if self.links is not None:
                for ev in self.links.poll(0):
                    state = "removed" if ev.removed else ("up" if ev.up else f"down ({ev.operstate})")
                    self.notice(f"link {ev.name} is {state}")
                    if ev.removed:  # it cannot come back under this socket: stop, say why
                        raise OSError(f"interface {ev.name} was removed")
        yield self.capture.drain()  # the last packets, some still in the kernel's ring block

    def kernel_drops(self) -> int:
        return self.capture.stats().dropped

    def problem(self) -> str:
        return ""

    def close(self) -> None:
        if self.links is not None:
            self.links.close()
        self.capture.close()
