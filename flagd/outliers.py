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
from flagd.frames import LINKTYPE_RAW, Frames
from flagd.packets import Skip, decode
from flagd.preprocess import TCP, UDP

KINDS = ("payload", "ports", "splice")


def headers(flow: list[bytes]) -> list[tuple[int, int] | None]:
    """Per packet of a flow's model bytes (raw IP packets, read by flagd's own decoder): where
    its TCP or UDP header starts and where its payload starts, or None for any other packet."""
    if not flow:
        return []
    p = decode(Frames.from_records([(0.0, pkt, len(pkt), LINKTYPE_RAW) for pkt in flow]))
    out: list[tuple[int, int] | None] = []
    for i in range(len(flow)):
        if p.skip[i] != Skip.OK or p.proto[i] not in (TCP, UDP):
            out.append(None)
            continue
        l4 = int(p.l4_off[i] - p.frames.offset[i])
        # the model sees UDP's 8-byte header padded to a TCP header's 20 (preprocess.UDP_PAD)
        out.append((l4, l4 + (20 if p.proto[i] == UDP else int(p.l4_hdr_len[i]))))
    return out


def shuffled_payload(flow: list[bytes], rng: np.random.Generator) -> list[bytes]:
    out = []
    for pkt, h in zip(flow, headers(flow), strict=True):
        if h is None or h[1] >= len(pkt):
            out.append(pkt)
            continue
        tail = np.frombuffer(pkt, np.uint8)[h[1]:].copy()
        rng.shuffle(tail)
        out.append(pkt[:h[1]] + tail.tobytes())
    return out


def redrawn_ports(flow: list[bytes], rng: np.random.Generator) -> list[bytes]:
    """Every port of the flow mapped to a random one, the same port to the same one, so the two
    directions still agree."""
    new: dict[int, int] = {}
    out = []
    for pkt, h in zip(flow, headers(flow), strict=True):
        if h is None:  # the decoder read the ports, so they are there
            out.append(pkt)
            continue
        b = bytearray(pkt)
        for at in (h[0], h[0] + 2):
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
