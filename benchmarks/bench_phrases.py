"""Benchmark and dictionary-size sweep for flagd.phrases (N-phrase extraction).

    python benchmarks/bench_phrases.py [--data DIR] [--no-sweep] [--repeat N]

Packets come from the ISCX VPN-nonVPN 2016 train pcaps (read in place): link layer stripped,
IP addresses zeroed, UDP header zero-padded to 20 bytes, capped at 128 bytes, grouped into
bidirectional 5-tuple flows of at most 8 packets (a stand-in for flagd.flows). Flows are split
4:1 into a fit set and a held-out set.

Prints: fit and encode throughput (MB/s of packet bytes) with ratios against plain-Python
baselines measured in the same run, per-call latency, and the m sweep (compression and phrase
coverage on held-out flows, and how much of a flow a 128-id model input holds).
"""

from __future__ import annotations

import argparse
import os
import platform
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from scapy.utils import RawPcapReader

from flagd.phrases import PhraseDict

CAP = 128  # bytes kept per packet
FLOW_PACKETS = 8  # packets kept per flow
MAX_LEN = 128  # model input length for the daemon-shaped figures
SWEEP = (256, 1024, 4096, 8192, 16384, 32768)
HIDDEN = 256  # a 'small' model's embedding width, for the embedding-size column


