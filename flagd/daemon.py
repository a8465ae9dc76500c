"""Running the pipeline as a program: settings from a config file, signals, sinks, dashboard.

`flagd run` and `flagd replay` both end up in `serve`; they differ only in the source.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
import tomllib
from collections import deque
from dataclasses import dataclass, fields, replace
from pathlib import Path

from flagd.events import Anonymizer, EventHeader
from flagd.flows import FlowSettings
from flagd.pipeline import Classifier, Pipeline, PipelineSettings
from flagd.sinks import JsonlSink, RecentEvents
from flagd.source import Source

DEFAULT_CONFIG = Path("/etc/flagd/flagd.toml")


@dataclass
class RunConfig:
    """Every key of flagd.toml (documented in README.md); command-line options override them."""

    iface: str | None = None
    bpf: str | None = None
    promisc: bool = False
    model: str | None = None  # model bundle directory; None = the shipped default
    log: str = "-"  # JSONL path, "-" = stdout
    user: str | None = None  # drop to this user after the capture socket is open
    workers: int = 1  # capture processes in one AF_PACKET fanout group
    dashboard: bool | None = None  # None = when stdout is a terminal and the log is a file
    batch_size: int = 64
    batch_delay_ms: float = 20.0
    stats_interval: float = 10.0
    idle_timeout: float = 120.0
    established_timeout: float = 600.0
    active_timeout: float = 1800.0
    max_flows: int = 262_144
    top_k: int = 3
    reject: bool = True  # open-set rejection: flows unlike the model's data are "unknown"
    min_confidence: float = 0.0  # also "unknown" below this calibrated top-1 probability
    sensor: str | None = None  # None = this host's name
    anonymize: bool = False
    anonymize_key: str | None = None  # required with anonymize: the HMAC key for pseudonyms
    community_id_seed: int = 0  # Community ID v1 seed; must match Suricata's/Zeek's to join on it

    @classmethod
    def load(cls, path: Path | None, **overrides) -> RunConfig:
        cfg = cls()
        if path is not None:
            try:
                data = tomllib.loads(path.read_text())
            except OSError as e:
                raise ValueError(f"{path}: {e.strerror}") from None
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from None
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}")
            cfg = replace(cfg, **data)
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    def pipeline_settings(self, flows: FlowSettings) -> PipelineSettings:
        if self.anonymize and not self.anonymize_key:
            raise ValueError("anonymize needs anonymize_key in the config file")
        header = EventHeader(
            sensor=self.sensor or socket.gethostname(),
            anonymize=Anonymizer(self.anonymize_key.encode()) if self.anonymize else None,
            community_id_seed=self.community_id_seed,
        )
        flows = replace(flows, idle_timeout=self.idle_timeout, active_timeout=self.active_timeout,
                        established_timeout=self.established_timeout,
                        max_flows=self.max_flows)
        return PipelineSettings(flows=flows, batch_size=self.batch_size,
                                batch_delay=self.batch_delay_ms / 1000, header=header,
                                stats_interval=self.stats_interval)


_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def steady_malloc() -> None:
    """Pin glibc's mmap threshold at its initial 128 KiB, so the heap does not creep under churn.

    glibc raises the threshold each time a large mmapped block is freed (up to 32 MiB); from then
    on large blocks (the flow table's hash tables, batch arrays) come from the heap, and their
    churn fragments it. In a 10-minute live soak at 1,000 new flows/s the main arena's free space
    grew from 10 to 64 MiB while the bytes in use stayed flat: RSS +1 MiB/min. With the
    threshold pinned, large blocks stay mmapped and go back to the OS when freed: the same soak
    is flat and about 50 MiB smaller. Not glibc (musl): nothing to do.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


class Notices:
    """Operator notices (link changes, skipped captures, restarted capture processes): each is
    printed on stderr at once and the latest are kept for the dashboard. Sources get this
    callback when they are built."""

    def __init__(self, keep: int = 50) -> None:
        self.recent: deque[str] = deque(maxlen=keep)

    def __call__(self, msg: str) -> None:
        self.recent.append(f"{time.strftime('%H:%M:%S')} {msg}")
        print(f"flagd: {msg}", file=sys.stderr, flush=True)


def serve(source: Source, classifier: Classifier | None, cfg: RunConfig,
          settings: PipelineSettings, notices: Notices | None = None,
          user: str | None = None) -> Pipeline:
    """Run the pipeline to its end (source exhausted, SIGINT/SIGTERM, or a failed stage).

    A first SIGINT/SIGTERM stops capture and shuts down in order; a second one exits at once.
    """
    from flagd.privileges import drop_privileges

    notices = notices or Notices()
    pipe = Pipeline(source, classifier, [], settings)
    # Signals first: logrotate may send SIGHUP the moment the log exists.
    old = _install_signals(pipe)
    try:
        log = JsonlSink(cfg.log)
    except OSError:
        _restore_signals(old)
        raise
    recent = RecentEvents()
    pipe.sinks += [log, recent]
    dashboard = cfg.dashboard if cfg.dashboard is not None else (sys.stdout.isatty() and cfg.log != "-")
    try:
        if user:
            # Everything imported later must be importable by `user`: the interpreter may live
            # in a directory only root can read (e.g. under /root), so import it all now.
            import numpy.ma  # noqa: F401  (numpy imports it lazily, e.g. for percentiles)
            import rich.live  # noqa: F401

            import flagd.dashboard  # noqa: F401
            # The socket and the log are open: nothing else needs root. From root, setuid
            # takes every capability from every thread (glibc applies it to all of them).
            drop_privileges(user)
        if dashboard:
            _with_dashboard(pipe, source, classifier, recent, notices)
        else:
            pipe.run()
    finally:
        _restore_signals(old)
        log.close()
    return pipe


def _restore_signals(old: dict) -> None:
    for sig, handler in old.items():
        # A rotation racing our exit must not kill us with SIGHUP's default action.
        signal.signal(sig, signal.SIG_IGN if sig == signal.SIGHUP else handler)


def _install_signals(pipe: Pipeline) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    stopping = []

    def stop(signum, frame):
        if stopping:
            # The operator asked twice: do not wait for the orderly shutdown. Every event line
            # went out in one write(), so the log holds whole lines only.
            os.write(2, b"flagd: second signal: exiting now, without the final stats\n")
            os._exit(128 + signum)
        stopping.append(signum)
        pipe.stop.set()

    def hup(signum, frame):
        pipe.reopen.set()

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, hup)
    return old


def _with_dashboard(pipe: Pipeline, source: Source, classifier, recent: RecentEvents,
                    notices: Notices) -> None:
    from rich.live import Live

    from flagd.dashboard import Snapshot, render

    model = classifier.name if classifier else "none"
    last = [0.0]

    def snapshot() -> Snapshot:
        return Snapshot(source.name, model, pipe.stats(), dict(recent.classes),
                        list(recent.recent), list(notices.recent))

    with Live(render(snapshot()), refresh_per_second=4, screen=False) as live:
        def tick(p: Pipeline) -> None:
            if time.monotonic() - last[0] >= 0.5:
                last[0] = time.monotonic()
                live.update(render(snapshot()))

        pipe.run(on_tick=tick)
        live.update(render(snapshot()))

