"""Pre-training throughput (phrases/s) for each preset on this machine's device.

The loop measured is flagd.train.pretrain itself (dynamic masking, padding trimmed per
batch, masked-phrase logits only at the chosen positions, AdamW, gradient clipping). The
baseline, in the same process on the same data: a plain loop that computes logits over the
whole vocabulary at every position and lets cross_entropy ignore the unchosen ones.
Flows fill all 128 positions ("full") or have lengths 16..128 ("mixed"). Rates per wall
second and per CPU second of this process (with --threads 1: one dedicated core's rate even
on a busy shared machine).

    python benchmarks/bench_train.py [--presets tiny,small,paper] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_inference import make_flows
from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

from flagd.model import FlagEncoder, ModelConfig
from flagd.phrases import NUM_SPECIAL
from flagd.train import mask_tokens, pick_device, pretrain

SETUP = {"tiny": (32, 20), "small": (32, 8), "paper": (8, 3)}  # batch size, steps


def plain_loop(cfg: ModelConfig, data: torch.Tensor, batch: int, steps: int) -> int:
    """The textbook loop: full (B, T, V) logits, no trimming. Returns phrases trained on."""
    torch.manual_seed(0)
    device = pick_device()
    model = FlagEncoder(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    phrases = 0
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
    return phrases


def pretrain_loop(cfg: ModelConfig, data: torch.Tensor, batch: int, steps: int) -> int:
    """flagd.train.pretrain on the same data. Returns phrases trained on."""
    with tempfile.TemporaryDirectory() as run:
        out = pretrain(
            np.asarray(data[2:]), np.asarray(data[:2]), cfg, Path(run), steps=steps,
            batch_size=batch, progress=False, eval_every=steps,
        )  # fmt: skip
    # validation runs on 2 flows only: negligible next to the training steps
    return round(out["phrases_per_s"] * out["seconds"])


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """Phrases per wall second and per CPU second of this process."""
    t, c = time.perf_counter(), time.process_time()
    phrases = fn()
    return phrases / (time.perf_counter() - t), phrases / (time.process_time() - c)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="tiny,small,paper")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("machine:", machine(f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"),
          "| device:", pick_device())
    for name in args.presets.split(","):
        batch, steps = SETUP[name]
        cfg = ModelConfig.preset(name, vocab_size=args.vocab_size)
        params = sum(p.numel() for p in FlagEncoder(cfg).parameters())
        print(f"\n{name} ({params / 1e6:.2f} M parameters), batch {batch}, {steps} steps")
        for lengths in ("full", "mixed"):
            data = make_flows(batch * (steps + 1), cfg.vocab_size, lengths)
            plain_loop(cfg, data, batch, 1)  # warm-up

            base, base_cpu = timed(partial(plain_loop, cfg, data, batch, steps))
            opt, opt_cpu = timed(partial(pretrain_loop, cfg, data, batch, steps))
            print(
                f"  {lengths:>5}: pretrain {opt:9,.0f} phrases/s ({opt_cpu:9,.0f} per CPU-s)   "
                f"plain loop {base:9,.0f} phrases/s ({base_cpu:9,.0f} per CPU-s)   "
                f"x{opt / base:.2f}"
            )
    print("\nload at the end:", f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
