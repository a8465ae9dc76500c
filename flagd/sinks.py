"""Where events go: a JSONL log people tail, and the bounded buffer the dashboard reads.

The log is opened with O_APPEND and each event is one `os.write` of one complete line, so a
reader never sees half a line from us and a kill -9 leaves only whole lines behind. On SIGHUP the
pipeline asks the sink to reopen the path (logrotate's `create` mode). A full disk or another write
error is reported once, counted, and never stops the pipeline.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections import Counter, deque
from pathlib import Path
from typing import Protocol


class Sink(Protocol):
    def write(self, event: dict) -> None: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """Append-only JSON Lines file (or stdout for '-')."""

    MODE = 0o640  # events name hosts and ports: not world-readable

    def __init__(self, path: str | Path, warn=None) -> None:
        self.path = str(path)
        self.written = 0
        self.failed = 0  # events lost to write errors (full disk, ...), counted
        self._warn = warn or (lambda msg: print(f"flagd: {msg}", file=sys.stderr))
        self._last_error: int | None = None
        self._stdout = self.path == "-"  # written through sys.stdout, which may not be a real file
        self._fd = self._open()

    def _open(self) -> int:
        if self._stdout:
            return -1
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.MODE)
        except OSError as e:
            raise OSError(e.errno, f"cannot open log {self.path}: {e.strerror}") from None

    def write(self, event: dict) -> None:
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        try:
            if self._stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                self.written += 1
                return
            n = os.write(self._fd, line)
            if n != len(line):
                # A short write means the disk filled mid-line: cut the file back so it holds
                # only whole lines, and count the event as lost.
                os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - n)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += 1
            self._last_error = None
        except OSError as e:
            self.failed += 1
            if self._last_error != e.errno:  # report each new kind of failure once
                self._last_error = e.errno
                self._warn(f"cannot write to {self.path}: {e.strerror}; events are being counted and dropped")

    def reopen(self) -> None:
        if self._stdout:
            return
        old = self._fd
        try:
            self._fd = self._open()
        except OSError as e:
            self._warn(str(e))
            return
        os.close(old)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class MemorySink:
    """Every event in a list: for embedding the pipeline in other programs, and for tests."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def write(self, event: dict) -> None:
        self.events.append(event)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


class RecentEvents:
    """What the dashboard shows: class counts and the last few classified flows (bounded)."""

    def __init__(self, keep: int = 12) -> None:
        self.recent: deque[dict] = deque(maxlen=keep)
        self.classes: Counter[str] = Counter()
        self.dropped_by: Counter[str] = Counter()

    def write(self, event: dict) -> None:
        if event["event_type"] == "classification":
            self.recent.append(event)
            self.classes[event["flag"]["label"]] += 1
        elif event["event_type"] == "flow" and "dropped_by" in event["flag"]:
            self.dropped_by[event["flag"]["dropped_by"]] += 1

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass
