"""Per-session capture, validation and pcap output for the lab.

A `Recorder` captures one client link (inside the client's namespace) on a background thread for
the length of one session. The frames then go through `session_stats` (per-flow packet and byte
counts over everything seen, computed before anything is cut; a flow is the flow meter's own,
`flows.flow_keys` over `packets.decode`, so the lab labels exactly the flows the daemon meters), `validate` (is this a real,
encrypted, lab-only session worth a label?) and `keep_first` (at most N packets per flow on disk:
shaped bulk transfers would otherwise fill the disk with payload no model looks at; and none of
a connection an earlier session opened, whose tail can still arrive), and are
written with `write_pcap` (classic pcap, nanosecond timestamps; ~15 lines of struct).
"""

from __future__ import annotations

import ipaddress
import math
import struct
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flagd.capture import CaptureStats, open_capture
from flagd.events import ip_text
from flagd.flows import flow_keys
from flagd.frames import Frames
from flagd.lab.topology import LAB_NETS, in_netns
from flagd.packets import PROTO_TCP, Packets, Skip, decode

PCAP_MAGIC_NS = 0xA1B23C4D  # classic pcap, nanosecond timestamps
PCAP_SNAPLEN = 262144
TCP_SYN = 0x02


def write_pcap(path: Path, frames: Frames) -> None:
    """Write `frames` (one link type) as a classic little-endian pcap file with ns timestamps."""
    linktype = int(frames.linktype[0]) if len(frames) else 1
    if len(frames) and np.any(frames.linktype != linktype):
        raise ValueError("a pcap file holds one link type; these frames mix several")
    ns = np.round(frames.ts * 1e9).astype(np.int64) if len(frames) else np.zeros(0, np.int64)
    data = frames.data.tobytes() if len(frames) else b""
    parts = [struct.pack("<IHHiIII", PCAP_MAGIC_NS, 2, 4, 0, 0, PCAP_SNAPLEN, linktype)]
    for i in range(len(frames)):
        off, cap = int(frames.offset[i]), int(frames.caplen[i])
        sec, frac = divmod(int(ns[i]), 1_000_000_000)
        parts.append(struct.pack("<IIII", sec, frac, cap, int(frames.wirelen[i])))
        parts.append(data[off : off + cap])
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_bytes(b"".join(parts))
    tmp.replace(path)  # a crash never leaves a half-written capture under its final name


def select(frames: Frames, index: np.ndarray) -> Frames:
    """The records of `frames` at `index` (sharing the data buffer)."""
    return Frames(
        data=frames.data,
        offset=frames.offset[index],
        caplen=frames.caplen[index],
        wirelen=frames.wirelen[index],
        ts=frames.ts[index],
        linktype=frames.linktype[index],
    )


class Recorder:
    """Capture everything on `iface` inside namespace `ns` until `stop()`, on its own thread."""

    def __init__(self, ns: str, iface: str) -> None:
        with in_netns(ns):
            # A starved reader thread loses nothing while the ring has free blocks. A block is
            # handed over when full or 10 ms after its first packet, so sparse traffic (an echo, a
            # chat) uses up blocks, not bytes: 256 blocks of 128 KiB last 2.6 s either way (at
            # the lab's 100 Mbit/s ceiling a block fills in 10 ms), where 32 x 1 MiB lasted 0.3 s.
            self._cap = open_capture(iface, block_size=1 << 17, block_count=256)
        self._batches: list[Frames] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"lab-capture-{ns}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                frames = self._cap.read(0.05)
                if len(frames):
                    self._batches.append(frames)
            # the rest, including a last block whose timeout has not fired yet
            self._batches.append(self._cap.drain())
        except BaseException as exc:  # noqa: BLE001 - handed to stop()'s caller
            self._error = exc

    def stop(self) -> tuple[Frames, CaptureStats]:
        """All frames captured (packed into one batch) and the kernel's counters."""
        self._stop.set()
        self._thread.join()
        self._cap.close()  # already closed by the drain, unless the loop failed
        if self._error is not None:
            raise self._error
        return Frames.concat(self._batches), self._cap.stats()

    def close(self) -> None:
        if self._thread.is_alive():
            self.stop()


# -- statistics and validation ------------------------------------------------------------------


@dataclass(frozen=True)
class FlowStat:
    """One bidirectional flow of a session, keyed from its first packet's direction."""

    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    packets: int
    bytes: int  # wire bytes, both directions
    payload: int  # transport payload bytes, both directions
    # False: a TCP flow whose first packet here is no SYN, the tail of a connection an earlier
    # session on this link opened (a server still writing to a client that quit); not written
    began: bool = True


@dataclass(frozen=True)
class SessionStats:
    packets: int
    bytes: int
    ip_packets: int
    foreign: list[str]  # IP addresses seen outside the lab's ranges (must be empty)
    entropy: float  # bits per byte over every TCP/UDP payload byte of the session
    flows: list[FlowStat]

    def to_dict(self) -> dict:
        return asdict(self)


def flow_ids(pk: Packets) -> tuple[np.ndarray, np.ndarray]:
    """A flow id per packet (-1 where the flow meter makes no flow: not a usable TCP/UDP packet)
    and, per id, the row of the flow's first packet. Flows are the flow meter's own
    (`flows.flow_keys`: direction-independent, IPv4 and IPv6), numbered in order of appearance."""
    ids = np.full(len(pk), -1, np.int64)
    rows = np.flatnonzero(pk.skip == Skip.OK)
    if not len(rows):
        return ids, np.zeros(0, np.int64)
    keys, _ = flow_keys(pk, rows)
    _, first, inverse = np.unique(
        np.array(keys, dtype="S38"), return_index=True, return_inverse=True
    )
    order = np.argsort(first)  # np.unique numbers keys in sorted order; we want first-seen
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    ids[rows] = rank[inverse.ravel()]
    return ids, rows[first[order]]


