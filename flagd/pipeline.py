"""Threads and bounded queues: source -> flows -> batcher -> worker -> events -> sinks.

    capture thread   batches from the source: frames are decoded and fed to the flow table,
                     flow updates metered by the source (fanout) are handed on as they are
    batcher thread   tokenizes flows as they become ready (or end before that), batches them
    worker thread    runs the classifier on each batch
    main thread      turns flow ends and predictions into events, writes the sinks, emits
                     stats, renders the dashboard

Sources live in `flagd.source`; this module only wires them to the stages. `replay` and `run`
differ only in the source and in what a full queue does: a file source waits (nothing is lost),
a live source never blocks capture: a full queue drops and counts.

Shutdown runs in order: stop capture -> end all flows -> drain -> flush sinks -> join. Open
flows are still classified for `shutdown_grace` seconds after the stop; what is left then is
shed (flow event `unclassified: "shed"`, counted in `drops.shutdown_shed`), and flows the stop
ends after the grace are only counted (`drops.shutdown_unlogged`), so a stop with 262,144 open
flows ends in seconds. Every stage's loop ends in a `finally` that tells the next
stage it is done: a stage that raises stops the whole pipeline with its error
(`Counters.stage_error`) and never leaves another stage waiting.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from flagd.events import EventHeader, classification_event, flow_event, stats_event
from flagd.flows import END, READY, Flow, FlowSettings, FlowTable, FlowUpdate
from flagd.packets import decode
from flagd.sinks import Sink
from flagd.source import FlowBatch, MeterSnapshot, Source

if TYPE_CHECKING:  # only in annotations: the pipeline itself never needs torch's module
    from flagd.infer import Prediction


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
    # Seconds after a stop during which ending flows are still classified; after that they are
    # shed. A replay stopped with 262,144 open flows took minutes to classify them all.
    shutdown_grace: float = 3.0
    # A stop with more open flows than this counts them (drops.shutdown_unlogged) instead of
    # ending each: 262,144 flows took 20 s to end and log on a loaded 2-core machine.
    shutdown_flush_limit: int = 20_000


@dataclass(slots=True)
class Counters:
    capture_queue_drops: int = 0  # flow updates lost because the batcher fell behind
    batch_queue_drops: int = 0  # flows shed because the worker fell behind
    shutdown_shed: int = 0  # flows not classified because the shutdown grace ran out
    shutdown_unlogged: int = 0  # flows ended after the grace (or a failure): counted, no flow event
    classified: int = 0
    batches: int = 0
    capture_error: str | None = None  # the source failed: capture ended early, cleanly
    stage_error: str | None = None  # a stage raised: "worker: ValueError: ..."; the run stopped


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
        self._failed = threading.Event()  # a stage raised: blocking puts give up
        self._deadline: float | None = None  # monotonic time from which open flows are shed
        self._meter: MeterSnapshot | None = None  # the source's own metering (fanout), if any
        self._kernel_drops = 0  # last value read from the source
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

    # --- helpers shared by the stages ---------------------------------------------------------
    def _fail(self, stage: str, e: BaseException) -> None:
        """A stage raised: remember the first error and stop everything."""
        if self.counters.stage_error is None:
            self.counters.stage_error = f"{stage}: {type(e).__name__}: {e}"
        self._failed.set()
        self.stop.set()

    def _put(self, q: queue.Queue, item: object) -> bool:
        """A blocking put that gives up (False) once a stage has failed: the stage that would
        take the item may be gone, and waiting for it would freeze the pipeline."""
        while True:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self._failed.is_set():
                    return False

    def _shedding(self) -> bool:
        """Whether flows are shed instead of classified: a stage failed, or the grace is over."""
        if self._failed.is_set():
            return True
        return self._deadline is not None and time.monotonic() >= self._deadline

    # --- capture thread -------------------------------------------------------------------
    def _capture(self) -> None:
        table, tick, live = self.table, self.s.tick_interval, self.source.live
        next_tick = time.monotonic() + tick
        try:
            try:
                for batch in self.source.batches(self.stop):
                    if isinstance(batch, FlowBatch):  # metered by the source (capture processes)
                        if batch.meter is not None:
                            self._meter = batch.meter
                        self._hand_on(batch.updates)
                        continue
                    if len(batch):
                        self._hand_on(table.add(decode(batch)))
                    if live and time.monotonic() >= next_tick:
                        next_tick = time.monotonic() + tick
                        self._hand_on(table.tick(time.time()))
            except Exception as e:  # a source failure ends the run cleanly, with its reason
                self.counters.capture_error = f"{type(e).__name__}: {e}"
            # Capture has stopped: the last flows may wait for the batcher, never be dropped
            # (dropping them lost 54,082 of 600,220 flow events at the end of a live soak).
            # After a failed stage they stay in the table (flows_open of the final stats):
            # writing an event for each would hold the failing daemon up for seconds.
            if self._failed.is_set():
                pass
            elif self.stop.is_set() and len(table) > self.s.shutdown_flush_limit:
                # Stopped with a full table (a flood): ending each flow in Python and writing
                # its event takes far longer than the grace; count them instead.
                self.counters.shutdown_unlogged += len(table)
            else:
                self._hand_on(table.flush(), wait=True, final=True)
        except BaseException as e:
            self._fail("capture", e)
        finally:
            self._put(self.flow_q, _DONE)

    def _hand_on(self, updates: list[FlowUpdate], wait: bool = False, final: bool = False) -> None:
        """Updates to the batcher. `final`: the flush at the end, which stops once the shutdown
        grace is over; the flows not handed on then are counted, without a flow event each."""
        # In chunks, so flow_q is bounded in flows: one 65536-frame file batch can end 65536.
        for i in range(0, len(updates), _CHUNK):
            if final and self._shedding():
                self.counters.shutdown_unlogged += len(updates) - i
                return
            part = updates[i:i + _CHUNK]
            if self.lossless or wait:
                if not self._put(self.flow_q, part):
                    return  # the batcher is gone (failed): nothing downstream takes them
                continue
            try:
                self.flow_q.put_nowait(part)
            except queue.Full:
                self.counters.capture_queue_drops += len(part)
                for kind, f in part:
                    if kind == READY:
                        # Its READY never reaches the batcher: unmark it, so that the flow is
                        # classified at its end instead (once: the end sees ready=False).
                        f.ready = False

    # --- batcher thread -------------------------------------------------------------------
    def _batcher(self) -> None:
        pending: list[Flow] = []
        oldest = 0.0
        delay, size = self.s.batch_delay, self.s.batch_size
        classify = self.classifier is not None
        try:
            while True:
                timeout = max(0.0, oldest + delay - time.monotonic()) if pending else 0.1
                try:
                    item = self.flow_q.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is _DONE:
                    break
                if item and self._shedding():
                    # The grace is over (or a stage failed): what still comes is only counted,
                    # so that the events already queued are the last ones to write.
                    self.counters.shutdown_unlogged += sum(kind == END for kind, _ in item)
                    item = None
                for kind, f in item or ():
                    # A flow is classified once: at READY, or at its end when it never became
                    # ready (fewer than K relevant packets, or its READY was lost to a full
                    # queue, which unmarks it). The flow itself says which: no set to forget.
                    if classify and (kind == READY or (not f.ready and f.relevant)):
                        if not pending:
                            oldest = time.monotonic()
                        self._ready_at[f.flow_id] = time.monotonic()
                        pending.append(f)
                    if kind == END:
                        self.event_q.put((END, f))
                if pending and (len(pending) >= size or time.monotonic() - oldest >= delay
                                or self._shedding()):
                    self._send(pending)
                    pending = []
            if pending:
                self._send(pending)
                pending = []
        except BaseException as e:
            self._fail("batcher", e)
            self.counters.shutdown_shed += len(pending)
            self._shed_flows(pending)  # taken, never sent: their flow events say shed
        finally:
            if classify:
                self._put(self.batch_q, _DONE)
            self.event_q.put(_DONE)

    def _shed_flows(self, flows: list[Flow]) -> None:
        for f in flows:
            self.event_q.put((_SHED, f))

    def _send(self, flows: list[Flow]) -> None:
        if self._shedding():
            self.counters.shutdown_shed += len(flows)
            self._shed_flows(flows)
            return
        ids = self.classifier.encode(flows)
        if self.lossless:
            if not self._put(self.batch_q, (flows, ids)):  # the worker failed
                self.counters.shutdown_shed += len(flows)
                self._shed_flows(flows)
            return
        try:
            self.batch_q.put_nowait((flows, ids))
        except queue.Full:
            self.counters.batch_queue_drops += len(flows)
            self._shed_flows(flows)

    # --- worker thread --------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            import torch

            with torch.inference_mode():
                while (item := self.batch_q.get()) is not _DONE:
                    flows, ids = item
                    if self._shedding():
                        self.counters.shutdown_shed += len(flows)
                        self._shed_flows(flows)
                        continue
                    preds = self.classifier.predict(ids, [len(f.packets) for f in flows])
                    self.counters.batches += 1
                    for f, p in zip(flows, preds, strict=True):
                        self.event_q.put(("pred", f, p))
        except BaseException as e:
            self._fail("worker", e)
        finally:
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
            elif f.ready and fid not in self._ready_at:
                # Its READY was handed on but never reached the batcher: the capture processes
                # (fanout) dropped it. Not classified, and said so, never classified twice.
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

    def _source_kernel_drops(self) -> int:
        try:
            self._kernel_drops = self.source.kernel_drops()
        except Exception:  # noqa: BLE001 - a closing source: keep the last value we read
            pass
        return self._kernel_drops

    def stats(self, final: bool = False) -> dict:
        """A snapshot of the counters; safe from any thread, also while capture shuts down."""
        now = time.monotonic()
        meter = self._meter
        if meter is not None:  # the source meters flows (capture processes)
            fs, open_flows, kernel, source_qd = meter.flows, meter.open, meter.kernel_drops, meter.queue_drops
        else:
            fs, open_flows, source_qd = self.table.stats, len(self.table), 0
            kernel = self._source_kernel_drops()
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
            "packets_per_s": round(max(0, fs.packets - p_prev) / dt, 1),
            "flows": fs.flows,
            "flows_per_s": round(max(0, fs.flows - f_prev) / dt, 1),
            "flows_open": open_flows,
            "classified": self.counters.classified,
            "drops": {
                "kernel": kernel,
                "capture_queue": self.counters.capture_queue_drops + source_qd,
                "flow_table_eviction": fs.evicted,
                "flow_table_eviction_empty": fs.evicted_empty,  # of those: no relevant packet
                "batch_queue": self.counters.batch_queue_drops,
                "shutdown_shed": self.counters.shutdown_shed,
                "shutdown_unlogged": self.counters.shutdown_unlogged,
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
        if meter is not None:
            st["drops"]["capture_process_loss"] = meter.process_loss
        if final:
            st["final"] = True
            error = self.counters.stage_error or self.counters.capture_error
            if error:
                st["error"] = error
        return st

    def run(self, on_tick: Callable[[Pipeline], None] | None = None) -> Counters:
        """Run until the source ends, `stop` is set or a stage fails; returns the counters.

        Always ends with a final stats event, whatever failed on the way."""
        threads = [threading.Thread(target=self._capture, name="flagd-capture", daemon=True),
                   threading.Thread(target=self._batcher, name="flagd-batcher", daemon=True)]
        if self.classifier is not None:
            threads.append(threading.Thread(target=self._worker, name="flagd-worker", daemon=True))
        for t in threads:
            t.start()
        producers = len(threads) - 1  # batcher and worker each end the event stream once
        next_stats = time.monotonic() + self.s.stats_interval if self.s.stats_interval else None
        writing = True  # False once a sink or the dashboard raised: drain, write nothing more
        while producers:
            try:
                item = self.event_q.get(timeout=0.1)
            except queue.Empty:
                item = None
            if item is _DONE:
                producers -= 1
                continue
            if self.stop.is_set() and self._deadline is None:
                self._deadline = time.monotonic() + self.s.shutdown_grace
            if not writing:
                continue
            try:
                if item is not None:
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
            except Exception as e:  # the stages must still end: keep taking their events
                self._fail("events", e)
                writing = False
        for t in threads:
            t.join()
        try:
            for fid, f in list(self._waiting.items()):  # only after a failed stage
                self._emit(flow_event(f, None, self.s.header, unclassified="shutdown"))
                del self._waiting[fid]
            self._emit(stats_event(time.time(), self.stats(final=True), self.s.header.sensor))
        finally:
            self.source.close()
        return self.counters
