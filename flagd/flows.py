"""The flow meter: packets grouped into bidirectional flows, bounded, on the packets' own clock.

A flow's key is the same in both directions (the lower endpoint first); its client is the sender
of the first packet seen. The clock is the newest packet timestamp, so replaying a capture is
deterministic; a live source also ticks the clock from the wall so flows end on a quiet link.
A flow's `start` and `last` are that clock at its first and latest packet, never a packet's own
older stamp (a capture whose clock stepped back, or merged out of order): so `last` never moves
backwards and the LRU order is also the order of `last`, which lets the idle scan stop at the
first fresh flow.
Each flow keeps only its first K relevant packets as model bytes, so memory per flow is bounded
by K and B, and the table itself is bounded by an LRU limit.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from flagd.packets import Packets, Skip
from flagd.preprocess import Preprocessing, RuleTable, model_bytes
from flagd.reassembly import Reassembler

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10


class Expiry(enum.StrEnum):
    """Why a flow ended."""

    IDLE = "idle"  # no packet for idle_timeout
    ACTIVE = "active"  # older than active_timeout
    END = "end"  # TCP FIN both ways or RST, then quiet for closed_timeout (or a new SYN)
    LIMIT = "limit"  # evicted because the table was full (see FlowTable: empty flows first)
    SHUTDOWN = "shutdown"  # the source ended or the daemon stopped


@dataclass(frozen=True, slots=True)
class FlowSettings:
    idle_timeout: float = 120.0  # a flow seen in one direction only ends after this quiet time
    # ... and one both sides have spoken in after this: a conversation (TCP keep-alives, a UDP
    # session with a slow heartbeat) stays one flow across pauses that end an unanswered one
    # (Suricata's flow-timeouts: new vs established; conntrack's UDP unreplied vs stream).
    established_timeout: float = 600.0
    active_timeout: float = 1800.0
    # After FIN both ways or a RST the flow stays open this long, so the last ACKs and
    # retransmitted FIN/RST land in it instead of starting a flow of their own.
    closed_timeout: float = 5.0
    max_flows: int = 262_144
    ready_packets: int = 5  # K: relevant packets that make a flow ready for classification
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def to_dict(self) -> dict:
        return {"idle_timeout": self.idle_timeout, "established_timeout": self.established_timeout,
                "active_timeout": self.active_timeout,
                "closed_timeout": self.closed_timeout, "max_flows": self.max_flows,
                "ready_packets": self.ready_packets,
                "preprocessing": self.preprocessing.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> FlowSettings:
        """The settings a dataset or bundle recorded; keys it lacks keep their defaults."""
        kw = {k: d[k] for k in ("idle_timeout", "established_timeout", "active_timeout",
                                "closed_timeout", "max_flows") if k in d}
        return cls(ready_packets=int(d["ready_packets"]),
                   preprocessing=Preprocessing.from_dict(d["preprocessing"]), **kw)


@dataclass(slots=True, eq=False)
class Flow:
    key: bytes
    flow_id: int
    version: int
    proto: int
    client: bytes  # 16 bytes (IPv4 in the first 4)
    server: bytes
    client_port: int
    server_port: int
    start: float
    last: float
    client_is_high: bool  # whether the client is the key's second endpoint
    pkts_toserver: int = 0
    pkts_toclient: int = 0
    bytes_toserver: int = 0
    bytes_toclient: int = 0
    packets: list[bytes] = field(default_factory=list)  # first K relevant packets, model bytes
    # The side channel of each kept packet, beside its bytes: direction (0 client->server,
    # 1 back), wire length, and seconds since the flow's previous packet (relevant or not).
    sides: list[tuple[int, int, float]] = field(default_factory=list)
    relevant: int = 0  # relevant packets seen (may exceed K)
    drop_rule: str | None = None  # first relevance rule that removed one of its packets
    fin_toserver: bool = False
    fin_toclient: bool = False
    syn_seq: int | None = None  # sequence number of the client's SYN (TCP), to tell a retry
    oneway: bool = True  # no packet back yet: in the table's one-way order too
    closed_at: float | None = None
    ready: bool = False
    expiry: Expiry | None = None

    @property
    def state(self) -> str:
        if self.closed_at is not None:
            return "closed"
        return "established" if self.pkts_toclient and self.pkts_toserver else "new"


# `FlowStats.ended` key for evictions of flows that had no relevant packet yet (SYN-only,
# handshake-only, all-DNS ...); Expiry.LIMIT counts the evicted flows that carried one. Both are
# end reasons of distinct flows, so the values still add up to the flows ended, and processes'
# stats merge by adding keys.
LIMIT_EMPTY = "limit_empty"


@dataclass(slots=True)
class FlowStats:
    packets: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # Skip reason name -> frames
    flows: int = 0  # flows created
    ended: dict[str, int] = field(default_factory=dict)  # Expiry (or LIMIT_EMPTY) -> flows
    ready: int = 0

    @property
    def evicted(self) -> int:
        """Flows evicted because the table was full, empty or not."""
        return self.ended.get(Expiry.LIMIT, 0) + self.ended.get(LIMIT_EMPTY, 0)

    @property
    def evicted_empty(self) -> int:
        """Evicted flows without a relevant packet (a SYN flood's): evicted first."""
        return self.ended.get(LIMIT_EMPTY, 0)

    @property
    def evicted_payload(self) -> int:
        """Evicted flows that had a relevant packet: only when no empty flow was left."""
        return self.ended.get(Expiry.LIMIT, 0)


# What the table hands on: ("ready", flow) once a flow has K relevant packets, ("end", flow) when
# it ends. A flow that ends before it is ready is handed on only once, as "end".
READY, END = "ready", "end"
FlowUpdate = tuple[str, Flow]


def _flow_id(key: bytes, start: float) -> int:
    # Stable across replays of the same capture; 48 bits keep it exact in JSON readers.
    return int.from_bytes(hashlib.blake2b(key + struct.pack("<d", start), digest_size=6).digest())


def flow_keys(p: Packets, rows: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """Direction-independent keys for the given rows, and whether each packet's source is the
    key's high endpoint. Key: version, proto, low port, high port, low address, high address,
    VLAN ids (last, so the first 38 bytes are the 5-tuple's)."""
    src, dst = p.src[rows], p.dst[rows]
    sport, dport = p.sport[rows], p.dport[rows]
    s = src.view(">u8")  # (m, 2) big-endian halves compare like the bytes do
    d = dst.view(">u8")
    src_high = (s[:, 0] > d[:, 0]) | (
        (s[:, 0] == d[:, 0]) & ((s[:, 1] > d[:, 1]) | ((s[:, 1] == d[:, 1]) & (sport > dport)))
    )
    m = len(rows)
    # VLAN ids last: a key without them (all zero) is the same bytes object at either width,
    # since fixed-width 'S' rows drop trailing NULs, so untagged batches skip those columns.
    tagged = bool(p.vlan[rows].any())
    width = 42 if tagged else 38
    key = np.empty((m, width), np.uint8)
    key[:, 0] = p.version[rows]
    key[:, 1] = p.proto[rows]
    lo_port = np.where(src_high, dport, sport).astype(">u2")
    hi_port = np.where(src_high, sport, dport).astype(">u2")
    key[:, 2:4] = lo_port.view(np.uint8).reshape(m, 2)
    key[:, 4:6] = hi_port.view(np.uint8).reshape(m, 2)
    high = src_high[:, None]
    key[:, 6:22] = np.where(high, dst, src)
    key[:, 22:38] = np.where(high, src, dst)
    if tagged:
        key[:, 38:42] = p.vlan[rows].astype(">u4").view(np.uint8).reshape(m, 4)
    # Fixed-width rows drop trailing NULs, which keeps keys distinct at one width.
    return key.view(f"S{width}").ravel().tolist(), src_high


class FlowTable:
    """Bounded, LRU-ordered bidirectional flow table. Not thread-safe: one thread feeds it.

    When the table is full a new flow evicts the oldest flow *without a relevant packet yet* (a
    SYN or handshake alone, or only rule-removed packets), and only when there is none the least
    recently seen flow of all: a flood of new flows that never carry payload (a SYN flood) churns
    through its own kind and leaves the real conversations alone.
    """

    def __init__(self, settings: FlowSettings | None = None) -> None:
        self.settings = settings or FlowSettings()
        self.rules = RuleTable.compile(self.settings.preprocessing.rules)
        self.flows: OrderedDict[bytes, Flow] = OrderedDict()  # least recently seen first
        # Flows in order of creation, each until it ends or is found to carry a relevant packet
        # when it reaches the front (so the hot loop never touches this): evicted first.
        self.empty: OrderedDict[bytes, Flow] = OrderedDict()
        # The flows of `flows` seen in one direction only, in the same LRU order: the shorter
        # idle timeout applies to them, so the idle scan walks them on their own.
        self.oneway: OrderedDict[bytes, Flow] = OrderedDict()
        self.closing: deque[Flow] = deque()  # flows that saw FIN both ways or RST
        self.now = 0.0  # newest timestamp seen (or ticked)
        self.stats = FlowStats()
        # IP fragments become whole datagrams before they are metered (as the kernel does for
        # `--workers N`); its discards are counted with the decoder's skips.
        self.reassembler = Reassembler(skipped=self.stats.skipped)
        self._out: list[FlowUpdate] = []

    def __len__(self) -> int:
        return len(self.flows)

    def add(self, p: Packets) -> list[FlowUpdate]:
        """Account a batch of decoded packets; return the flows that became ready or ended."""
        st = self.stats
        if self.reassembler.pending or p.frag.any():
            p = self.reassembler.feed(p, self.now)
        counts = np.bincount(p.skip, minlength=len(Skip))
        for reason in Skip:
            if reason and counts[reason]:
                st.skipped[reason.name.lower()] = st.skipped.get(reason.name.lower(), 0) + int(counts[reason])
        rows = np.flatnonzero(p.skip == Skip.OK)
        if not len(rows):
            return self._drain()
        keys, src_high = flow_keys(p, rows)
        codes = self.rules.codes(p.proto[rows], p.sport[rows], p.dport[rows], p.payload_len[rows])
        wirelen = p.wirelen[rows]
        st.packets += len(rows)
        st.bytes += int(wirelen.sum())
        self._account(p, rows, keys, src_high.tolist(), codes.tolist(), wirelen.tolist())
        self._sweep()
        return self._drain()

    def _account(self, p: Packets, rows: np.ndarray, keys: list[bytes], src_high: list[bool],
                 codes: list[int], wirelen: list[int]) -> None:
        # The one per-packet Python loop of the hot path: locals only, one dict lookup, and the
        # rare cases (new flow, expiry, FIN/RST, first K packets) behind cheap tests.
        s = self.settings
        idle, active, closed_to, k_ready = s.idle_timeout, s.active_timeout, s.closed_timeout, s.ready_packets
        est = s.established_timeout
        flows, get, touch = self.flows, self.flows.get, self.flows.move_to_end
        oneway, touch_oneway = self.oneway, self.oneway.move_to_end
        names = self.rules.names
        syn, syn_ack, fin_rst, control = SYN, SYN | ACK, FIN | RST, SYN | FIN | RST
        now = self.now
        columns = zip(range(len(keys)), keys, p.ts[rows].tolist(), src_high,
                      p.tcp_flags[rows].tolist(), codes, wirelen, strict=True)
        for j, key, t, high, fl, code, size in columns:
            # Flows are timed on the table's clock `now`, which never goes backwards (see the
            # module docstring), not on `t`.
            if t > now:
                now = t
            f = get(key)
            if f is None:
                if len(flows) >= s.max_flows:
                    self._evict()
                f = self._new(p, int(rows[j]), key, high, now)
            # idle <= established: a flow quiet for less than idle, young and open goes on
            elif now - f.last > idle or now - f.start > active or f.closed_at is not None:
                quiet = now - f.last
                stale = quiet > (est if f.pkts_toclient else idle)
                if (stale or now - f.start > active
                        or f.closed_at is not None and (
                            quiet > closed_to
                            or (fl & syn_ack) == syn and self._seq(p, rows[j]) != f.syn_seq)):
                    self._end(f, Expiry.IDLE if stale else
                              Expiry.ACTIVE if now - f.start > active else Expiry.END)
                    if len(flows) >= s.max_flows:
                        self._evict()
                    f = self._new(p, int(rows[j]), key, high, now)
                else:
                    touch(key)
                    if f.oneway:
                        touch_oneway(key)
            else:
                touch(key)
                if f.oneway:
                    touch_oneway(key)
            gap, f.last = now - f.last, now
            if high == f.client_is_high:
                f.pkts_toserver += 1
                f.bytes_toserver += size
            else:
                if f.oneway:
                    del oneway[key]
                    f.oneway = False
                f.pkts_toclient += 1
                f.bytes_toclient += size
            if fl & control:  # TCP only: UDP rows have no flags
                if (fl & syn_ack) == syn and f.syn_seq is None and high == f.client_is_high:
                    f.syn_seq = self._seq(p, rows[j])
                if fl & fin_rst and f.closed_at is None:
                    self._closing(f, fl, high == f.client_is_high, now)
            if code:
                if f.drop_rule is None:
                    f.drop_rule = names[code - 1]
            else:
                if f.relevant < k_ready:
                    self._keep(f, p, int(rows[j]), (int(high != f.client_is_high), size, gap))
                f.relevant += 1
        self.now = now

    @staticmethod
    def _seq(p: Packets, i: int) -> int:
        """TCP sequence number of row i. A SYN on a closed flow is port reuse (a new flow) unless
        it repeats the flow's first SYN: a client retrying after a RST is the same attempt."""
        at = int(p.l4_off[i]) + 4
        return int.from_bytes(p.frames.data[at:at + 4].tobytes())

    def _closing(self, f: Flow, flags: int, to_server: bool, t: float) -> None:
        if flags & RST:
            f.closed_at = t
        elif to_server:
            f.fin_toserver = True
        else:
            f.fin_toclient = True
        if f.fin_toserver and f.fin_toclient:
            f.closed_at = t
        if f.closed_at is not None:
            self.closing.append(f)

    def _keep(self, f: Flow, p: Packets, i: int, side: tuple[int, int, float]) -> None:
        """Keep packet i's model bytes and side channel as one of the flow's first K; hand the
        flow on at K."""
        f.sides.append(side)
        f.packets.append(model_bytes(
            p.frames.data, int(p.ip_off[i]), int(p.ip_caplen[i]), int(p.l4_off[i]),
            int(p.l4_hdr_len[i]), int(p.version[i]), int(p.proto[i]), self.settings.preprocessing))
        if len(f.packets) == self.settings.ready_packets:
            f.ready = True
            self.stats.ready += 1
            self._out.append((READY, f))

    def _new(self, p: Packets, i: int, key: bytes, src_high: bool, now: float) -> Flow:
        self.stats.flows += 1
        f = Flow(
            key=key, flow_id=_flow_id(key, now), version=int(p.version[i]), proto=int(p.proto[i]),
            client=p.src[i].tobytes(), server=p.dst[i].tobytes(),
            client_port=int(p.sport[i]), server_port=int(p.dport[i]),
            start=now, last=now, client_is_high=src_high,
        )
        self.flows[key] = f
        self.empty[key] = f
        self.oneway[key] = f
        return f

    def _evict(self) -> None:
        """Make room: the oldest flow without a relevant packet, else the least recently seen."""
        empty = self.empty
        while empty:
            key, f = next(iter(empty.items()))
            if not f.relevant:
                self._end(f, Expiry.LIMIT)
                return
            del empty[key]  # it carries payload now: it stays, and leaves this order
        self._end(next(iter(self.flows.values())), Expiry.LIMIT)

    def _end(self, f: Flow, reason: Expiry) -> None:
        del self.flows[f.key]
        counted: str = reason
        if f.oneway:
            del self.oneway[f.key]
        self.empty.pop(f.key, None)
        if not f.relevant and reason == Expiry.LIMIT:
            counted = LIMIT_EMPTY
        f.expiry = reason
        self.stats.ended[counted] = self.stats.ended.get(counted, 0) + 1
        self._out.append((END, f))

    def _sweep(self) -> None:
        """End flows idle past their timeout at the current clock (oldest first)."""
        now, s = self.now, self.settings
        if self.reassembler.pending:
            self.reassembler.expire(now)
        while self.closing:
            f = self.closing[0]
            if f.expiry is not None:  # already ended for another reason
                self.closing.popleft()
            elif now - f.last > s.closed_timeout:
                self.closing.popleft()
                self._end(f, Expiry.END)
            elif now - f.closed_at > s.closed_timeout:
                self.closing.rotate(-1)  # still talking after close: look again later
                break
            else:
                break
        for flows, timeout in ((self.oneway, s.idle_timeout), (self.flows, s.established_timeout)):
            for f in list(self._stale(flows, now - timeout)):
                self._end(f, Expiry.IDLE)

    @staticmethod
    def _stale(flows: OrderedDict[bytes, Flow], cutoff: float):
        for f in flows.values():
            if f.last >= cutoff:
                return
            yield f

    def tick(self, now: float) -> list[FlowUpdate]:
        """Advance the clock without packets (a live source on a quiet link) and expire flows."""
        if now > self.now:
            self.now = now
        self._sweep()
        return self._drain()

    def flush(self, reason: Expiry = Expiry.SHUTDOWN) -> list[FlowUpdate]:
        """End every open flow (end of a capture, or shutdown)."""
        self.reassembler.flush()
        for f in list(self.flows.values()):
            self._end(f, Expiry.END if f.closed_at is not None else reason)
        self.closing.clear()
        return self._drain()

    def _drain(self) -> list[FlowUpdate]:
        out, self._out = self._out, []
        return out
