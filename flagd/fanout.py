"""Capture on every core: N processes in one AF_PACKET fanout group, one flow table each.

The kernel hashes each packet's flow symmetrically and hands it to one socket of the group, so
every capture process sees whole flows (both directions) and owns its own flow table. The
processes send flow updates (ready / ended flows) to the main process over one bounded
multiprocessing queue; the main process runs the usual batcher, inference worker and sinks,
so `FanoutSource` is a drop-in pipeline source that delivers flows instead of frames.

A process that dies is restarted and its open flows are counted as lost. Capture processes are
forked: they only need numpy and the flow code, and a fork inherits the main process's
privileges (CAP_NET_RAW) so a restart can reopen the socket. With `--user` the main process
gives its privileges up, and a restart then fails and is reported instead.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from flagd.capture import CaptureError, open_capture
from flagd.flows import Expiry, FlowSettings, FlowStats, FlowTable, FlowUpdate
from flagd.packets import decode
from flagd.privileges import PrivilegeError, drop_privileges

STATS_EVERY = 1.0  # seconds between a capture process's stats messages


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    iface: str
    bpf: str | None
    promisc: bool
    group: int
    flows: FlowSettings
    user: str | None


@dataclass(slots=True)
class WorkerState:
    process: mp.Process | None = None
    stats: dict = field(default_factory=dict)  # last stats message
    done: bool = False
    restarts: int = 0


def _capture_process(index: int, spec: WorkerSpec, out: mp.Queue, stop: mp.Event) -> None:
    """One capture process: socket -> decode -> flow table -> updates to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parent = os.getppid()
    try:
        cap = open_capture(spec.iface, bpf=spec.bpf, promisc=spec.promisc, fanout=spec.group)
        if spec.user:
            drop_privileges(spec.user)
    except (CaptureError, PrivilegeError, OSError) as e:
        out.put(("error", index, str(e)))
        return
    out.put(("ready", index, None))
    table = FlowTable(spec.flows)
    lost = 0  # flow updates dropped because the main process fell behind
    next_stats = next_tick = time.monotonic()

    def send(updates: list[FlowUpdate], block: bool = False) -> None:
        """Hand updates on; drop (counted) when the main process lags, except at the end."""
        nonlocal lost
        if not updates:
            return
        while True:
            try:
                out.put(("updates", index, updates), block=block, timeout=1 if block else None)
                return
            except queue.Full:
                if not block or os.getppid() != parent:
                    lost += len(updates)
                    return

    def stats(final: bool = False) -> dict:
        c = cap.stats()
        return {"flows": table.stats, "open": len(table), "kernel_drops": c.dropped,
                "queue_drops": lost, "final": final}

    while not stop.is_set():
        if os.getppid() != parent:  # the main process is gone: nobody reads our updates
            cap.close()
            return
        frames = cap.read(0.1)
        if len(frames):
            send(table.add(decode(frames)))
        now = time.monotonic()
        if now >= next_tick:
            next_tick = now + 1.0
            send(table.tick(time.time()))
        if now >= next_stats:
            next_stats = now + STATS_EVERY
            try:
                out.put_nowait(("stats", index, stats()))
            except queue.Full:
                pass
    send(table.add(decode(cap.drain())))  # the last packets, some still in the ring block
    send(table.flush(Expiry.SHUTDOWN), block=True)
    final = stats(final=True)
    out.put(("done", index, final))


