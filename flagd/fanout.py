"""Capture on every core: N processes in one AF_PACKET fanout group, one flow table each.

The kernel hashes each packet's flow symmetrically and hands it to one socket of the group, so
every capture process sees whole flows (both directions) and owns its own flow table. Each
process sends its flow updates (ready / ended flows) and counters to the main process over a
socketpair of its own (SOCK_SEQPACKET: one message per send, never a torn one); when the main
process lags, a send that would block is dropped and counted instead. The main process runs
the usual batcher, inference worker and sinks: `flagd.source.FanoutSource` wraps this group.

Capture processes are forked by the capture helper (`flagd.helper`), never by the daemon
itself: the helper has no threads, so a fork cannot inherit a lock held by one of torch's, and
it keeps CAP_NET_RAW, so a process that dies is restarted (its open flows counted as lost)
also after the daemon dropped to `--user`. Each process opens its socket, then becomes that
user with no capability.
"""

from __future__ import annotations

import os
import pickle
import pwd
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from flagd.capture import CaptureError, open_capture
from flagd.flows import READY, Expiry, FlowSettings, FlowStats, FlowTable, FlowUpdate
from flagd.helper import Helper, HelperError
from flagd.packets import decode
from flagd.privileges import PrivilegeError, drop_privileges
from flagd.source import MeterSnapshot

STATS_EVERY = 1.0  # seconds between a capture process's stats messages
_MAX_MSG = 96 * 1024  # bytes per message: well inside a unix socket's send buffer
_RECV = 1 << 18
_CHUNK = 64  # flow updates per message at most


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    iface: str
    bpf: str | None
    promisc: bool
    group: int
    flows: FlowSettings
    user: str | None

    def to_dict(self) -> dict:
        """Plain JSON types: the spec crosses to the privileged helper, which takes no pickle."""
        return {"iface": self.iface, "bpf": self.bpf, "promisc": self.promisc,
                "group": self.group, "flows": self.flows.to_dict(), "user": self.user}

    @classmethod
    def from_dict(cls, d: dict) -> WorkerSpec:
        return cls(str(d["iface"]), None if d["bpf"] is None else str(d["bpf"]),
                   bool(d["promisc"]), int(d["group"]), FlowSettings.from_dict(d["flows"]),
                   None if d["user"] is None else str(d["user"]))


@dataclass(slots=True)
class WorkerState:
    chan: socket.socket | None = None
    pid: int = 0
    stats: dict = field(default_factory=dict)  # last stats message
    ready: bool = False
    done: bool = False
    restarts: int = 0


# -- the capture process -------------------------------------------------------------------------


