"""Raw link-layer frames as they come off a capture handle (a file or a socket).

A `Frames` batch is columnar: one contiguous byte buffer plus per-record arrays, so the
decoder can work on whole batches with numpy instead of one Python object per packet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Link types (pcap LINKTYPE_* values) that flagd decodes.
LINKTYPE_NULL = 0  # BSD loopback: 4-byte address family in host byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4/IPv6
LINKTYPE_LOOP = 108  # OpenBSD loopback: 4-byte address family in network byte order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276


@dataclass(slots=True)
class Frames:
    """A batch of captured frames. Record i is data[offset[i] : offset[i] + caplen[i]]."""

    data: np.ndarray  # uint8 buffer holding the records (read-only for files; may hold gaps)
    offset: np.ndarray  # int64, start of each record in data
    caplen: np.ndarray  # int32, bytes captured
    wirelen: np.ndarray  # int32, bytes on the wire (>= caplen when a snaplen cut the frame)
    ts: np.ndarray  # float64, seconds since the epoch
    linktype: np.ndarray  # int32, LINKTYPE_* of each record (pcapng mixes interfaces)

    def __len__(self) -> int:
        return len(self.offset)

    @classmethod
    def empty(cls) -> Frames:
        return cls(
            data=np.zeros(0, np.uint8),
            offset=np.zeros(0, np.int64),
            caplen=np.zeros(0, np.int32),
            wirelen=np.zeros(0, np.int32),
            ts=np.zeros(0, np.float64),
            linktype=np.zeros(0, np.int32),
        )

    @classmethod
    def concat(cls, batches: list[Frames]) -> Frames:
        """One batch holding every record of `batches`, packed (gaps dropped)."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return cls.empty()
        chunks, offsets, pos = [], [], 0
        for b in batches:
            for off, cap in zip(b.offset.tolist(), b.caplen.tolist(), strict=True):
                chunks.append(b.data[off : off + cap])
                offsets.append(pos)
                pos += cap
        return cls(
            data=np.concatenate(chunks),
            offset=np.array(offsets, np.int64),
            caplen=np.concatenate([b.caplen for b in batches]).astype(np.int32),
            wirelen=np.concatenate([b.wirelen for b in batches]).astype(np.int32),
            ts=np.concatenate([b.ts for b in batches]),
            linktype=np.concatenate([b.linktype for b in batches]).astype(np.int32),
        )

    @classmethod
    def from_records(cls, records: list[tuple[float, bytes, int, int]]) -> Frames:
        """Build a batch from (ts, frame bytes, wirelen, linktype) tuples (tests, slow paths)."""
        if not records:
            return cls.empty()
        lens = np.fromiter((len(r[1]) for r in records), np.int32, len(records))
        offset = np.zeros(len(records), np.int64)
        np.cumsum(lens[:-1], out=offset[1:])
        return cls(
            data=np.frombuffer(b"".join(r[1] for r in records), np.uint8),
            offset=offset,
            caplen=lens,
            wirelen=np.fromiter((r[2] for r in records), np.int32, len(records)),
            ts=np.fromiter((r[0] for r in records), np.float64, len(records)),
            linktype=np.fromiter((r[3] for r in records), np.int32, len(records)),
        )
