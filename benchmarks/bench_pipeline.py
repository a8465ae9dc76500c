"""The whole pipeline with a real model: classified flows/s, and ready-to-event latency.

Runs `Pipeline` (file source -> flows -> batcher -> worker -> events) in this process on a
generated capture of TLS-like conversations, with the shipped model by default:

  throughput  every flow classified as fast as possible (--speed max), for batch sizes 1
              (no batching: the baseline) and 64, 256; classified flows/s and the ratio, and
              flows per CPU-second of this process (all its threads): on a shared machine the
              wall-clock rate measures the neighbours too, while 2 dedicated cores give at
              least the per-CPU-second rate (more where the stages overlap);
  latency     the same capture replayed at a moderate, steady flow rate, for several batching
              delays: p50/p99 from a flow becoming ready to its classification event written.

    python benchmarks/bench_pipeline.py [--model DIR] [--device cpu|cuda] [--flows 4000]
        [--latency-seconds 10 (0: throughput only)]

With --device cuda (a GPU machine) the worker runs the model in bf16 on the GPU.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

from flagd.frames import LINKTYPE_ETHERNET  # noqa: E402
from flagd.infer import Bundle, default_model  # noqa: E402
from flagd.pipeline import Pipeline, PipelineSettings  # noqa: E402
from flagd.sinks import RecentEvents  # noqa: E402
from flagd.source import FileSource  # noqa: E402
from tests import crafted  # noqa: E402


def tls_capture(path: Path, n_flows: int, flows_per_s: float, seed: int = 0) -> Path:
    """n_flows TCP conversations (8 data packets each, both ways), starting flows_per_s apart."""
    rng = random.Random(seed)
    eth = bytes.fromhex("020000000002020000000001") + b"\x08\x00"
    recs = []
    for i in range(n_flows):
        t = 1_700_000_000 + i / flows_per_s
        c, s = bytes([198, 51, 100, 1 + i % 200]), bytes([203, 0, 113, 1 + (i // 200) % 200])
        cp, sp = 20000 + i % 40000, rng.choice((443, 8443, 993, 5223))
        for k in range(8):
            fwd = k % 2 == 0
            body = bytes([0x17, 3, 3]) + rng.randbytes(rng.randrange(40, 400))
            tcp = struct.pack("!HHIIBBHHH", cp if fwd else sp, sp if fwd else cp, k, k, 0x50, 0x18,
                              65535, 0, 0)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(body), 0, 0x4000, 64, 6,
                             0, c if fwd else s, s if fwd else c)
            recs.append(crafted.Record(t + k * 0.002, eth + ip + tcp + body))
    recs.sort(key=lambda r: r.ts)
    return crafted.write_pcap(path, recs, LINKTYPE_ETHERNET)


class NullSink:
    def write(self, event: dict) -> None:
        pass

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


def run(path: Path, bundle: Bundle, batch_size: int, delay_ms: float, speed: float | None) -> Pipeline:
    settings = PipelineSettings(flows=bundle.settings, batch_size=batch_size,
                                batch_delay=delay_ms / 1000, stats_interval=0)
    pipe = Pipeline(FileSource(str(path), speed), bundle, [NullSink(), RecentEvents()], settings)
    pipe.run()
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=default_model())
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--flows", type=int, default=4000, help="flows in the throughput capture")
    ap.add_argument("--rate", type=float, default=100, help="flows/s of the latency run")
    ap.add_argument("--latency-seconds", type=float, default=10)
    a = ap.parse_args()
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_pipeline: --device cuda but no CUDA device is available here")
    bundle = Bundle.load(a.model, device=a.device)
    print("machine:", machine(f"model {bundle.name} on {bundle.device}"))
    with tempfile.TemporaryDirectory(prefix="flagd-bench-") as tmp:
        cap = tls_capture(Path(tmp) / "flows.pcap", a.flows, flows_per_s=1000)
        rates = {}
        for bs in (1, 64, 256):
            t0, c0 = time.perf_counter(), time.process_time()
            pipe = run(cap, bundle, bs, 20, None)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert pipe.counters.classified == a.flows, pipe.counters
            rates[bs] = a.flows / wall
            print(f"throughput batch {bs:4d}: {rates[bs]:8,.0f} classified flows/s "
                  f"({wall:.2f} s for {a.flows} flows), {a.flows / cpu:8,.0f} per CPU-s "
                  f"(load {os.getloadavg()[0]:.1f})")
        print(f"ratio batch 256 / batch 1: {rates[256] / rates[1]:.1f}x")
        if a.latency_seconds <= 0:
            return

        n = int(a.rate * a.latency_seconds)
        cap = tls_capture(Path(tmp) / "steady.pcap", n, flows_per_s=a.rate, seed=1)
        print(f"latency at {a.rate:.0f} flows/s (real-time replay, {n} flows):")
        for delay in (0, 5, 20, 50):
            pipe = run(cap, bundle, 64, delay, 1.0)
            lat = np.array(pipe.latencies) * 1000
            print(f"  batch delay {delay:3d} ms: p50 {np.percentile(lat, 50):6.1f} ms  "
                  f"p99 {np.percentile(lat, 99):6.1f} ms  ({len(lat)} flows, "
                  f"{pipe.counters.batches} batches)")


if __name__ == "__main__":
    main()