def _messages(kind: str, updates: list[FlowUpdate]) -> Iterator[tuple[bytes, list[FlowUpdate]]]:
    """Pickled messages of at most _MAX_MSG bytes (a part too big is split in halves)."""
    for i in range(0, len(updates), _CHUNK):
        todo = [updates[i:i + _CHUNK]]
        while todo:
            part = todo.pop()
            data = pickle.dumps((kind, part), protocol=5)
            if len(data) > _MAX_MSG and len(part) > 1:
                todo += [part[len(part) // 2:], part[:len(part) // 2]]
            else:
                yield data, part


def capture_main(index: int, spec: WorkerSpec, chan: socket.socket) -> None:
    """One capture process: socket -> decode -> flow table -> updates to the main process."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the main process decides when to stop

    def put(msg: object) -> None:
        chan.sendall(pickle.dumps(msg, protocol=5))

    try:
        cap = open_capture(spec.iface, bpf=spec.bpf, promisc=spec.promisc, fanout=spec.group)
        # The socket is open: nothing else needs privilege. Without --user, still give up any
        # capability (systemd's ambient CAP_NET_RAW) by "becoming" the user we already are.
        drop_privileges(spec.user or pwd.getpwuid(os.getuid()).pw_name)
    except (CaptureError, PrivilegeError, OSError) as e:
        put(("error", str(e)))
        return
    put(("ready", None))
    table = FlowTable(spec.flows)
    lost = 0  # flow updates dropped because the main process fell behind

    def send(updates: list[FlowUpdate], final: bool = False) -> None:
        """Hand updates on; drop (counted) when the main process lags, except at the end."""
        nonlocal lost
        for data, part in _messages("updates", updates):
            try:
                if final:
                    chan.sendall(data)
                else:
                    chan.send(data, socket.MSG_DONTWAIT)
                continue
            except BlockingIOError:
                pass
            except OSError:  # the main process is gone
                pass
            lost += len(part)
            for kind, f in part:
                if kind == READY:
                    f.ready = False  # classified at its end instead (once)

    def stats(final: bool = False) -> dict:
        c = cap.stats()
        return {"flows": table.stats, "open": len(table), "kernel_drops": c.dropped,
                "queue_drops": lost, "final": final}

    next_stats = next_tick = time.monotonic()
    while True:
        if select.select([chan], [], [], 0)[0]:
            msg = chan.recv(64)
            if not msg:  # the main process is gone: nobody reads our updates
                cap.close()
                return
            if msg == b"stop":
                break
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
                chan.send(pickle.dumps(("stats", stats()), protocol=5), socket.MSG_DONTWAIT)
            except OSError:
                pass
    chan.settimeout(10)  # the end may wait for the main process, not forever
    try:
        send(table.add(decode(cap.drain())), final=True)  # the last packets of the ring
        send(table.flush(Expiry.SHUTDOWN), final=True)
        put(("done", stats(final=True)))
    except OSError:
        pass


# -- the group, in the main process ----------------------------------------------------------------


class CaptureGroup:
    """N capture processes on one interface; `updates()` yields what they meter."""

    def __init__(self, iface: str, workers: int, flows: FlowSettings, *, bpf: str | None = None,
                 promisc: bool = False, user: str | None = None,
                 notice: Callable[[str], None] = lambda msg: None,
                 helper: Helper | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.iface = iface
        self.notice = notice
        # Without a daemon's helper (benchmarks, tests) start one of our own.
        self._own_helper = helper is None
        self.helper = helper or Helper.start()
        # A group id of our own: other programs' fanout groups on the interface stay separate.
        self._spec = WorkerSpec(iface, bpf, promisc, os.getpid() & 0xFFFF, flows, user).to_dict()
        self.workers = [WorkerState() for _ in range(workers)]
        self.lost_flows = 0  # open flows of capture processes that died
        self._dead = FlowStats()  # what processes that died had counted
        self._dead_drops = [0, 0]  # their kernel and queue drops
        self._lock = threading.Lock()
        self._stopping = False
        self._pending: queue.SimpleQueue = queue.SimpleQueue()  # updates read while starting
        try:
            for i in range(workers):
                self._start(i)
            self._await_ready(time.monotonic() + 30)
        except BaseException:
            self.close()
            raise

    def _start(self, i: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Room for a burst of messages in flight before a process drops (counted).
            for s in (ours, theirs):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            pid = self.helper.spawn(i, self._spec, theirs)
        except (HelperError, OSError) as e:
            ours.close()
            raise CaptureError(f"cannot start capture process {i} on {self.iface}: {e}") from None
        finally:
            theirs.close()
        w = self.workers[i]
        w.chan, w.pid, w.ready = ours, pid, False

    def _await_ready(self, deadline: float) -> None:
        """Every socket is open (or we say why not) before the group is handed out."""
        while not all(w.ready for w in self.workers):
            if time.monotonic() > deadline:
                raise CaptureError(f"capture processes on {self.iface} did not start")
            for i, kind, msg in self._poll(0.2):
                if kind == "error":
                    raise CaptureError(msg)
                if kind is None:
                    raise CaptureError(f"capture process {i} on {self.iface} exited while starting")
                if kind == "updates":
                    self._pending.put(msg)

    def _poll(self, timeout: float) -> Iterator[tuple[int, str | None, object]]:
        """(worker, kind, payload) of the messages that arrived; kind None: the process ended."""
        live = {w.chan: i for i, w in enumerate(self.workers) if w.chan is not None}
        if not live:
            time.sleep(timeout)
            return
        for chan in select.select(list(live), [], [], timeout)[0]:
            i, w = live[chan], self.workers[live[chan]]
            while True:
                try:
                    data = chan.recv(_RECV, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    chan.close()
                    w.chan = None
                    yield i, None, None
                    break
                kind, msg = pickle.loads(data)
                if kind == "ready":
                    w.ready = True
                elif kind == "stats":
                    with self._lock:
                        w.stats = msg
                elif kind == "done":
                    with self._lock:
                        w.stats, w.done = msg, True
                yield i, kind, msg

    def _died(self, i: int) -> None:
        """Process i ended without being asked: count its open flows as lost, restart it."""
        w = self.workers[i]
        with self._lock:
            self.lost_flows += w.stats.get("open", 0)
            if "flows" in w.stats:
                _add(self._dead, w.stats["flows"])
                self._dead_drops[0] += w.stats["kernel_drops"]
                self._dead_drops[1] += w.stats["queue_drops"]
            w.stats = {}
            w.restarts += 1
        self.notice(f"capture process {i} (pid {w.pid}) died; restarting it")
        try:
            self._start(i)
        except CaptureError as e:
            self.notice(str(e))
            w.done = True

    def updates(self, stop: threading.Event) -> Iterator[tuple[list[FlowUpdate], bool]]:
        """(updates, counters changed) until every process has flushed and said done."""
        while not self._pending.empty():
            yield self._pending.get(), False
        while not all(w.done or (self._stopping and w.chan is None) for w in self.workers):
            if stop.is_set() and not self._stopping:
                self._stop_all()
            for i, kind, msg in self._poll(0.1):
                w = self.workers[i]
                if kind == "updates":
                    yield msg, False
                elif kind in ("stats", "done"):
                    yield [], True
                elif kind == "error":  # a restart could not reopen the socket
                    self.notice(f"capture process {i}: {msg}")
                    w.done = True
                elif kind == "ready" and w.restarts:
                    self.notice(f"capture process {i} is capturing again")
                elif kind is None and not w.done and not self._stopping:
                    self._died(i)
                    yield [], True

    def _stop_all(self) -> None:
        self._stopping = True
        for w in self.workers:  # each process flushes its flows and says "done"
            if w.chan is not None:
                try:
                    w.chan.send(b"stop")
                except OSError:
                    pass

    def snapshot(self) -> MeterSnapshot:
        total = FlowStats()
        with self._lock:
            _add(total, self._dead)
            for w in self.workers:
                if "flows" in w.stats:
                    _add(total, w.stats["flows"])
            return MeterSnapshot(
                flows=total,
                open=sum(w.stats.get("open", 0) for w in self.workers),
                kernel_drops=self._dead_drops[0] + sum(w.stats.get("kernel_drops", 0) for w in self.workers),
                queue_drops=self._dead_drops[1] + sum(w.stats.get("queue_drops", 0) for w in self.workers),
                process_loss=self.lost_flows)

    def close(self) -> None:
        """Stop the processes (end of file on their channel) and, if ours, the helper."""
        self._stopping = True
        for w in self.workers:
            if w.chan is not None:
                w.chan.close()
                w.chan = None
        if self._own_helper:
            self.helper.close()


def _add(total: FlowStats, s: FlowStats) -> None:
    total.packets += s.packets
    total.bytes += s.bytes
    total.flows += s.flows
    total.ready += s.ready
    for k, v in s.skipped.items():
        total.skipped[k] = total.skipped.get(k, 0) + v
    for k, v in s.ended.items():
        total.ended[k] = total.ended.get(k, 0) + v
