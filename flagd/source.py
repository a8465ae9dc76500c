"""Sources: what feeds the pipeline, behind one protocol, whether files, a socket or processes.

A `Source` yields batches until it ends or the pipeline's stop event is set. A batch is one of
two types, and the pipeline tells them apart by type alone:

- `Frames`: raw frames; the pipeline decodes them and meters flows itself (`FileSource`,
  `LiveSource`).
- `FlowBatch`: flow updates already metered elsewhere, plus the metering side's counters
  (`FanoutSource`: N capture processes, each with a flow table of its own).

A live source also yields empty batches while the link is quiet, so the pipeline can tick its
clock; a file source never waits. Everything a source needs (pacing, a notice callback for link
changes and unreadable files, a socket opener) is given to it at construction.

This module and `flagd.capture` are the only code that opens capture handles; the pcap/pcapng
reader itself is `flagd.pcapfile`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flagd.flows import FlowSettings, FlowStats, FlowUpdate
from flagd.frames import Frames
from flagd.packets import DecodeError

CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")  # what a directory given to replay contributes

Notice = Callable[[str], None]


def _quiet(msg: str) -> None:
    """The notice callback of a source nobody listens to."""


@dataclass(frozen=True, slots=True)
class MeterSnapshot:
    """Counters of flow metering done outside the pipeline (the fanout capture processes)."""

    flows: FlowStats
    open: int  # flows open in the capture processes' tables
    kernel_drops: int
    queue_drops: int  # flow updates the capture processes dropped because the pipeline lagged
    process_loss: int  # open flows of capture processes that died


@dataclass(slots=True)
class FlowBatch:
    """Flow updates metered by the source; `meter` is set when its counters changed."""

    updates: list[FlowUpdate]
    meter: MeterSnapshot | None = None


Batch = Frames | FlowBatch


class Source(Protocol):
    """Where the pipeline's input comes from. `live` sources are never waited for (a full queue
    drops and counts); others are (nothing is lost). `kernel_drops` may be called from any
    thread, also while the source closes."""

    name: str
    live: bool

    def batches(self, stop: threading.Event) -> Iterator[Batch]: ...
    def kernel_drops(self) -> int: ...
    def close(self) -> None: ...


# -- files ------------------------------------------------------------------------------------


def expand_captures(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, each directory replaced by its captures (.pcap/.pcapng/.cap) in name order.

    A directory is read one level deep, like `suricata -r DIR`; a name that does not exist is
    kept, so that reading it fails with its reason like any other unreadable file.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(c for c in p.iterdir()
                          if c.suffix.lower() in CAPTURE_SUFFIXES and not c.is_dir())
        else:
            out.append(p)
    return out


@dataclass(slots=True)
class ReplayReport:
    """What a file source read: captures replayed, those that failed (with why), warnings."""

    read: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "path: reason", one line each
    warnings: list[str] = field(default_factory=list)  # read, but cut short or corrupt inside


class FileSource:
    """Frames from capture files, one after the other, as fast as possible or paced.

    A file that cannot be read is reported (notice) and skipped: the others still replay, and
    `report` lists it. One flow table spans all files, as one long capture would.
    """

    live = False

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 speed: float | None = None, notice: Notice = _quiet) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = expand_captures(paths)
        self.name = str(self.paths[0]) if len(self.paths) == 1 else f"{len(self.paths)} captures"
        self.speed = speed  # None = as fast as possible; 1.0 = real time; 2.0 = twice as fast
        self.notice = notice
        self.report = ReplayReport()
        self._open = None  # the capture being read, so close() can stop it from another thread

    def batches(self, stop: threading.Event) -> Iterator[Frames]:
        from flagd.pcapfile import read_capture

        # Paced replays read small batches so packets are released close to their time; fast
        # ones 8192 frames at a time, so that a stop is seen within a batch's metering.
        size = 8192 if self.speed is None else 64
        for path in self.paths:
            if stop.is_set():
                return
            try:
                cap = read_capture(path, batch_size=size)
            except DecodeError as e:  # names the file and the reason already
                self.report.failed.append(str(e))
                self.notice(f"skipped {e}")
                continue
            self._open = cap
            try:
                yield from self._paced(cap, stop)
            finally:
                cap.close()
                self._open = None
            self.report.read.append(str(path))
            if cap.stats.problem:
                self.report.warnings.append(cap.stats.problem)
                self.notice(f"warning: {cap.stats.problem}")

    def _paced(self, cap, stop: threading.Event) -> Iterator[Frames]:
        t0 = wall0 = None
        for frames in cap:
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

    def close(self) -> None:
        # Each capture is closed when its batches end (the generator's finally); this covers a
        # reader abandoned mid-file, e.g. when the flow table raised.
        cap, self._open = self._open, None
        if cap is not None:
            cap.close()


# -- a live interface -------------------------------------------------------------------------


class LiveSource:
    """Frames from an open live capture; reports link changes (notice) without stopping."""

    live = True

    def __init__(self, capture, notice: Notice = _quiet) -> None:
        from flagd.capture import LinkMonitor

        self.capture = capture
        self.name = capture.iface
        self.notice = notice
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
        return self.capture.stats().dropped  # LiveCapture.stats is safe against a racing close

    def close(self) -> None:
        if self.links is not None:
            self.links.close()
        self.capture.close()


# -- fanout: N capture processes --------------------------------------------------------------


class FanoutSource:
    """Flow updates from N capture processes in one AF_PACKET fanout group (`flagd.fanout`).

    The processes meter flows themselves, so this source yields `FlowBatch`es. A process that
    dies is restarted by the capture helper (`flagd.helper`), which keeps the privilege to
    open its socket after the daemon dropped its own; `helper` is the daemon's (None: the
    group starts one of its own).
    """

    live = True

    def __init__(self, iface: str, workers: int, flows: FlowSettings, *, bpf: str | None = None,
                 promisc: bool = False, user: str | None = None, notice: Notice = _quiet,
                 helper=None) -> None:
        from flagd.fanout import CaptureGroup

        self.name = f"{iface} x{workers}"
        self.group = CaptureGroup(iface, workers, flows, bpf=bpf, promisc=promisc, user=user,
                                  notice=notice, helper=helper)

    def batches(self, stop: threading.Event) -> Iterator[FlowBatch]:
        for updates, changed in self.group.updates(stop):
            yield FlowBatch(updates, self.group.snapshot() if changed else None)
        yield FlowBatch([], self.group.snapshot())  # the final counters

    def kernel_drops(self) -> int:
        return self.group.snapshot().kernel_drops

    def close(self) -> None:
        self.group.close()
