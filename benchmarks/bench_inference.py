"""CPU inference throughput (flows/s) of the encoder's classifier at sequence length 128.

For each preset, the daemon's path (prepare_for_inference: eval, frozen, fp32 since issue 12, or
dynamic int8 Linear layers with --int8; predict_logits: length-sorted, padding-trimmed batches;
[CLS]-only last block) against
the same weights in eager fp32 without any of it (full forward at every position, batches of
256 padded to 128), measured alternately in the same process so that load from other
processes hits both alike. Two inputs: every flow filling all 128 positions (the headline:
nothing to trim) and a mix of lengths 16..128 (what padding-aware batching is for).

Batch independence: the largest change of any class probability of 16 flows between classifying
each alone and inside the whole batch (dynamic int8 takes one activation scale per batch, so
its results move with the batch-mates; fp32 only by rounding).

Besides wall-clock flows/s, flows per CPU-second of this process: with --threads 1 that is
the rate on one dedicated core even while other processes compete for the CPU (a shared
machine), since time spent waiting for a core is not counted.

    python benchmarks/bench_inference.py [--presets tiny,mini,small,paper] [--threads 2] [--int8]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

from flagd.infer import predict_logits, prepare_for_inference
from flagd.model import FlagEncoder, ModelConfig
from flagd.phrases import CLS, EOS, NUM_SPECIAL, PAD, SEP

T = 128
DEFAULT_FLOWS = {"tiny": 4096, "mini": 2048, "small": 1024, "paper": 64}


def make_flows(n: int, vocab_size: int, lengths: str, seed: int = 0) -> torch.Tensor:
    """[CLS] phrases with a [SEP] every 40 (packets) [EOS], then PAD."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(NUM_SPECIAL, vocab_size, (n, T), generator=g)
    ids[:, 40::40] = SEP
    if lengths == "full":
        L = torch.full((n,), T)
    else:
        L = torch.randint(16, T + 1, (n,), generator=g)
    ids[torch.arange(T)[None, :] >= L[:, None]] = PAD
    ids[:, 0] = CLS
    ids[torch.arange(n), L - 1] = EOS
    return ids


def eager_fp32(model: FlagEncoder, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The baseline: plain forward at every position, padded batches, no quantisation."""
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            h = model.encode(ids[i : i + batch_size])  # (B, T, C)
            out.append(model.classifier(torch.tanh(model.pooler(h[:, 0]))))
    return torch.cat(out)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """Wall seconds, CPU seconds of this process (all its threads) and the result."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def bench(name: str, args: argparse.Namespace) -> None:
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: type(getattr(ModelConfig, k, 0))(v) for k, v in overrides.items()}
    cfg = ModelConfig.preset(name, vocab_size=args.vocab_size, n_classes=12, **overrides)
    torch.manual_seed(0)
    model = FlagEncoder(cfg).eval()
    # the very same weights, prepared the daemon's way
    fast = prepare_for_inference(copy.deepcopy(model), quantize=args.int8)
    params = sum(p.numel() for p in model.parameters())
    n = args.flows or DEFAULT_FLOWS.get(name, 1024)
    print(
        f"\n{name}: {cfg.n_layer} layers x {cfg.n_embd} hidden, {cfg.n_head} heads, "
        f"MLP x{cfg.mlp_ratio}, {params / 1e6:.2f} M parameters (vocab {cfg.vocab_size}), "
        f"{n} flows"
    )
    for lengths in ("full", "mixed"):
        ids = make_flows(n, cfg.vocab_size, lengths)
        eager_fp32(model, ids[:64]), predict_logits(fast, ids[:64])  # warm-up
        base_s, fast_s, base_c, fast_c = [], [], [], []
        for _ in range(args.repeats):  # alternate, so a busy moment hits both
            dt, ct, ref = timed(lambda ids=ids: eager_fp32(model, ids))
            base_s.append(dt), base_c.append(ct)
            dt, ct, got = timed(lambda ids=ids: predict_logits(fast, ids, batch_size=args.batch))
            fast_s.append(dt), fast_c.append(ct)
        base, opt = n / statistics.median(base_s), n / statistics.median(fast_s)
        base_cpu, opt_cpu = n / statistics.median(base_c), n / statistics.median(fast_c)
        diff = (got - ref).abs().max().item()
        probs = torch.softmax(got, -1)
        alone = torch.cat([torch.softmax(predict_logits(fast, ids[i:i + 1]), -1) for i in range(16)])
        moved = (alone - probs[:16]).abs().max().item()
        print(
            f"  {lengths:>5} length {'128' if lengths == 'full' else '16..128'}: "
            f"optimised {opt:8.1f} flows/s ({opt_cpu:7.1f} per CPU-s)   "
            f"eager fp32 {base:8.1f} flows/s ({base_cpu:7.1f} per CPU-s)   "
            f"x{opt / base:.2f}   max |logit diff| {diff:.1e}   alone vs batch {moved:.1e}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="tiny,mini,small,paper")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--flows", type=int, default=None, help="flows per measurement")
    p.add_argument("--batch", type=int, default=256, help="optimised path's batch size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--int8", action="store_true", help="optimised path with dynamic int8 "
                   "(batch-dependent: the daemon's path before issue 12)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. mlp_ratio=2")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("machine:", machine(f"torch {torch.__version__}", f"{torch.get_num_threads()} threads",
                              f"load {os.getloadavg()[0]:.2f}"))
    for name in args.presets.split(","):
        bench(name, args)
    print("\nload at the end:", f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
