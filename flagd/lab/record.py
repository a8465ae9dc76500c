"""Per-session capture, validation and pcap output for the lab.

A `Recorder` captures one client link (inside the client's namespace) on a background thread for
the length of one session. The frames then go through `session_stats` (per-flow packet and byte
counts over everything seen, computed before anything is cut), `validate` (is this a real,
encrypted, lab-only session worth a label?) and `keep_first` (at most N packets per flow on disk:
shaped bulk transfers would otherwise fill the disk with payload no model looks at), and are
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
from flagd.frames import Frames
from flagd.lab.topology import LAB_NETS, in_netns
from flagd.packets import Skip, decode

PCAP_MAGIC_NS = 0xA1B23C4D  # classic pcap, nanosecond timestamps
PCAP_SNAPLEN = 262144


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


def _flow_ids(pk) -> tuple[np.ndarray, list[tuple]]:
    """A flow id per packet (-1 for non TCP/UDP) and the key of each id, direction-independent."""
    ok = pk.skip == Skip.OK
    ids = np.full(len(pk), -1, np.int64)
    keys: dict[tuple, int] = {}
    first: list[tuple] = []
    for i in np.flatnonzero(ok).tolist():
        a = (bytes(pk.src[i, :4]), int(pk.sport[i]))
        b = (bytes(pk.dst[i, :4]), int(pk.dport[i]))
        key = (int(pk.proto[i]), *sorted((a, b)))
        fid = keys.get(key)
        if fid is None:
            fid = keys[key] = len(first)
            first.append((int(pk.proto[i]), a, b))
        ids[i] = fid
    return ids, first


def session_stats(frames: Frames) -> SessionStats:
    """Counts, per-flow totals, payload entropy and non-lab addresses of a session capture."""
    pk = decode(frames)
    ids, first = _flow_ids(pk)
    ip = pk.version == 4
    addrs = {bytes(a[:4]) for a in np.concatenate([pk.src[ip], pk.dst[ip]])}
    foreign = sorted(
        str(ipaddress.ip_address(a))
        for a in addrs
        if not any(ipaddress.ip_address(a) in net for net in LAB_NETS)
    )
    foreign += ["ipv6"] if np.any(pk.version == 6) else []
    hist = np.zeros(256, np.int64)
    data = frames.data
    for i in np.flatnonzero(ids >= 0).tolist():
        start = int(pk.l4_off[i]) + int(pk.l4_hdr_len[i])
        end = int(frames.offset[i]) + int(frames.caplen[i])
        if end > start:
            hist += np.bincount(data[start:end], minlength=256)
    total = int(hist.sum())
    p = hist[hist > 0] / max(total, 1)
    entropy = float(-(p * np.log2(p)).sum()) if total else 0.0
    flows = []
    for fid, (proto, a, b) in enumerate(first):
        sel = ids == fid
        flows.append(
            FlowStat(
                proto,
                str(ipaddress.ip_address(a[0])),
                a[1],
                str(ipaddress.ip_address(b[0])),
                b[1],
                int(sel.sum()),
                int(pk.wirelen[sel].sum()),
                int(pk.payload_len[sel].sum()),
            )
        )
    return SessionStats(
        len(frames), int(frames.wirelen.sum()), int(ip.sum()), foreign, entropy, flows
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


def keep_first(frames: Frames, per_flow: int) -> Frames:
    """The frames with at most `per_flow` packets of each flow (non TCP/UDP frames all kept)."""
    if per_flow <= 0 or not len(frames):
        return frames
    ids, _ = _flow_ids(decode(frames))
    keep = np.ones(len(frames), bool)
    seen: dict[int, int] = {}
    for i in np.flatnonzero(ids >= 0).tolist():
        n = seen.get(int(ids[i]), 0)
        keep[i] = n < per_flow
        seen[int(ids[i])] = n + 1
    return frames if keep.all() else select(frames, np.flatnonzero(keep))
