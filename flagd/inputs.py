"""What the model reads for a flow: phrase ids, and for packet-aware models each id's packet context.

The paper's input is flat: `[CLS] p1 [SEP] p2 ... [EOS]`, the packets' bytes back to back. A
packet-aware model also gets, for every id, the packet it came from and that packet's side
channel, as four small integers (0 = none, for CLS, EOS and PAD):

    packet     1-based index of the packet in the flow (capped at MAX_PACKETS)
    direction  1 client->server, 2 server->client
    size       wire-length bucket + 1 (SIZE_STEP-byte steps)
    gap        bucket of the time since the flow's previous packet + 1 (GAPS_PER_DECADE steps
               per decade from 1 us)

Sizes and gaps are bucketed, not fed as numbers, so the encoder learns an embedding per bucket
(as for phrases) and pre-training can predict a masked packet's buckets by cross-entropy.
Addresses and ports never enter: direction says who sent a packet, not who they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flagd import tunnels
from flagd.phrases import CLS, EOS, PAD, SEP, PhraseDict

MAX_PACKETS = 64  # packet-index embeddings; later packets share the last one
SIZE_STEP = 32  # bytes per wire-length bucket
SIZE_BUCKETS = 48  # 0..1535 bytes in 32-byte steps; longer packets share the last bucket
GAPS_PER_DECADE = 4
GAP_BUCKETS = 8 * GAPS_PER_DECADE  # 1 us .. 100 s; shorter and longer gaps share the ends
# Context ids per field, the 0 ("none") included; size and gap have one more: their [MASK].
FIELD_SIZES = (MAX_PACKETS + 1, 3, SIZE_BUCKETS + 2, GAP_BUCKETS + 2)
SIZE_MASK, GAP_MASK = SIZE_BUCKETS + 1, GAP_BUCKETS + 1

Side = tuple[int, int, float]  # a kept packet's (direction, wire length, gap in seconds)


def bucketize(sides: np.ndarray) -> np.ndarray:
    """(P, 3) rows of (direction 0/1, wire length, gap seconds) -> (P, 3) int context ids
    (direction, size and gap fields, each + 1 so 0 stays "none")."""
    sides = np.asarray(sides, np.float64).reshape(-1, 3)
    size = np.minimum(sides[:, 1] // SIZE_STEP, SIZE_BUCKETS - 1)
    gap = np.floor(GAPS_PER_DECADE * (np.log10(np.maximum(sides[:, 2], 1e-6)) + 6))
    gap = np.clip(gap, 0, GAP_BUCKETS - 1)
    return np.stack([sides[:, 0] + 1, size + 1, gap + 1], axis=1).astype(np.int16)


def context(packet_of: np.ndarray, sides: Sequence[Sequence[Side]]) -> np.ndarray:
    """(N, T, 4) int16 context for ids whose packet indices are packet_of (N, T), from each
    flow's kept packets' sides (the same order as the packets that were encoded)."""
    n, t = packet_of.shape
    counts = np.fromiter(map(len, sides), np.int64, n)
    flat = [s for flow in sides for s in flow]
    table = np.zeros((int(counts.sum()) + 1, 3), np.int16)  # row 0: "none"
    if flat:
        table[1:] = bucketize(np.array(flat, np.float64))
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))  # each flow's first row - 1 in table
    p = packet_of.astype(np.int64)
    # A packet index past what the flow recorded (cannot happen for sides from the same flows)
    # would read a neighbour's row; clip so it reads "none" at worst.
    row = np.where((p > 0) & (p <= counts[:, None]), first[:, None] + p, 0)
    ctx = np.zeros((n, t, 4), np.int16)
    ctx[..., 0] = np.minimum(p, MAX_PACKETS)
    ctx[..., 1:] = table[row]
    return ctx


def encode(phrases: PhraseDict, flows: Sequence[Sequence[bytes]],
           sides: Sequence[Sequence[Side]] | None, max_len: int, packet_aware: bool,
           unwrap_tunnels: bool = False, tunnel_packets: int = 0
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Model input for a batch of flows: ids (N, max_len) int32 and, for a packet-aware model,
    its context (N, max_len, 4) int16 (else None). The one place training, evaluation and the
    daemon turn flows into model input. unwrap_tunnels and tunnel_packets: see `unwrapped`."""
    if sides is None and (packet_aware or unwrap_tunnels):
        raise ValueError("a packet-aware model, or one reading tunnels from inside, needs each "
                         "packet's side channel")
    if unwrap_tunnels:
        flows, sides = unwrapped(flows, sides, tunnel_packets)
    if not packet_aware:
        return phrases.encode_flows(flows, max_len), None
    ids, packet_of = phrases.encode_flows_with_packets(flows, max_len)
    return ids, context(packet_of, sides)


def packets_read(ids: np.ndarray, ctx: np.ndarray | None) -> np.ndarray:
    """(N,) how many of each flow's packets its model input holds: after tunnel unwrapping,
    tunnel_packets and the id budget (at most MAX_PACKETS counted from a packet context)."""
    if ctx is not None:
        return ctx[..., 0].max(axis=1).astype(np.int64)
    phrase = (ids != PAD) & (ids != CLS) & (ids != EOS)
    return (ids == SEP).sum(axis=1) + phrase.any(axis=1)


def unwrapped(flows: Sequence[Sequence[bytes]], sides: Sequence[Sequence[Side]],
              tunnel_packets: int = 0) -> tuple[list[list[bytes]], list[list[Side]]]:
    """Every flow through flagd.tunnels.unwrap: VPN flows from inside, at most tunnel_packets
    data packets each if that is > 0; other flows unchanged."""
    pairs = [tunnels.unwrap(f, s, tunnel_packets) for f, s in zip(flows, sides, strict=True)]
    return [p for p, _ in pairs], [s for _, s in pairs]