def preprocess(frame: bytes, linktype: int) -> tuple[tuple, bytes] | None:
    """(direction-free flow key, preprocessed IP packet) or None for non-TCP/UDP frames."""
    if linktype == 1:  # Ethernet, with at most one VLAN tag
        if len(frame) < 14:
            return None
        etype, off = struct.unpack_from("!H", frame, 12)[0], 14
        if etype == 0x8100 and len(frame) >= 18:
            etype, off = struct.unpack_from("!H", frame, 16)[0], 18
        if etype not in (0x0800, 0x86DD):
            return None
        ip = bytearray(frame[off:])
    elif linktype == 101:
        ip = bytearray(frame)
    else:
        return None
    if len(ip) >= 20 and ip[0] >> 4 == 4:
        hl, proto, addr = (ip[0] & 15) * 4, ip[9], slice(12, 20)
    elif len(ip) >= 40 and ip[0] >> 4 == 6:
        hl, proto, addr = 40, ip[6], slice(8, 40)
    else:
        return None
    if proto not in (6, 17) or len(ip) < hl + 4:
        return None
    a = bytes(ip[addr])
    ends = sorted((a[: len(a) // 2] + ip[hl : hl + 2], a[len(a) // 2 :] + ip[hl + 2 : hl + 4]))
    ip[addr] = bytes(addr.stop - addr.start)
    if proto == 17:  # UDP header zero-padded to the 20 bytes of a TCP header
        ip[hl + 8 : hl + 8] = bytes(12)
    return (proto, *ends), bytes(ip[:CAP])


def load_flows(root: Path) -> list[list[bytes]]:
    """Flows (first FLOW_PACKETS packets each) from every train/<class>/*.pcap, in file order."""
    flows: dict[tuple, list[bytes]] = {}
    for pcap in sorted(root.glob("*/*.pcap")):
        reader = RawPcapReader(str(pcap))
        for frame, _ in reader:
            got = preprocess(frame, reader.linktype)
            if got is not None:
                packets = flows.setdefault((pcap.parent.name, *got[0]), [])
                if len(packets) < FLOW_PACKETS:
                    packets.append(got[1])
        reader.close()
    return list(flows.values())


def reference_fit_counts(packets: list[bytes]) -> Counter:
    """Plain-Python 2/3-gram counting: the baseline for fit throughput."""
    counts: Counter = Counter()
    for p in packets:
        counts.update(p[i : i + 2] for i in range(len(p) - 1))
        counts.update(p[i : i + 3] for i in range(len(p) - 2))
    return counts


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def in_order_shares(need: list[int], budget: int) -> list[int]:
    """The sequential rule (unused share passed on to later packets only), for comparison."""
    out = []
    for i, n in enumerate(need):
        out.append(min(n, budget // (len(need) - i)))
        budget -= out[-1]
    return out


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" numpy {np.__version__}, {platform.system()} {platform.release()}"
    )


def main() -> int:
    default = Path(
        os.environ.get("FLAGD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default, help="shared data folder")
    ap.add_argument("--no-sweep", action="store_true", help="skip the dictionary-size sweep")
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats (best is reported)")
    args = ap.parse_args()
    root = args.data / "iscx-vpn2016" / "train"
    if not root.is_dir():
        print(f"no data at {root}; set FLAGD_SHARED_DATA or --data", file=sys.stderr)
        return 2

    print(f"machine: {machine()}")
    t = time.perf_counter()
    flows = load_flows(root)
    fit_flows = [f for i, f in enumerate(flows) if i % 5]
    held_flows = [f for i, f in enumerate(flows) if i % 5 == 0]
    fit_packets = [p for f in fit_flows for p in f]
    held_packets = [p for f in held_flows for p in f]
    packets = fit_packets + held_packets
    mb = sum(map(len, packets)) / 1e6
    print(
        f"data: {len(flows)} flows, {len(packets)} packets, {mb:.2f} MB from {root}"
        f" (loaded in {time.perf_counter() - t:.1f} s); fit {len(fit_flows)} flows,"
        f" held-out {len(held_flows)} flows"
    )

    # ---- fit -------------------------------------------------------------------------------
    m = 8192
    fit_mb = sum(map(len, fit_packets)) / 1e6
    fit_s = best_of(args.repeat, lambda: PhraseDict.fit(fit_packets, m))
    sub = fit_packets[: len(fit_packets) // 8]
    sub_mb = sum(map(len, sub)) / 1e6
    ref_fit_s = best_of(1, lambda: reference_fit_counts(sub))
    fit_rate, ref_fit_rate = fit_mb / fit_s, sub_mb / ref_fit_s
    print(
        f"\nfit m={m}: {fit_rate:6.1f} MB/s ({fit_mb:.2f} MB in {fit_s * 1e3:.0f} ms);"
        f" plain-Python Counter {ref_fit_rate:.2f} MB/s; ratio {fit_rate / ref_fit_rate:.0f}x"
    )

    # ---- encode ----------------------------------------------------------------------------
    d = PhraseDict.fit(fit_packets, m)
    ref_s = best_of(1, lambda: [d.encode_reference(p) for p in packets])
    ref_rate = mb / ref_s
    full_s = best_of(args.repeat, lambda: d.encode_packets(packets))
    daemon_s = best_of(args.repeat, lambda: d.encode_flows(flows, MAX_LEN))
    print(f"encode, {len(flows)} flows in one batch (m={m}):")
    print(f"  {'reference (plain Python, per packet)':<40}{ref_rate:6.1f} MB/s")
    for name, s in (
        ("encode_packets, every byte", full_s),
        (f"encode_flows, max_len {MAX_LEN}", daemon_s),
    ):
        print(f"  {name:<40}{mb / s:6.1f} MB/s  ratio {ref_s / s:5.1f}x")
    for batch in (64, 256):
        chunks = [flows[i : i + batch] for i in range(0, len(flows), batch)]
        s = best_of(args.repeat, lambda chunks=chunks: [d.encode_flows(c, MAX_LEN) for c in chunks])
        name = f"encode_flows, max_len {MAX_LEN}, {batch} flows/call"
        print(f"  {name:<40}{mb / s:6.1f} MB/s  ratio {ref_s / s:5.1f}x")
    mismatch = sum(
        not np.array_equal(a, d.encode_reference(p))
        for a, p in zip(d.encode_packets(packets), packets, strict=True)
    )
    print(f"  fast == reference on all {len(packets)} packets: {mismatch == 0}")

    pkt = max(packets, key=len)
    flow = max(flows, key=len)
    n = 2000
    for name, fast, ref in (
        (f"one {len(pkt)}-byte packet", lambda: d.encode(pkt), lambda: d.encode_reference(pkt)),
        (
            f"one {len(flow)}-packet flow",
            lambda: d.encode_flow(flow, MAX_LEN),
            lambda: [d.encode_reference(p) for p in flow],
        ),
    ):
        f_us = best_of(args.repeat, lambda fast=fast: [fast() for _ in range(n)]) / n * 1e6
        r_us = best_of(args.repeat, lambda ref=ref: [ref() for _ in range(n)]) / n * 1e6
        print(f"  latency, {name}: {f_us:6.1f} us (reference {r_us:6.1f} us)")

    if args.no_sweep:
        return 0

    # ---- sweep -----------------------------------------------------------------------------
    held_mb = sum(map(len, held_packets)) / 1e6
    flow_bytes = np.array([sum(map(len, f)) for f in held_flows])
    print(
        f"\nsweep: fit on {fit_mb:.2f} MB, measured on the held-out {held_mb:.2f} MB"
        f" ({len(held_flows)} flows, {flow_bytes.mean():.0f} bytes/flow on average)"
    )
    print(
        f"{'m':>6} {'vocab':>6} {'emb params':>10} {'file KB':>7} {'fit s':>6} {'tok/byte':>8}"
        f" {'2-phr':>6} {'3-phr':>6} {'tok/flow':>8} {'bytes in ' + str(MAX_LEN):>12}"
        f" {'whole flows':>11}"
    )
    for m in SWEEP:
        t = time.perf_counter()
        d = PhraseDict.bytes_only() if m == 256 else PhraseDict.fit(fit_packets, m)
        fit_s = time.perf_counter() - t
        cov = d.coverage(held_packets)
        rows, lengths = d._encode_flows(held_flows, MAX_LEN)
        seen = d.phrase_lengths(rows).sum(axis=1)  # bytes each model input holds
        tokens = np.array([sum(d.encode(p).size for p in f) + len(f) + 1 for f in held_flows])
        path = Path(f"/tmp/bench_phrases_{m}.json")
        d.save(path)
        size_kb = path.stat().st_size / 1e3
        path.unlink()
        print(
            f"{m:>6} {d.vocab_size:>6} {d.vocab_size * HIDDEN / 1e6:>9.2f}M {size_kb:>7.0f}"
            f" {fit_s:>6.2f} {cov['tokens_per_byte']:>8.3f} {cov['share_2']:>6.1%}"
            f" {cov['share_3']:>6.1%} {tokens.mean():>8.1f} {seen.sum() / flow_bytes.sum():>12.1%}"
            f" {np.mean(seen == flow_bytes):>11.1%}"
        )
        if m == 8192:  # how much the max-min fair split keeps over the in-order rule
            kept_in_order = 0
            for f in held_flows:
                enc = [d.encode(p) for p in f[: (MAX_LEN - 2) // 2]]
                need = [e.size + 1 for e in enc[:-1]] + [enc[-1].size]
                alloc = in_order_shares(need, MAX_LEN - 2)
                keep = [a - (i < len(enc) - 1) for i, a in enumerate(alloc)]
                kept_in_order += sum(
                    d.phrase_lengths(e[:k]).sum() for e, k in zip(enc, keep, strict=True)
                )
            fair_note = (
                f"        (m={m}: bytes in {MAX_LEN} ids with the in-order share rule:"
                f" {kept_in_order / flow_bytes.sum():.1%})"
            )
    print(fair_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