class FanoutSource:
    """A pipeline source that delivers flow updates from N capture processes."""

    live = True

    def __init__(self, iface: str, workers: int, flows: FlowSettings, *, bpf: str | None = None,
                 promisc: bool = False, user: str | None = None, queue_size: int = 1024,
                 notice: Callable[[str], None] | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.name = f"{iface} x{workers}"
        self.notice = notice or (lambda msg: None)
        self._ctx = mp.get_context("fork")
        self._out = self._ctx.Queue(queue_size)
        self._stop = self._ctx.Event()
        # A group id of our own: other programs' fanout groups on the interface stay separate.
        self._spec = WorkerSpec(iface, bpf, promisc, os.getpid() & 0xFFFF, flows, user)
        self.workers = [WorkerState() for _ in range(workers)]
        self.lost_flows = 0  # open flows of capture processes that died
        self._dead = FlowStats()  # what processes that died had counted
        self._dead_drops = [0, 0]  # their kernel and queue drops
        self._lock = threading.Lock()
        for i in range(workers):
            self._start(i)
        ready = 0
        deadline = time.monotonic() + 30
        while ready < workers:  # every socket is open (or we say why not) before we return
            try:
                kind, i, msg = self._out.get(timeout=0.2)
            except queue.Empty:
                dead = [w.process.exitcode for w in self.workers if w.process.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise CaptureError(f"capture processes on {iface} did not start"
                                       + (f" (exit codes {dead})" if dead else "")) from None
                continue
            if kind == "error":
                self.close()
                raise CaptureError(msg)
            ready += kind == "ready"

    def _start(self, i: int) -> None:
        p = self._ctx.Process(target=_capture_process, args=(i, self._spec, self._out, self._stop),
                              name=f"flagd-capture-{i}", daemon=True)
        p.start()
        self.workers[i].process = p

    def _check_workers(self) -> None:
        """Restart capture processes that died without being asked to stop."""
        if self._stop.is_set():
            return
        for i, w in enumerate(self.workers):
            if w.process is not None and not w.done and w.process.exitcode is not None:
                with self._lock:
                    self.lost_flows += w.stats.get("open", 0)
                    if "flows" in w.stats:
                        _add(self._dead, w.stats["flows"])
                        self._dead_drops[0] += w.stats["kernel_drops"]
                        self._dead_drops[1] += w.stats["queue_drops"]
                    w.stats = {}
                    w.restarts += 1
                self.notice(f"capture process {i} died (exit {w.process.exitcode}); restarting it")
                self._start(i)

    def flow_updates(self, stop: threading.Event) -> Iterator[list[FlowUpdate]]:
        while True:
            if stop.is_set() and not self._stop.is_set():
                self._stop.set()  # each process flushes its flows and says "done"
            try:
                kind, i, msg = self._out.get(timeout=0.1)
            except queue.Empty:
                self._check_workers()
                if self._stop.is_set() and all(
                        w.done or w.process is None or w.process.exitcode is not None
                        for w in self.workers):
                    return
                continue
            w = self.workers[i]
            if kind == "updates":
                yield msg
            elif kind == "stats":
                with self._lock:
                    w.stats = msg
            elif kind == "done":
                with self._lock:
                    w.stats, w.done = msg, True
                if all(x.done for x in self.workers):
                    return
            elif kind == "error":  # a restart could not reopen the socket
                self.notice(f"capture process {i}: {msg}")
                w.done = True
            elif kind == "ready" and w.restarts:
                self.notice(f"capture process {i} is capturing again")

    def batches(self, stop: threading.Event) -> Iterator:
        raise TypeError("FanoutSource delivers flows: use flow_updates()")

    def flow_stats(self) -> FlowStats:
        total = FlowStats()
        with self._lock:
            _add(total, self._dead)
            for w in self.workers:
                if "flows" in w.stats:
                    _add(total, w.stats["flows"])
        return total

    def open_flows(self) -> int:
        with self._lock:
            return sum(w.stats.get("open", 0) for w in self.workers)

    def kernel_drops(self) -> int:
        with self._lock:
            return self._dead_drops[0] + sum(w.stats.get("kernel_drops", 0) for w in self.workers)

    def queue_drops(self) -> int:
        with self._lock:
            return self._dead_drops[1] + sum(w.stats.get("queue_drops", 0) for w in self.workers)

    def problem(self) -> str:
        return ""

    def close(self) -> None:
        self._stop.set()
        for w in self.workers:
            if w.process is not None:
                w.process.join(timeout=5)
                if w.process.exitcode is None:
                    w.process.kill()
                    w.process.join()


def _add(total: FlowStats, s: FlowStats) -> None:
    total.packets += s.packets
    total.bytes += s.bytes
    total.flows += s.flows
    total.ready += s.ready
    for k, v in s.skipped.items():
        total.skipped[k] = total.skipped.get(k, 0) + v
    for k, v in s.ended.items():
        total.ended[k] = total.ended.get(k, 0) + v
