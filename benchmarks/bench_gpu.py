"""GPU inference throughput (flows/s) at batch 256, length 128, bf16 autocast, per preset.

Against the same weights in fp32 on the same GPU (ratio), and against the paper's own figure:
0.062 s per flow on a GTX 1080 Ti (about 16 flows/s). Exits with status 2 and a message when
no CUDA device is present.

    python benchmarks/bench_gpu.py [--presets tiny,small,paper] [--batches 20]
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_inference import make_flows

from flagd.model import FlagEncoder, ModelConfig

PAPER_S_PER_FLOW = 0.062  # FLAG paper, GTX 1080 Ti


def flows_per_s(model: FlagEncoder, ids: torch.Tensor, batches: int, bf16: bool) -> float:
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), ctx:
        for _ in range(3):  # warm-up: kernels chosen, memory pooled
            model.classify(ids)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batches):
            model.classify(ids)
        end.record()
        torch.cuda.synchronize()
    return batches * len(ids) / (start.elapsed_time(end) / 1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="tiny,small,paper")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); nothing to run")
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(
        f"machine: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; batch {args.batch}, length 128"
    )
    paper = 1 / PAPER_S_PER_FLOW
    for name in args.presets.split(","):
        cfg = ModelConfig.preset(name, vocab_size=args.vocab_size, n_classes=12)
        torch.manual_seed(0)
        model = FlagEncoder(cfg).to(dev).eval().requires_grad_(False)
        ids = make_flows(args.batch, cfg.vocab_size, "full").to(dev)
        bf16 = flows_per_s(model, ids, args.batches, bf16=True)
        fp32 = flows_per_s(model, ids, args.batches, bf16=False)
        print(
            f"{name:>6}: bf16 {bf16:10,.0f} flows/s ({1e3 / bf16:.3f} ms/flow)   "
            f"fp32 {fp32:10,.0f} flows/s   x{bf16 / fp32:.2f}   "
            f"vs paper's {paper:.0f} flows/s: x{bf16 / paper:,.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
