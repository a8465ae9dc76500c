"""Pre-training throughput (phrases/s) for each preset on this machine's device.

The loop measured is flagd.train.pretrain itself (dynamic masking, padding trimmed per
batch, masked-phrase logits only at the chosen positions, AdamW, gradient clipping). The
baseline, in the same process on the same data: a plain loop that computes logits over the
whole vocabulary at every position and lets cross_entropy ignore the unchosen ones.
Flows fill all 128 positions ("full") or have lengths 16..128 ("mixed").

    python benchmarks/bench_train.py [--presets tiny,small,paper] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_inference import machine, make_flows

from flagd.model import FlagEncoder, ModelConfig
from flagd.phrases import NUM_SPECIAL
from flagd.train import mask_tokens, pick_device, pretrain

SETUP = {"tiny": (32, 20), "small": (32, 8), "paper": (8, 3)}  # batch size, steps


def plain_loop(cfg: ModelConfig, data: torch.Tensor, batch: int, steps: int) -> float:
    """Phrases/s of the textbook loop: full (B, T, V) logits, no trimming."""
    torch.manual_seed(0)
    device = pick_device()
    model = FlagEncoder(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    phrases, t = 0, time.perf_counter()
    for s in range(steps):
        ids = data[(s * batch) % len(data) :][:batch]
        inputs, targets = mask_tokens(ids, cfg.vocab_size, g)
        logits, _ = model(inputs.to(device))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        phrases += int((ids >= NUM_SPECIAL).sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return phrases / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="tiny,small,paper")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("machine:", machine(), "| device:", pick_device())
    for name in args.presets.split(","):
        batch, steps = SETUP[name]
        cfg = ModelConfig.preset(name, vocab_size=args.vocab_size)
        params = sum(p.numel() for p in FlagEncoder(cfg).parameters())
        print(f"\n{name} ({params / 1e6:.2f} M parameters), batch {batch}, {steps} steps")
        for lengths in ("full", "mixed"):
            data = make_flows(batch * (steps + 1), cfg.vocab_size, lengths)
            plain_loop(cfg, data, batch, 1)  # warm-up
            base = plain_loop(cfg, data, batch, steps)
            with tempfile.TemporaryDirectory() as run:
                out = pretrain(
                    np.asarray(data[batch:]), np.asarray(data[:batch]), cfg, Path(run),
                    steps=steps, batch_size=batch, progress=False, eval_every=steps,
                )  # fmt: skip
            ours = out["phrases_per_s"]  # includes one validation batch at the end
            print(
                f"  {lengths:>5}: pretrain {ours:9,.0f} phrases/s   plain loop {base:9,.0f} "
                f"phrases/s   x{ours / base:.2f}"
            )
    print("\nload at the end:", f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
