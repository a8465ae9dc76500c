"""Flood traffic for the robustness tests and benchmarks: millions of distinct flows, fast.

Every record is one 70-byte Ethernet/IPv4 frame built with numpy over the whole capture at once
(a 2,000,000-flow pcap takes a second or two; scapy would take an hour). Frames shorter than 70
bytes carry zero padding after the IP datagram, as Ethernet pads short frames, so the IP total
length still says what the transport holds.

Kinds of flood:
- ``syn``: one SYN per flow from a distinct spoofed source to one server port (every flow is
  removed by the ``tcp-no-payload`` relevance rule, so the flood costs the flow table only).
- ``random``: one packet per flow with a random 5-tuple, TCP or UDP, 16 bytes of payload (every
  flow has a relevant packet, so every flow reaches the classifier when it ends).

"Real" flows are mixed in: `real_flows` TCP (or UDP) conversations to 203.0.113.80:443, each
`real_packets` packets with payload, alternating direction. By default their packets are close
together in the capture, so LRU eviction by the flood does not reach them; with `real_gap`, that
many new flood flows pass between two packets of a real flow (more than the table holds: only the
eviction order can keep them whole), and the real flows run interleaved.

Every address is in the documentation ranges (RFC 5737), as the live tests send these frames on
veth pairs: flood sources in 198.51.100.0/24, flood destinations in 203.0.113.0/25 and real
clients in 203.0.113.128/25, so tests can pick the real flows out of the events.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRAME = 70  # bytes captured per record: Ethernet 14 + IPv4 20 + TCP 20 + 16 payload
PAYLOAD = 16
T0 = 1_700_000_000.0
SYN_SERVER = (203, 0, 113, 10)
REAL_SERVER = (203, 0, 113, 80)
FLOOD_NET = (198, 51, 100)  # flood sources: 198.51.100.16-255 (clear of tests/netns.py's /30)
FLOOD_HOSTS = 240
REAL_CLIENT_NET = (203, 0, 113)  # real flow i's client is 203.0.113.(128 + i % 120), port 20000 + i

_REC = np.dtype(
    [("sec", "<u4"), ("usec", "<u4"), ("caplen", "<u4"), ("len", "<u4"), ("frame", "u1", FRAME)]
)
_ETHER = bytes.fromhex("020000000002" "020000000001" "0800")


@dataclass(frozen=True)
class FloodFile:
    path: Path
    kind: str
    flood_flows: int
    real_flows: int
    packets: int


def _frames(n: int) -> np.ndarray:
    """n records holding an Ethernet + IPv4 header template (addresses and ports zero)."""
    rec = np.zeros(n, _REC)
    rec["caplen"] = FRAME
    rec["len"] = FRAME
    f = rec["frame"]
    f[:, :14] = np.frombuffer(_ETHER, np.uint8)
    f[:, 14] = 0x45
    f[:, 22] = 64  # TTL
    return rec


def _put_u16(f: np.ndarray, at: int, v: np.ndarray) -> None:
    f[:, at] = (v >> 8) & 0xFF
    f[:, at + 1] = v & 0xFF


def _put_ip(f: np.ndarray, at: int, v: np.ndarray) -> None:
    for k in range(4):
        f[:, at + k] = (v >> (24 - 8 * k)) & 0xFF


def _set_l4(f: np.ndarray, proto: np.ndarray, flags: np.ndarray, payload: np.ndarray) -> None:
    """Protocol, IP total length, TCP data offset and flags / UDP length."""
    tcp = np.flatnonzero(proto == 6)
    udp = np.flatnonzero(proto != 6)
    f[:, 23] = proto
    _put_u16(f, 16, np.where(proto == 6, 40, 28) + payload)
    f[tcp, 46] = 0x50  # data offset: 5 words
    f[tcp, 47] = flags[tcp]
    ulen = 8 + payload[udp]
    f[udp, 38] = (ulen >> 8) & 0xFF
    f[udp, 39] = ulen & 0xFF


def flood_records(kind: str, n_flows: int, seed: int = 0, first: int = 0) -> np.ndarray:
    """Records for flood flows first..first+n_flows-1 (timestamps are set by `write_flood`)."""
    rng = np.random.default_rng([seed, first])
    rec = _frames(n_flows)
    f = rec["frame"]
    i = np.arange(first, first + n_flows, dtype=np.int64)
    # Distinct flows by construction: flow i's (source, source port) is unique for the first
    # 240 x 64,000 = 15.4M flows (host i % 240, port from i // 240).
    src = int.from_bytes(bytes((*FLOOD_NET, 16)), "big") + i % FLOOD_HOSTS
    sport = 1024 + (i // FLOOD_HOSTS) % 64000
    if kind == "syn":
        proto = np.full(n_flows, 6, np.int64)
        flags = np.full(n_flows, 0x02, np.int64)
        payload = np.zeros(n_flows, np.int64)
        dst = np.full(n_flows, int.from_bytes(bytes(SYN_SERVER), "big"), np.int64)
        dport = np.full(n_flows, 443, np.int64)
    elif kind == "random":
        proto = np.where(rng.random(n_flows) < 0.5, 6, 17)
        flags = np.full(n_flows, 0x18, np.int64)  # PSH ACK
        payload = np.full(n_flows, PAYLOAD, np.int64)
        dst = int.from_bytes(bytes((*REAL_CLIENT_NET, 0)), "big") + rng.integers(0, 128, n_flows)
        dport = rng.integers(1, 65536, n_flows)
    else:
        raise ValueError(f"unknown flood kind {kind!r}")
    _put_ip(f, 26, src)
    _put_ip(f, 30, dst)
    _put_u16(f, 34, sport)
    _put_u16(f, 36, dport)
    _set_l4(f, proto, flags, payload)
    return rec


def real_records(n_flows: int, packets: int, proto: int = 6) -> np.ndarray:
    """`packets` records per real flow (flow-major), TCP PSH/ACK (or UDP) with payload, both
    directions."""
    n = n_flows * packets
    rec = _frames(n)
    f = rec["frame"]
    flow = np.repeat(np.arange(n_flows, dtype=np.int64), packets)
    k = np.tile(np.arange(packets, dtype=np.int64), n_flows)
    client = int.from_bytes(bytes((*REAL_CLIENT_NET, 128)), "big") + flow % 120
    server = int.from_bytes(bytes(REAL_SERVER), "big")
    cport = 20000 + flow
    to_server = k % 2 == 0
    _put_ip(f, 26, np.where(to_server, client, server))
    _put_ip(f, 30, np.where(to_server, server, client))
    _put_u16(f, 34, np.where(to_server, cport, 443))
    _put_u16(f, 36, np.where(to_server, 443, cport))
    # A TLS-record-looking payload so the phrases are not all zero
    f[:, 54:57] = (0x17, 0x03, 0x03)
    f[:, 57] = flow % 256
    _set_l4(f, np.full(n, proto, np.int64), np.full(n, 0x18, np.int64),
            np.full(n, PAYLOAD, np.int64))
    return rec


def mix(flood: np.ndarray, real: np.ndarray, n_real: int, gap: int = 16,
        interleave: bool = False) -> np.ndarray:
    """The flood with each real flow's packets `gap` records apart: real flows spread evenly over
    the capture, or (`interleave`) all started within one gap and running side by side."""
    n = len(flood) + len(real)
    out = np.empty(n, _REC)
    if not n_real:
        out[:] = flood
        return out
    per = len(real) // n_real
    span = (per - 1) * gap + 1
    if interleave:
        # starts less than `gap` apart in all: distinct modulo gap, so no two packets collide
        step = min((n - span) // n_real, gap // n_real)
        if step < 1:
            raise ValueError("flood too short for these real flows at this gap")
        starts = np.arange(n_real, dtype=np.int64) * step
    elif n // n_real <= span:
        raise ValueError("too many real flows for this flood: their packets would interleave")
    else:
        starts = np.arange(n_real, dtype=np.int64) * (n // n_real)
    pos = (starts[:, None] + np.arange(per) * gap).ravel()  # flow-major, increasing
    is_real = np.zeros(n, bool)
    is_real[pos] = True
    out[pos] = real
    out[~is_real] = flood
    return out


def write_flood(
    path: Path,
    kind: str,
    n_flows: int,
    real_flows: int = 0,
    real_packets: int = 6,
    pps: float = 1_000_000.0,
    seed: int = 0,
    real_proto: int = 6,
    real_gap: int | None = None,
) -> FloodFile:
    """Write a pcap of `n_flows` flood flows with `real_flows` real conversations mixed in.

    `real_gap`: new flood flows between two packets of a real flow (the real flows then run
    interleaved, and each gap also holds one packet of every other real flow)."""
    real = real_records(real_flows, real_packets, real_proto)
    if real_gap is None:
        rec = mix(flood_records(kind, n_flows, seed), real, real_flows)
    else:
        rec = mix(flood_records(kind, n_flows, seed), real, real_flows, gap=real_gap + real_flows,
                  interleave=True)
    ts = T0 + np.arange(len(rec)) / pps
    rec["sec"] = ts.astype(np.int64)
    rec["usec"] = np.round((ts - np.floor(ts)) * 1e6).clip(0, 999_999).astype(np.int64)
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    with open(path, "wb") as fh:
        fh.write(header)
        fh.write(rec.tobytes())
    return FloodFile(Path(path), kind, n_flows, real_flows, len(rec))


def real_key(i: int) -> tuple[str, int, str, int]:
    """(src_ip, src_port, dest_ip, dest_port) of real flow i as events name it."""
    return (f"{REAL_CLIENT_NET[0]}.{REAL_CLIENT_NET[1]}.{REAL_CLIENT_NET[2]}.{128 + i % 120}",
            20000 + i, ".".join(map(str, REAL_SERVER)), 443)


class PeakRss:
    """Samples a process's peak resident set (VmHWM) from /proc until it exits.

    Not getrusage/wait4: a child's ru_maxrss includes the resident set of the parent it was
    forked from (exec records the old address space's high-water mark), so a child of a big
    pytest process would report the parent's memory as its own.
    """

    def __init__(self, pid: int, every: float = 0.05) -> None:
        import threading

        self.pid, self.every = pid, every
        self.peak = 0
        self.samples: list[tuple[float, int]] = []  # (monotonic time, VmRSS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        while not self._stop.is_set():
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            if "VmHWM" not in fields:  # a zombie: its memory is gone
                return
            self.peak = max(self.peak, int(fields["VmHWM"].split()[0]) * 1024)
            self.samples.append((time.monotonic(), int(fields["VmRSS"].split()[0]) * 1024))
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def tiny_bundle(out: Path, ready_packets: int = 3) -> Path:
    """A bundle with a tiny untrained encoder (as tests/conftest.py's fixture): real inference."""
    import torch

    from flagd.flows import FlowSettings
    from flagd.infer import save_bundle
    from flagd.model import FlagEncoder, ModelConfig, make_checkpoint
    from flagd.phrases import PhraseDict

    torch.manual_seed(0)
    phrases = PhraseDict.fit([bytes(range(256)) * 4, b"\x16\x03\x01" * 50, b"\x00" * 300], 512)
    cfg = ModelConfig.preset("tiny", vocab_size=phrases.vocab_size, max_len=64, n_classes=3)
    ckpt = make_checkpoint(FlagEncoder(cfg), cfg, vocab_sha256=phrases.sha256,
                           labels=["chat", "streaming", "voip"], step=0, metrics={})
    return save_bundle(out, ckpt, phrases, FlowSettings(ready_packets=ready_packets), max_len=64,
                       metrics={"note": "untrained"})


# -- live: a TX-ring sender of distinct flows (run inside the far end's namespace) ---------------

SOL_PACKET = 263
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_QDISC_BYPASS = 20
TPACKET_V2 = 1
TP_STATUS_SEND_REQUEST = 1
_SLOT = 128  # TX ring slot: 32-byte tpacket2_hdr, then the frame (as benchmarks/bench_capture.py)
_BATCH = 256  # frames per send()
_WIRE = 60  # frames on the wire: our 70-byte records cut to Ethernet's minimum (payload 6 bytes)


def send_flood(iface: str, kind: str, n_flows: int, rate: float, first: int = 0) -> dict:
    """Send one packet for each of flows first..first+n_flows-1 at `rate` frames/s (0: flat out).

    The frames go to a MAC nobody has, so the receiving stack drops them at once and nothing
    answers; a capture on the peer still sees every one. A PACKET_TX_RING socket sends 256
    frames per syscall: the per-flow fields are rewritten in the mapped ring with numpy.
    """
    import mmap
    import socket
    import time

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
    sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    blocks = _BATCH * _SLOT // mmap.PAGESIZE
    sock.setsockopt(SOL_PACKET, PACKET_TX_RING,
                    struct.pack("4I", mmap.PAGESIZE, blocks, _SLOT, _BATCH))
    ring = mmap.mmap(sock.fileno(), _BATCH * _SLOT)
    sock.bind((iface, 0))
    buf = np.frombuffer(ring, np.uint8).reshape(_BATCH, _SLOT)
    hdr = buf.view(np.uint32)  # (BATCH, SLOT/4): word 0 status, word 1 tp_len
    hdr[:, 1] = _WIRE
    sent, start = 0, time.perf_counter()
    while sent < n_flows:
        m = min(_BATCH, n_flows - sent)
        rec = flood_records(kind, m, seed=1, first=first + sent)
        # Ethernet frames below 60 bytes are padded: IP lengths keep the datagram whole (SYN) or
        # say 16 bytes of payload where 6 fit (random); the decoder copes with both.
        buf[:m, 32:32 + _WIRE] = rec["frame"][:, :_WIRE]
        if rate:
            due = start + (sent + m) / rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(due - now, 0.001))
        hdr[:m, 0] = TP_STATUS_SEND_REQUEST
        sock.send(b"")  # blocks until the batch is on the wire
        sent += m
    elapsed = time.perf_counter() - start
    del hdr, buf
    ring.close()
    sock.close()
    return {"sent": sent, "seconds": elapsed}


if __name__ == "__main__":
    import json
    import sys

    # python tests/floodgen.py send IFACE KIND N_FLOWS RATE [FIRST]
    _, _, iface, kind, n, rate, *rest = sys.argv
    print(json.dumps(send_flood(iface, kind, int(n), float(rate), int(rest[0]) if rest else 0)),
          flush=True)
