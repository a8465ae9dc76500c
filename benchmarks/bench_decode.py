"""Throughput of flagd's capture reading and decoding against scapy on the same capture.

Generates a pcap of small TCP/UDP Ethernet frames over a few thousand flows in a temporary
directory, then times, in this process:

  flagd   read_capture + decode over the whole file (numpy over whole batches)
  scapy   rdpcap + per-packet dissection reading the IP/TCP/UDP fields, on a prefix

and prints packets/s for each and their ratio, with the machine it ran on.

    python benchmarks/bench_decode.py [--packets 200000] [--n-flows 4000] [--scapy-packets 5000]

The flagd chain includes the flow meter (FlowTable with default settings: the paper's
preprocessing of the first K packets of each flow, expiry, LRU bound), so the figure is read +
decode + flow assembly; `--no-flows` times read + decode alone. The scapy baseline groups its
packets into a dict by bidirectional 5-tuple, the least a flow meter does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flagd.flows import FlowTable
from flagd.frames import LINKTYPE_ETHERNET, Frames
from flagd.packets import Skip, decode
from flagd.pcapfile import read_capture

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

from tests import crafted  # noqa: E402  (the pcap writer and the traffic generator)

# A stage takes the decoded batch and the frames it came from; its result is ignored.
Stage = Callable[[object, Frames], object]
# Stages with state (a flow table) are built anew for every timed run.
StageFactory = Callable[[], Stage]


def stages(args: argparse.Namespace) -> list[tuple[str, StageFactory]]:
    """The stages run on each decoded batch after read + decode."""
    if args.no_flows:
        return []

    def flow_meter() -> Stage:
        table = FlowTable()
        return lambda p, frames: table.add(p)

    return [("flow assembly", flow_meter)]


def time_flagd(path: Path, extra: list[tuple[str, StageFactory]], repeat: int) -> tuple[int, float, float]:
    """(packets, best seconds for read alone, best seconds for read + decode + extra stages)."""
    best_read = best_all = float("inf")
    n = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _frames in read_capture(path):
            pass
        best_read = min(best_read, time.perf_counter() - t0)
        run = [make() for _, make in extra]
        t0 = time.perf_counter()
        n = ok = 0
        for frames in read_capture(path):
            p = decode(frames)
            for stage in run:
                stage(p, frames)
            n += len(p)
            ok += int((p.skip == Skip.OK).sum())
        best_all = min(best_all, time.perf_counter() - t0)
        assert ok == n, "the generated traffic is all TCP/UDP"
    return n, best_read, best_all


def time_scapy(path: Path) -> tuple[int, float]:
    """rdpcap + reading the fields decode() produces, one scapy object per packet."""
    import warnings

    from scapy.layers.inet import IP, TCP, UDP
    from scapy.utils import rdpcap

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    flows: dict[tuple, list] = {}
    n = 0
    for pkt in rdpcap(str(path)):
        ip = pkt[IP]
        l4 = ip[TCP] if ip.proto == 6 else ip[UDP]
        flags = int(l4.flags) if ip.proto == 6 else 0
        a, b = (ip.src, l4.sport), (ip.dst, l4.dport)
        key = (ip.proto, *min(a, b), *max(a, b))
        flows.setdefault(key, []).append((pkt.time, flags, len(l4.payload)))
        n += 1
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=200_000, help="packets in the generated capture")
    ap.add_argument("--n-flows", type=int, default=4000, help="distinct 5-tuples in it")
    ap.add_argument("--scapy-packets", type=int, default=5000, help="prefix scapy dissects")
    ap.add_argument("--repeat", type=int, default=3, help="flagd runs; the best is reported")
    ap.add_argument("--no-flows", action="store_true", help="time read + decode only")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="flagd-bench-") as tmp:
        t0 = time.perf_counter()
        recs = crafted.benchmark_records(args.packets, args.n_flows)
        full = crafted.write_pcap(Path(tmp) / "bench.pcap", recs, LINKTYPE_ETHERNET)
        prefix = crafted.write_pcap(Path(tmp) / "prefix.pcap", recs[: args.scapy_packets],
                                    LINKTYPE_ETHERNET)  # fmt: skip
        size = full.stat().st_size
        print("machine:", machine(f"numpy {np.__version__}"))
        print(f"capture: {args.packets} packets, {args.n_flows} flows, {size / 1e6:.1f} MB "
              f"(generated in {time.perf_counter() - t0:.1f} s)")  # fmt: skip

        extra = stages(args)
        n, t_read, t_all = time_flagd(full, extra, args.repeat)
        chain = " + ".join(["read_capture", "decode", *(name for name, _ in extra)])
        flagd_rate = n / t_all
        print(f"flagd read_capture alone: {n / t_read:12,.0f} packets/s")
        print(f"flagd {chain}: {flagd_rate:12,.0f} packets/s ({t_all:.3f} s for {n})")

        m, t_scapy = time_scapy(prefix)
        scapy_rate = m / t_scapy
        print(f"scapy rdpcap + dissection: {scapy_rate:12,.0f} packets/s ({t_scapy:.3f} s for {m})")
        print(f"ratio flagd / scapy: {flagd_rate / scapy_rate:,.0f}x "
              f"(targets: >= 100x and >= 300,000 packets/s)")


if __name__ == "__main__":
    main()
