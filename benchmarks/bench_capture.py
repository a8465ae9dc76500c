"""Live capture throughput: the highest lossless packet rate, TPACKET_V3 ring against a plain socket.

Layout (tests/netns.py, root_end=True): the capture reads veth end `a` in this process; a
generator in the namespace of end `b` blasts minimal 60-byte UDP frames at a fixed rate. The
generator is a PACKET_TX_RING socket with PACKET_QDISC_BYPASS: frames are built once in the
mapped ring and each send() transmits a whole batch, so Python costs nothing per packet and one
core pushes well over a million frames a second. Frames go to a MAC that is not ours, so the IP
stack drops them at once (PACKET_OTHERHOST) and nothing answers; the capture still sees them.

For each capture mode the rate ramps up until a trial loses packets (kernel drops, or fewer
frames delivered than sent), then the best lossless rate is printed with the ratio ring/socket.
With flagd.packets.decode available, a third mode also decodes every batch.

    python benchmarks/bench_capture.py [--seconds 1.5] [--max-rate 3000000]
    (needs root; the generator mode `--gen IFACE RATE SECONDS` is what the benchmark runs itself)
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.netns, the namespace harness

SOL_PACKET = 263
PACKET_TX_RING = 13
PACKET_VERSION = 10
PACKET_QDISC_BYPASS = 20
TPACKET_V2 = 1
TP_STATUS_SEND_REQUEST = 1
FRAME = 128  # TX ring slot: 32-byte tpacket2_hdr, then the frame
BATCH = 256  # frames per send()


def udp_frame(sport: int) -> bytes:
    """A 60-byte Ethernet/IPv4/UDP frame 198.51.100.2 -> .1:9 to a MAC that is nobody's."""
    payload = bytes(18)
    udp = struct.pack("!HHHH", sport, 9, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes([198, 51, 100, 2]), bytes([198, 51, 100, 1]))  # fmt: skip
    csum = sum(struct.unpack("!10H", ip))
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    ip = ip[:10] + struct.pack("!H", csum) + ip[12:]
    return bytes.fromhex("0200000000990200000000980800") + ip + udp


