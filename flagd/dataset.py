"""Labelled flows built from captures, in the exact form the daemon feeds the model.

A dataset is the flow table's output over capture files: for each flow with at least one
relevant packet, its first K model-byte packets and their side channel (direction, wire length,
gap since the flow's previous packet), its label, the capture it came from (for
group-aware splits) and its start time. Exact duplicate flows are removed and counted. It is
stored as one compressed .npz (bytes back to back plus offsets), quick to reload.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flagd.flows import END, FlowSettings, FlowTable
from flagd.packets import DecodeError, decode
from flagd.pcapfile import read_capture

CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")
FORMAT = "flagd-dataset"
VERSION = 2  # 2: the side channel of every kept packet


@dataclass
class Dataset:
    flows: list[list[bytes]]  # per flow, its first K relevant packets as model bytes
    sides: list[list[tuple[int, int, float]]]  # per flow and packet: Flow.sides
    labels: np.ndarray  # int16 index into classes, -1 when unlabelled
    classes: list[str]
    source: np.ndarray  # int32 index into sources
    sources: list[str]
    start: np.ndarray  # float64 flow start time
    settings: dict  # flow settings and preprocessing it was built with
    stats: dict = field(default_factory=dict)  # captures, flows seen, dropped by rule, duplicates

    def __len__(self) -> int:
        return len(self.flows)

    def subset(self, idx: np.ndarray) -> Dataset:
        # The build's counts (flows dropped, duplicates) describe the whole build, not these
        # flows: kept under "build", so a report on a split does not count them as its own.
        return Dataset([self.flows[i] for i in idx], [self.sides[i] for i in idx],
                       self.labels[idx], self.classes,
                       self.source[idx], self.sources, self.start[idx], self.settings,
                       {"subset_of": len(self), "build": self.stats})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        pkt_lens = [len(p) for flow in self.flows for p in flow]
        sides = np.array([s for flow in self.sides for s in flow], np.float64).reshape(-1, 3)
        meta = {"format": FORMAT, "version": VERSION, "classes": self.classes,
                "sources": self.sources, "settings": self.settings, "stats": self.stats}
        np.savez_compressed(
            path,
            data=np.frombuffer(b"".join(p for flow in self.flows for p in flow), np.uint8),
            pkt_len=np.array(pkt_lens, np.int32),
            flow_npkts=np.array([len(f) for f in self.flows], np.int32),
            pkt_dir=sides[:, 0].astype(np.uint8),
            pkt_wirelen=sides[:, 1].astype(np.int32),
            pkt_gap=sides[:, 2].astype(np.float64),
            labels=self.labels.astype(np.int16),
            source=self.source.astype(np.int32),
            start=self.start.astype(np.float64),
            meta=np.array(json.dumps(meta)),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        path = Path(path)
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
        except (OSError, KeyError, ValueError) as e:
            raise DatasetError(f"{path}: not a flagd dataset ({e})") from None
        if meta.get("format") != FORMAT:
            raise DatasetError(f"{path}: not a flagd dataset")
        if meta.get("version") != VERSION:
            raise DatasetError(
                f"{path}: flagd dataset version {meta.get('version')}, this flagd reads version "
                f"{VERSION} (which adds each packet's direction, length and timing); rebuild it "
                f"with `flagd dataset build`")
        data, pkt_len, npkts = z["data"].tobytes(), z["pkt_len"], z["flow_npkts"]
        side_rows = zip(z["pkt_dir"].tolist(), z["pkt_wirelen"].tolist(), z["pkt_gap"].tolist(),
                        strict=True)
        ends = np.cumsum(pkt_len).tolist()
        packets = [data[e - n:e] for e, n in zip(ends, pkt_len.tolist(), strict=True)]
        flow_ends = np.cumsum(npkts).tolist()
        flows = [packets[e - n:e] for e, n in zip(flow_ends, npkts.tolist(), strict=True)]
        side_list = list(side_rows)
        sides = [side_list[e - n:e] for e, n in zip(flow_ends, npkts.tolist(), strict=True)]
        return cls(flows, sides, z["labels"].astype(np.int64), meta["classes"], z["source"],
                   meta["sources"], z["start"], meta["settings"], meta["stats"])


class DatasetError(ValueError):
    pass


def find_captures(paths: Iterable[str | Path]) -> Iterator[tuple[Path, Path]]:
    """(capture, root) for every capture file under the given files or directory trees."""
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in CAPTURE_SUFFIXES:
                    yield f, p
        else:
            yield p, p.parent


def capture_flows(path: Path, settings: FlowSettings) -> Iterator:
    """Every flow of one capture, as it ends (the flow table's END updates)."""
    table = FlowTable(settings)
    for frames in read_capture(path):
        for kind, f in table.add(decode(frames)):
            if kind == END:
                yield f
    for _, f in table.flush():
        yield f


def build(paths: Iterable[str | Path], settings: FlowSettings | None = None,
          label: Callable[[Path, Path], str | None] | None = None,
          progress: Callable[[Path], None] | None = None) -> Dataset:
    """Flows of every capture under `paths`, labelled by `label(capture, root)` (None: unlabelled).

    Unreadable captures are skipped and listed in stats["errors"]."""
    settings = settings or FlowSettings()
    flows: list[list[bytes]] = []
    sides: list[list[tuple[int, int, float]]] = []
    names: list[str | None] = []
    source: list[int] = []
    start: list[float] = []
    sources: list[str] = []
    seen: dict[bytes, int] = {}
    stats: Counter = Counter()
    dropped: Counter = Counter()
    conflicts = 0
    errors: dict[str, str] = {}
    for cap, root in find_captures(paths):
        if progress:
            progress(cap)
        name = label(cap, root) if label else None
        if label and name is None:
            stats["captures_unlabelled"] += 1
            continue
        sources.append(str(cap))
        stats["captures"] += 1
        try:
            for f in capture_flows(cap, settings):
                stats["flows_seen"] += 1
                if not f.relevant:
                    dropped[f.drop_rule or "no-relevant-packet"] += 1
                    continue
                digest = hashlib.blake2b(b"\0".join(f.packets) + bytes([len(f.packets)]),
                                         digest_size=16).digest()
                if digest in seen:
                    stats["duplicates"] += 1
                    if names[seen[digest]] != name:
                        conflicts += 1
                    continue
                seen[digest] = len(flows)
                flows.append(list(f.packets))
                sides.append(list(f.sides))
                names.append(name)
                source.append(len(sources) - 1)
                start.append(f.start)
        except DecodeError as e:
            errors[str(cap)] = str(e)
    classes = sorted({n for n in names if n is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] if n is not None else -1 for n in names], np.int64)
    stats_d = dict(stats)
    stats_d.update(flows=len(flows), dropped=dict(dropped), duplicate_conflicts=conflicts,
                   errors=errors, per_class={c: int((labels == i).sum()) for c, i in index.items()})
    return Dataset(flows, sides, labels, classes, np.array(source, np.int32), sources,
                   np.array(start, np.float64), settings.to_dict(), stats_d)