def _began(pk: Packets, first: np.ndarray) -> np.ndarray:
    """Per flow: did it begin in this capture (not a TCP flow whose first packet lacks SYN)?"""
    return (pk.proto[first] != PROTO_TCP) | ((pk.tcp_flags[first] & TCP_SYN) != 0)


def _payload_entropy(frames: Frames, pk: Packets, ids: np.ndarray) -> float:
    """Shannon entropy (bits per byte) of every TCP/UDP payload byte of the flows in `ids`.
    One byte mask over the shared buffer: +1 where a payload starts, -1 where it ends."""
    sel = np.flatnonzero(ids >= 0)
    start = pk.l4_off[sel] + pk.l4_hdr_len[sel].astype(np.int64)
    end = frames.offset[sel].astype(np.int64) + frames.caplen[sel]
    has = end > start
    # int8 is enough (payloads never overlap, so the running sum is 0 or 1) and keeps the mask
    # the size of the capture itself
    edge = np.zeros(len(frames.data) + 1, np.int8)
    np.add.at(edge, start[has], 1)
    np.add.at(edge, end[has], -1)
    hist = np.bincount(frames.data[np.cumsum(edge[:-1], dtype=np.int8) > 0], minlength=256)
    total = int(hist.sum())
    if not total:
        return 0.0
    p = hist[hist > 0] / total
    return float(-(p * np.log2(p)).sum())


def session_stats(frames: Frames) -> SessionStats:
    """Counts, per-flow totals, payload entropy and non-lab addresses of a session capture."""
    pk = decode(frames)
    ids, first = flow_ids(pk)
    ip = pk.version == 4
    addrs = {bytes(a[:4]) for a in np.concatenate([pk.src[ip], pk.dst[ip]])}
    foreign = sorted(
        str(ipaddress.ip_address(a))
        for a in addrs
        if not any(ipaddress.ip_address(a) in net for net in LAB_NETS)
    )
    foreign += ["ipv6"] if np.any(pk.version == 6) else []
    sel = ids >= 0
    n = len(first)
    packets = np.bincount(ids[sel], minlength=n)
    wire = np.bincount(ids[sel], weights=pk.wirelen[sel], minlength=n)
    payload = np.bincount(ids[sel], weights=pk.payload_len[sel], minlength=n)
    began = _began(pk, first)
    flows = [
        FlowStat(
            int(pk.proto[i]),
            ip_text(pk.src[i].tobytes(), int(pk.version[i])),
            int(pk.sport[i]),
            ip_text(pk.dst[i].tobytes(), int(pk.version[i])),
            int(pk.dport[i]),
            int(packets[k]),
            int(wire[k]),
            int(payload[k]),
            bool(began[k]),
        )
        for k, i in enumerate(first.tolist())
    ]
    return SessionStats(
        len(frames),
        int(frames.wirelen.sum()),
        int(ip.sum()),
        foreign,
        _payload_entropy(frames, pk, ids),
        flows,
    )


@dataclass(frozen=True)
class Rules:
    """What a session must show before it is labelled."""

    min_packets: int = 10  # over the whole session
    min_payload: int = 200  # bytes of TCP/UDP payload, all flows
    # Shannon entropy of all payload bytes: TLS/SSH/SRTP records sit near 8 bits per byte, ASCII
    # protocols (an SMTP dialogue, an XMPP stream before STARTTLS) around 4.5-5.5.
    min_entropy: float = 6.5


def validate(
    returncode: int, stats: SessionStats, rules: Rules = Rules(), client: str | None = None
) -> str | None:
    """Why the session must not be labelled, or None when it is good. `client`: the client's
    own address, which a capture of its link must show (else it recorded another link)."""
    if returncode != 0:
        return f"client exited with status {returncode}"
    if stats.foreign:
        return f"addresses outside the lab's ranges: {', '.join(stats.foreign[:5])}"
    if stats.packets < rules.min_packets:
        return f"only {stats.packets} packets (minimum {rules.min_packets})"
    if client is not None and not any(client in (f.src, f.dst) for f in stats.flows):
        return f"no flow from or to the client's address {client}"
    payload = sum(f.payload for f in stats.flows)
    if payload < rules.min_payload:
        return f"only {payload} payload bytes (minimum {rules.min_payload})"
    if stats.entropy < rules.min_entropy or math.isnan(stats.entropy):
        return (
            f"payload does not look encrypted: {stats.entropy:.2f} bits/byte "
            f"(minimum {rules.min_entropy})"
        )
    return None


def keep_first(frames: Frames, per_flow: int, drop_earlier: bool = False) -> Frames:
    """The frames with at most `per_flow` packets of each flow (0: all; non TCP/UDP frames all
    kept); with `drop_earlier`, none of the flows that did not begin in the capture."""
    if (per_flow <= 0 and not drop_earlier) or not len(frames):
        return frames
    pk = decode(frames)
    ids, first = flow_ids(pk)
    if drop_earlier:
        earlier = np.flatnonzero(~_began(pk, first))
        ids = np.where(np.isin(ids, earlier), -2, ids)  # -2: dropped below
    per_flow = per_flow if per_flow > 0 else len(frames)
    sel = np.flatnonzero(ids >= 0)
    order = np.argsort(ids[sel], kind="stable")  # each flow's packets together, in time order
    grouped = ids[sel][order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    rank = np.arange(len(grouped)) - np.repeat(starts, np.diff(np.r_[starts, len(grouped)]))
    keep = ids != -2
    keep[sel[order]] = rank < per_flow
    return frames if keep.all() else select(frames, np.flatnonzero(keep))