def generate(iface: str, rate: float, seconds: float, limit: int = 0) -> None:
    """Send `rate` frames/s (0: as fast as possible) for `seconds` or `limit` frames."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
    sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    blocks = BATCH * FRAME // mmap.PAGESIZE
    sock.setsockopt(
        SOL_PACKET, PACKET_TX_RING, struct.pack("4I", mmap.PAGESIZE, blocks, FRAME, BATCH)
    )
    ring = mmap.mmap(sock.fileno(), BATCH * FRAME)
    sock.bind((iface, 0))
    buf = np.frombuffer(ring, np.uint8)
    for i in range(BATCH):
        frame = udp_frame(1024 + i % 64)  # 64 flows
        struct.pack_into("II", ring, i * FRAME, 0, len(frame))  # status, tp_len
        ring[i * FRAME + 32 : i * FRAME + 32 + len(frame)] = frame
    status = buf.view(np.uint32)[:: FRAME // 4]
    sent, start = 0, time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end and not (limit and sent >= limit):
        if rate and sent > (now - start) * rate:
            time.sleep(min(sent / rate - (now - start), 0.001))
            continue
        status[:] = TP_STATUS_SEND_REQUEST  # hand all frames to the kernel
        sock.send(b"")  # blocks until the whole batch is on the wire
        sent += BATCH
    elapsed = time.perf_counter() - start
    del status, buf
    ring.close()
    sock.close()
    print(json.dumps({"sent": sent, "seconds": elapsed}), flush=True)


def trial(pair, mode: str, rate: float, seconds: float) -> dict:
    """One run at `rate`: capture in this process while the generator sends."""
    from flagd.capture import open_capture

    if mode.startswith("workers"):
        return trial_workers(pair, int(mode.split("=")[1]), rate, seconds)
    decode = table = None
    if mode in ("ring+decode", "ring+flows"):
        from flagd.packets import decode
    if mode == "ring+flows":
        from flagd.flows import FlowTable

        table = FlowTable()
    got = 0
    with open_capture(pair.a.ifname, ring=mode != "socket") as cap:
        gen = pair.popen(
            pair.b,
            [sys.executable, __file__, "--gen", pair.b.ifname, str(rate), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        t0 = time.perf_counter()
        while gen.poll() is None:
            frames = cap.read(0.05)
            got += len(frames)
            if decode is not None and len(frames):
                p = decode(frames)
                if table is not None:
                    table.add(p)
        busy_until = time.perf_counter()
        quiet = time.perf_counter()
        while time.perf_counter() - quiet < 0.2:  # blocks still in flight
            frames = cap.read(0.05)
            if len(frames):
                got += len(frames)
                quiet = time.perf_counter()
        stats = cap.stats()
    out = json.loads(gen.stdout.read())
    return {
        "mode": mode,
        "target": rate,
        "sent_rate": out["sent"] / out["seconds"],
        "sent": out["sent"],
        "got": got,
        "dropped": stats.dropped,
        "lossless": stats.dropped == 0 and got >= out["sent"],
        "wall": busy_until - t0,
    }


def trial_workers(pair, n: int, rate: float, seconds: float) -> dict:
    """One run with `n` capture processes in a fanout group, each decoding into its own flow
    table (flagd run --workers n without inference); packets counted by the flow tables."""
    import threading

    from flagd.flows import FlowSettings
    from flagd.source import FanoutSource

    src = FanoutSource(pair.a.ifname, n, FlowSettings())
    stop = threading.Event()
    consumer = threading.Thread(target=lambda: [None for _ in src.batches(stop)])
    consumer.start()
    gen = pair.popen(pair.b, [sys.executable, __file__, "--gen", pair.b.ifname, str(rate), str(seconds)],
                     stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    gen.wait()
    busy_until = time.perf_counter()
    time.sleep(0.3)
    stop.set()
    consumer.join()
    counters = src.group.snapshot()
    got, dropped = counters.flows.packets, counters.kernel_drops
    src.close()
    out = json.loads(gen.stdout.read())
    return {"mode": f"workers={n}", "target": rate, "sent_rate": out["sent"] / out["seconds"],
            "sent": out["sent"], "got": got, "dropped": dropped,
            "lossless": dropped == 0 and got >= out["sent"], "wall": busy_until - t0}


def ramp(pair, mode: str, seconds: float, ceiling: float, start: float) -> tuple[float, bool]:
    """(highest lossless rate, whether the generator rather than the capture was the limit).

    The rate grows by 1.25x while lossless, then three bisection steps between the last good and
    the first lossy rate; a ramp that reaches the generator's ceiling ends with a flat-out run.
    """

    def run(rate: float) -> dict:
        r = trial(pair, mode, rate, seconds)
        print(f"  {mode:12s} target {rate or float('inf'):>10,.0f}/s  sent {r['sent_rate']:>10,.0f}/s  "
              f"got {r['got']:>9,} of {r['sent']:>9,}  kernel drops {r['dropped']:>8,}  "
              f"{'ok' if r['lossless'] else 'LOSS'}", flush=True)  # fmt: skip
        return r

    best, rate, bad = 0.0, start, None
    while rate < ceiling:
        r = run(rate)
        if not r["lossless"]:
            bad = rate
            break
        best = max(best, r["sent_rate"])
        rate *= 1.25
    if bad is None:
        r = run(0)  # flat out
        if r["lossless"]:
            return max(best, r["sent_rate"]), True
        bad = r["sent_rate"]
    lo = best
    for _ in range(3):
        mid = (lo + bad) / 2
        r = run(mid)
        if r["lossless"]:
            best = lo = max(best, r["sent_rate"])
        else:
            bad = mid
    return best, False


def drain_cost(pair, mode: str, count: int) -> float:
    """Microseconds of this process per packet to empty a backlog of `count` queued frames.

    The generator fills the ring (or socket buffer) while nobody reads; then the reads are
    timed alone, so the figure is the capture's own cost, free of the generator's CPU share.
    """
    from flagd.capture import open_capture

    with open_capture(pair.a.ifname, ring=mode == "ring", block_count=96) as cap:
        gen = pair.popen(
            pair.b,
            [
                sys.executable,
                __file__,
                "--gen",
                pair.b.ifname,
                "0",
                str(count / 200_000),
                str(count),
            ],
            stdout=subprocess.PIPE,
        )
        gen.wait()
        time.sleep(0.05)  # the last block retires
        got, t0 = 0, time.perf_counter()
        while frames := cap.read(0):
            got += len(frames)
        elapsed = time.perf_counter() - t0
        st = cap.stats()
    if st.dropped or got < count:
        raise RuntimeError(
            f"{mode}: backlog of {count} did not fit ({got} read, {st.dropped} dropped)"
        )
    return elapsed / got * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.5, help="length of each trial")
    p.add_argument("--start", type=float, default=100_000, help="first rate of each ramp")
    p.add_argument(
        "--max-rate", type=float, default=0, help="stop ramps here (0: generator ceiling)"
    )
    p.add_argument("--modes", help="comma-separated subset of: ring, ring+decode, ring+flows, "
                   "workers=1, workers=2, socket")
    p.add_argument("--gen", nargs="+", metavar="IFACE RATE SECONDS [LIMIT]", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.gen:
        generate(a.gen[0], float(a.gen[1]), float(a.gen[2]), int(a.gen[3]) if len(a.gen) > 3 else 0)
        return
    from tests.netns import netns_unavailable, veth_pair

    if reason := netns_unavailable():
        sys.exit(f"bench_capture: {reason}")
    print(f"machine: {machine()}")
    print("generator: PACKET_TX_RING + PACKET_QDISC_BYPASS, 60-byte UDP frames, 256 per send()")
    modes = ["ring", "socket"]
    try:
        from flagd.frames import Frames
        from flagd.packets import decode

        decode(Frames.empty())
        modes[1:1] = ["ring+decode", "ring+flows", "workers=1", "workers=2"]
    except (ImportError, NotImplementedError):
        print("flagd.packets.decode not available yet: capture only")
    if a.modes:
        modes = a.modes.split(",")
    with veth_pair(root_end=True) as pair:
        ceiling = trial(pair, "ring", 0, a.seconds)["sent_rate"]
        print(f"generator ceiling while the ring capture reads: {ceiling:,.0f} frames/s")
        top = min(ceiling, a.max_rate) if a.max_rate else ceiling
        best, capped = {}, {}
        for mode in modes:
            best[mode], capped[mode] = ramp(pair, mode, a.seconds, top, a.start)
        both = "ring" in modes and "socket" in modes
        cost = {
            mode: drain_cost(pair, mode, n) for mode, n in (("ring", 400_000), ("socket", 40_000))
        } if both else {}
    print()
    for mode in modes:
        note = "  (generator-bound: a lower bound)" if capped[mode] else ""
        print(f"{mode:12s} highest lossless rate: {best[mode]:>10,.0f} packets/s{note}")
    if "workers=1" in best and "workers=2" in best:
        print(f"scaling workers=2 / workers=1 (lossless rate): "
              f"{best['workers=2'] / max(best['workers=1'], 1):.2f}x on {os.cpu_count()} cores")
    if not both:
        return
    print(
        f"ratio ring / plain socket (lossless rate): {best['ring'] / max(best['socket'], 1):.2f}x"
    )
    for mode in ("ring", "socket"):
        print(
            f"{mode:12s} reader cost on a backlog: {cost[mode]:.3f} us/packet = {1e6 / cost[mode]:,.0f} packets/s of one core"
        )
    print(f"ratio ring / plain socket (reader cost): {cost['socket'] / cost['ring']:.2f}x")


if __name__ == "__main__":
    main()
