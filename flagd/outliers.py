"""Synthetic outliers: flows made from the training flows that belong to none of the classes.

Outlier exposure (Hendrycks et al. 2019) teaches a classifier a flat prediction on foreign flows,
and what it learns to reject is what its exposure set shows it. Foreign captures cover their own
protocols only: exposed to flagd's traffic lab alone, the ISCX model rejected lab traffic but
accepted half of the nDPI corpus, whose plain HTTP, SLP and DNSCrypt flows share headers,
ports or packet shapes with ISCX flows. These flows keep most of a real flow and break one
thing a class is made of, so the model learns that a near miss is not a match:

- `payload`: each packet's bytes after its transport header, shuffled (headers and sizes kept);
- `ports`: both ports of the flow redrawn at random (the content kept; not when the dataset
  masks ports, which the model then never sees);
- `splice`: the first half of the flow's packets, then the packets of a flow of another class.

They are made from training flows only (never validation or test) and carry no label.
Measured (the ISCX card, "Open-set rejection"): exposed to one lab run, the ISCX model labels
68% of the nDPI flows unknown with them and 49% without (three draws each), for about a point
of accuracy; exposed to a broad corpus (half the nDPI captures) they cost 13 points on its other
half, because they take most of the exposure draws. Use them where the foreign data is narrow.
"""

from __future__ import annotations

import numpy as np

from flagd.dataset import Dataset
from flagd.preprocess import TCP, UDP

KINDS = ("payload", "ports", "splice")
_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
_IPV6_FRAGMENT = 44  # 8 bytes


def transport(pkt: bytes) -> tuple[int, int] | None:
    """(protocol, offset of the transport header) in a packet's model bytes, or None when the
    bytes end before it."""
    if not pkt:
        return None
    if pkt[0] >> 4 == 4:
        if len(pkt) < 20:
            return None
        return pkt[9], (pkt[0] & 0x0F) * 4
    if len(pkt) < 40:
        return None
    proto, off = pkt[6], 40
    while proto in _IPV6_EXTENSIONS or proto == _IPV6_FRAGMENT:
        if len(pkt) < off + 2:
            return None
        proto, off = pkt[off], off + (8 if proto == _IPV6_FRAGMENT else (pkt[off + 1] + 1) * 8)
    return proto, off


def _payload_start(pkt: bytes) -> int | None:
    """Where the application bytes start: after the TCP header (its data offset) or the UDP
    header padded to 20 bytes (`preprocess.UDP_PAD`); None for other protocols."""
    t = transport(pkt)
    if t is None or t[0] not in (TCP, UDP):
        return None
    proto, off = t
    if proto == TCP:
        return off + ((pkt[off + 12] >> 4) * 4 if len(pkt) > off + 12 else 20)
    return off + 20


def shuffled_payload(flow: list[bytes], rng: np.random.Generator) -> list[bytes]:
    out = []
    for pkt in flow:
        start = _payload_start(pkt)
        if start is None or start >= len(pkt):
            out.append(pkt)
            continue
        tail = np.frombuffer(pkt, np.uint8)[start:].copy()
        rng.shuffle(tail)
        out.append(pkt[:start] + tail.tobytes())
    return out


def redrawn_ports(flow: list[bytes], rng: np.random.Generator) -> list[bytes]:
    """Every port of the flow mapped to a random one, the same port to the same one, so the two
    directions still agree."""
    new: dict[int, int] = {}
    out = []
    for pkt in flow:
        t = transport(pkt)
        if t is None or t[0] not in (TCP, UDP) or len(pkt) < t[1] + 4:
            out.append(pkt)
            continue
        off = t[1]
        b = bytearray(pkt)
        for at in (off, off + 2):
            port = int.from_bytes(b[at:at + 2], "big")
            new.setdefault(port, int(rng.integers(1024, 65536)))
            b[at:at + 2] = new[port].to_bytes(2, "big")
        out.append(bytes(b))
    return out


def synthesize(ds: Dataset, rows: np.ndarray, seed: int = 0) -> Dataset:
    """One synthetic outlier per flow of `rows` (training rows), each made by one of `KINDS`
    drawn at random; unlabelled, built with `ds`'s settings."""
    rng = np.random.default_rng(seed)
    k = ds.settings["ready_packets"]
    masked = "ports" in ds.settings["preprocessing"]["extra_masks"]
    kinds = tuple(kind for kind in KINDS if not (kind == "ports" and masked)
                  and not (kind == "splice" and k < 2))
    rows = np.asarray(rows)
    other = {c: rows[ds.labels[rows] != c] for c in np.unique(ds.labels[rows])}
    flows, sides = [], []
    for i in rows:
        flow, side = ds.flows[i], ds.sides[i]
        kind = kinds[rng.integers(len(kinds))]
        if kind == "splice" and len(other[ds.labels[i]]):
            j = other[ds.labels[i]][rng.integers(len(other[ds.labels[i]]))]
            cut = max(1, len(flow) // 2)
            take = slice(cut, None) if len(ds.flows[j]) > cut else slice(-1, None)
            flow, side = (flow[:cut] + ds.flows[j][take])[:k], (side[:cut] + ds.sides[j][take])[:k]
        elif kind == "ports":
            flow = redrawn_ports(flow, rng)
        else:
            flow = shuffled_payload(flow, rng)
        flows.append(flow)
        sides.append(side)
    n = len(flows)
    return Dataset(flows, sides, np.full(n, -1, np.int16), ds.classes, np.zeros(n, np.int32),
                   ["synthetic"], np.zeros(n), ds.settings, {"synthetic_from": n})
