"""Pre-training (masked-phrase prediction with dynamic masking) and fine-tuning loops.

The loops know the model only through its public calls: `model(ids, targets, ctx,
side_targets) -> (logits, loss)` for masked phrases (and masked side channel), `model.classify(
ids, ctx=ctx) -> (logits, _)` for classes, and the checkpoint helpers. Data comes in as int arrays
(N, T) of phrase ids and, for packet-aware models, their context (N, T, 4) from flagd.inputs.
Both loops take their optimizer steps through `_step`.

Device and dtype are chosen once (`pick_device`): CUDA with bf16 autocast when present, else
CPU in fp32. Launched under torchrun (WORLD_SIZE > 1) both loops run DistributedDataParallel,
each rank on its own shard of every epoch (DistributedSampler); only rank 0 writes files or
draws progress. Validation is sharded too and summed across ranks, so all ranks agree on
which checkpoint is best.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

from flagd.evaluate import macro_f1
from flagd.inputs import GAP_MASK, SIZE_MASK
from flagd.model import FlagEncoder, ModelConfig, make_checkpoint, trim_padding
from flagd.phrases import MASK, NUM_SPECIAL

IGNORE = -100  # target of positions the loss does not count (F.cross_entropy's ignore_index)


# ---------------------------------------------------------------------------------------------
# Dynamic masking


def mask_tokens(
    ids: torch.Tensor, vocab_size: int, generator: torch.Generator, prob: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose round(prob * phrases) positions of each row anew (at least one when the row has
    any phrase; special ids are never chosen): 80% become [MASK], 10% a random phrase, 10%
    stay. Returns (inputs, targets) as int64; targets hold the original id at chosen
    positions and IGNORE everywhere else. Pure: ids is not modified."""
    ids = ids.long()
    dev = ids.device
    special = ids < NUM_SPECIAL  # PAD, CLS, EOS, MASK, SEP and the reserved ids
    n_phrases = (~special).sum(1)  # (B,)
    # BERT's count: round, but at least one phrase per row that has any
    k = torch.minimum(torch.floor(n_phrases * prob + 0.5).clamp(min=1), n_phrases)  # (B,)
    # a uniformly random subset of size k: the k smallest random scores among the phrases
    scores = torch.rand(ids.shape, generator=generator, device=dev).masked_fill(special, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each score within its row
    chosen = rank < k[:, None]  # (B, T)
    targets = torch.where(chosen, ids, IGNORE)
    r = torch.rand(ids.shape, generator=generator, device=dev)
    random_ids = torch.randint(NUM_SPECIAL, vocab_size, ids.shape, generator=generator, device=dev)
    inputs = torch.where(chosen & (r < 0.8), MASK, ids)
    inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, targets


def mask_sides(
    ctx: torch.Tensor, generator: torch.Generator, prob: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide the size and gap of a random `prob` of each flow's packets (every id of a chosen
    packet shows the [MASK] buckets). Returns (ctx, side_targets): side_targets (B, T, 2) hold
    the true size and gap ids at the hidden positions and IGNORE elsewhere. Pure."""
    ctx = ctx.long()
    packet = ctx[..., 0]  # (B, T), 0 = no packet
    draw = torch.rand(packet.size(0), int(packet.max()) + 1 if packet.numel() else 1,
                      generator=generator,
                      device=ctx.device) < prob  # (B, P + 1)
    hidden = draw.gather(1, packet) & (packet > 0)  # (B, T)
    targets = torch.where(hidden[..., None], ctx[..., 2:], IGNORE)  # (B, T, 2)
    masked = ctx.clone()
    masked[..., 2] = torch.where(hidden, SIZE_MASK, ctx[..., 2])
    masked[..., 3] = torch.where(hidden, GAP_MASK, ctx[..., 3])
    return masked, targets


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The masking generator for one step: a pure function of (seed, step, rank), so a resumed
    run draws exactly the masks the uninterrupted run would have drawn."""
    s = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(s))


# ---------------------------------------------------------------------------------------------
# Device and distributed setup


def pick_device() -> torch.device:
    """CUDA (this process's LOCAL_RANK under torchrun) when present, else CPU."""
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA; plain fp32 on CPU (torch's bf16 is 3-4x slower on our CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class _Dist:
    """Rank and world size; joins the process group under torchrun."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            # once per process, torn down at exit: pretrain then finetune in one process (or
            # two calls) share the group, as re-creating one under torchrun's store can hang
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            atexit.register(_leave_group)
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0

    def sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (float64, on CPU)."""
        t = torch.as_tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return t


def _leave_group() -> None:
    # Every rank waits for the others before tearing its connections down: a rank that exits
    # while its peer still holds the group can abort the peer inside gloo ("terminate called
    # without an active exception"), failing a run whose work was done.
    dist.barrier()
    dist.destroy_process_group()


def _wrap(model: nn.Module, d: _Dist, device: torch.device, **kw: Any) -> nn.Module:
    if d.world == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **kw)


class _Classify(nn.Module):
    """Routes forward() to classify(), because DDP synchronises gradients only through forward."""

    def __init__(self, model: FlagEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.classify(ids, ctx=ctx)[0]


# ---------------------------------------------------------------------------------------------
# Shared pieces of both loops


def _epoch_indices(
    n: int, epoch: int, seed: int, d: _Dist, weights: np.ndarray | None = None
) -> list[int]:
    """This rank's indices for one epoch. Uniform: DistributedSampler (a seeded permutation,
    padded so every rank takes the same number of steps). weights: n draws with replacement
    with these probabilities (class-balanced sampling), dealt out to the ranks in turn."""
    if weights is None:
        sampler = DistributedSampler(
            range(n), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        return list(sampler)
    rng = np.random.default_rng([seed, epoch])
    draws = rng.choice(n, size=math.ceil(n / d.world) * d.world, p=weights / weights.sum())
    return draws[d.rank :: d.world].tolist()


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then linear decay to zero (BERT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # decay matrices (linear weights, embeddings), not biases or LayerNorm gains
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint


def _write_json(obj: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


class _Progress:
    """A rich progress bar (loss, phrases/s or flows/s, ETA) on rank 0 when wanted; else silent."""

    def __init__(self, enabled: bool, total: int, done: int, unit: str, title: str) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:,.0f} " + unit + "/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task(
            title, total=total, completed=done, loss=float("nan"), rate=0.0
        )
        self.bar.start()

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, rate=rate)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


Batch = tuple[torch.Tensor, torch.Tensor | None]  # ids (B, T) and context (B, T, 4) or None


def _take(data: torch.Tensor, ctx: torch.Tensor | None, idx: list[int]) -> Batch:
    """Rows idx, cut to their longest real row (padding-aware); the context cut alike."""
    ids = trim_padding(data[idx])
    return ids, None if ctx is None else ctx[idx, : ids.size(1)]


def _batches(data: torch.Tensor, ctx: torch.Tensor | None, indices: list[int],
             batch_size: int) -> Iterator[Batch]:
    for i in range(0, len(indices), batch_size):
        yield _take(data, ctx, indices[i : i + batch_size])


def _stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of a then b, the shorter padded with zeros (PAD id, empty context) to the longer."""
    width = max(a.size(1), b.size(1))
    return torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.size(1))) for t in (a, b)])


def _step(opt: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor, lr: float) -> None:
    """One optimizer step, the same for pre-training and fine-tuning: set the scheduled
    learning rate, backpropagate, clip the gradient norm at 1, step."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def weights_sha256(model: nn.Module) -> str:
    """A fingerprint of the weights (to check that DDP ranks agree, or that two runs match)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _as_tensor(ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(ids), dtype=torch.long)


def _as_ctx(ctx: np.ndarray | torch.Tensor | None, n: int, cfg: ModelConfig) -> torch.Tensor | None:
    """The context tensor (int16 is enough and keeps a large corpus small), checked against the
    model: a packet-aware model needs one per flow, a flat model takes none."""
    if not cfg.packet_aware:
        return None
    if ctx is None or len(ctx) != n:
        raise ValueError("a packet-aware model needs a context (N, T, 4) for every flow")
    return torch.as_tensor(np.asarray(ctx), dtype=torch.int16)


# ---------------------------------------------------------------------------------------------
# Pre-training


@torch.no_grad()
def evaluate_mlm(
    model: nn.Module,
    val_ids: np.ndarray | torch.Tensor,
    vocab_size: int,
    *,
    val_ctx: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | None = None,
    d: _Dist | None = None,
) -> dict[str, float]:
    """Masked-phrase loss and accuracy on validation data, with masks fixed by seed (the same
    on every call, so figures from different steps compare). Sharded over ranks under DDP."""
    device = device or torch.device("cpu")
    d = d or _Dist(device)
    data = _as_tensor(val_ids)
    ctx = None if val_ctx is None else torch.as_tensor(val_ctx, dtype=torch.int16)
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    shard = list(range(d.rank, len(data), d.world))
    for b, (batch, bctx) in enumerate(_batches(data, ctx, shard, batch_size)):
        gen = _step_generator(seed, b, d.rank)
        inputs, targets = mask_tokens(batch, vocab_size, gen)
        side_in, side_targets = mask_sides(bctx, gen) if bctx is not None else (None, None)
        with autocast(device):
            logits, loss = model(*_to(device, inputs, targets, side_in, side_targets))
        m = int((targets != IGNORE).sum())
        if m:
            loss_sum += float(loss) * m
            correct += float((logits.argmax(-1) == targets[targets != IGNORE]).sum())
            count += m
    model.train(was_training)
    loss_sum, correct, count = d.sum([loss_sum, correct, count]).tolist()
    return {"val_loss": loss_sum / max(count, 1), "val_acc": correct / max(count, 1)}


def _to(device: torch.device, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(device) for t in tensors]


def pretrain(
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    cfg: ModelConfig,
    run_dir: Path,
    *,
    train_ctx: np.ndarray | None = None,
    val_ctx: np.ndarray | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    warmup: int | None = None,
    eval_every: int | None = None,
    mask_prob: float = 0.15,
    vocab_sha256: str = "",
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Pre-train a FlagEncoder by masked-phrase prediction with dynamic masking (and, for a
    packet-aware cfg, masked size/gap prediction; train_ctx/val_ctx are then required).

    Give epochs or steps (optimizer steps; batch_size is per rank). Writes run_dir/config.json
    (model config + these arguments), run_dir/last.pt (with optimizer state, for resume) at
    each validation, and run_dir/best.pt whenever the validation loss improves. resume=True
    continues from run_dir/last.pt (same config and dictionary required) with the very same
    data order and masks. eval_every: steps between validations (default: once per epoch,
    at most 20 per run). Returns the final metrics and the validation history.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    cfg = replace(cfg, n_classes=0)  # pre-training has no classifier head
    run_dir = Path(run_dir)
    device = pick_device()
    d = _Dist(device)
    data = _as_tensor(train_ids)
    if data.ndim != 2 or data.shape[1] > cfg.max_len:
        raise ValueError(f"train_ids must be (N, T<={cfg.max_len}), got {tuple(data.shape)}")
    ctx = _as_ctx(train_ctx, len(data), cfg)
    val_ctx = _as_ctx(val_ctx, len(val_ids), cfg)
    steps_per_epoch = math.ceil(math.ceil(len(data) / d.world) / batch_size)
    total = steps if steps is not None else epochs * steps_per_epoch
    warmup = warmup if warmup is not None else min(1000, max(1, total // 16))
    eval_every = eval_every or max(min(steps_per_epoch, total), math.ceil(total / 20))
    settings = {
        "model": cfg.to_dict(),
        "train": dict(
            task="pretrain",
            epochs=epochs,
            steps=total,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            eval_every=eval_every,
            mask_prob=mask_prob,
            seed=seed,
            world_size=d.world,
            device=device.type,
            n_train=len(data),
            n_val=len(val_ids),
        ),
        "vocab_sha256": vocab_sha256,
    }

    torch.manual_seed(seed)  # the same initial weights on every rank
    model = FlagEncoder(cfg).to(device)
    opt = _optimizer(model, lr, weight_decay)
    step, best, history = 0, {"val_loss": math.inf, "val_acc": 0.0, "step": 0}, []
    loss_ema = math.nan
    earlier_s = 0.0  # training time of earlier sittings, so a resumed run reports its whole cost
    last_path = run_dir / "last.pt"
    if resume and last_path.exists():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        # through from_dict: a field added since the checkpoint was written takes its default
        if ModelConfig.from_dict(ckpt["config"]) != cfg or ckpt["vocab_sha256"] != vocab_sha256:
            raise ValueError(f"{last_path} holds another model config or phrase dictionary")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, best, history = ckpt["step"], ckpt["best"], ckpt["history"]
        loss_ema = ckpt["train_loss_ema"]
        earlier_s = ckpt.get("seconds", 0.0)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(settings, run_dir / "config.json")
    torch.manual_seed(seed + 1 + d.rank + step)  # dropout: differs by rank, not bit-exact on resume
    ddp = _wrap(model, d, device)

    def validate() -> dict[str, float]:
        return evaluate_mlm(model, val_ids, cfg.vocab_size, val_ctx=val_ctx,
                            batch_size=batch_size, seed=seed, device=device, d=d)

    def checkpoint(metrics: dict[str, float]) -> None:
        nonlocal best
        improved = metrics["val_loss"] < best["val_loss"]
        if improved:
            best = {**metrics, "step": step}
        if not d.main:
            return
        ckpt = make_checkpoint(
            model, cfg, vocab_sha256=vocab_sha256, labels=[], step=step, metrics=metrics
        )
        if improved:
            _save(ckpt, run_dir / "best.pt")
        _save(
            {
                **ckpt,
                "optimizer": opt.state_dict(),
                "best": best,
                "history": history,
                "train_loss_ema": loss_ema,
                "seconds": earlier_s + time.perf_counter() - t0,
            },
            last_path,
        )

    bar = _Progress(progress and d.main, total, step, "phrases", "pretrain")
    say = log or bar.log
    if step == 0:
        history.append({"step": 0, **validate()})
    t0, phrases = time.perf_counter(), 0.0
    model.train()
    try:
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            indices = _epoch_indices(len(data), epoch, seed, d)[skip * batch_size :]
            for batch, bctx in _batches(data, ctx, indices, batch_size):
                gen = _step_generator(seed, step, d.rank)
                inputs, targets = mask_tokens(batch, cfg.vocab_size, gen, mask_prob)
                side_in, side_targets = (mask_sides(bctx, gen, mask_prob) if bctx is not None
                                         else (None, None))
                with autocast(device):
                    _, loss = ddp(*_to(device, inputs, targets, side_in, side_targets))
                _step(opt, model, loss, _lr_at(step, total, warmup, lr))
                step += 1
                phrases += float((batch >= NUM_SPECIAL).sum()) * d.world
                value = loss.item()
                loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
                bar.update(step, loss_ema, phrases / (time.perf_counter() - t0))
                if step % eval_every == 0 or step == total:
                    metrics = {"step": step, "train_loss": loss_ema, **validate()}
                    history.append(metrics)
                    checkpoint(metrics)
                    if d.main:
                        say(
                            f"step {step}/{total}  train {loss_ema:.4f}  "
                            f"val loss {metrics['val_loss']:.4f}  "
                            f"masked-phrase acc {metrics['val_acc']:.3f}"
                        )
                if step >= total:
                    break
    finally:
        bar.close()
    if d.main and not (run_dir / "best.pt").exists():
        # a finished run's last.pt alone, copied to go on from it (the committed checkpoint)
        if best["step"] != step:
            raise ValueError(f"{run_dir}: no best.pt, and last.pt holds step {step}, not the best "
                             f"step {best['step']}; copy the run's best.pt too")
        _save(make_checkpoint(model, cfg, vocab_sha256=vocab_sha256, labels=[], step=step,
                              metrics=history[-1]), run_dir / "best.pt")
    seconds = time.perf_counter() - t0
    return {
        "step": step,
        "train_loss": loss_ema,
        "val_loss": history[-1]["val_loss"],
        "val_acc": history[-1]["val_acc"],
        "best_val_loss": best["val_loss"],
        "best_val_acc": best["val_acc"],
        "best_step": best["step"],
        "phrases_per_s": phrases / seconds if seconds > 0 else 0.0,  # this sitting's rate
        "seconds": earlier_s + seconds,  # every sitting's
        "weights_sha256": weights_sha256(model),
        "history": history,
    }


# ---------------------------------------------------------------------------------------------
# Fine-tuning

BALANCES = ("weights", "sampler", "none")  # class-imbalance handling finetune() knows


@torch.no_grad()
def evaluate_classifier(
    model: FlagEncoder,
    ids: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    ctx: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 256,
    device: torch.device | None = None,
    d: _Dist | None = None,
) -> dict[str, Any]:
    """Loss, accuracy, macro-F1 and the confusion matrix (true x predicted)."""
    device = device or torch.device("cpu")
    d = d or _Dist(device)
    data, y = _as_tensor(ids), _as_tensor(labels)
    ctx = _as_ctx(ctx, len(data), model.cfg)
    C = model.cfg.n_classes
    was_training = model.training
    model.eval()
    confusion = torch.zeros(C, C, dtype=torch.float64)
    loss_sum = 0.0
    shard = list(range(d.rank, len(data), d.world))
    for i in range(0, len(shard), batch_size):
        idx = shard[i : i + batch_size]
        b_ids, b_ctx = _to(device, *_take(data, ctx, idx))
        with autocast(device):
            logits, _ = model.classify(b_ids, ctx=b_ctx)
        target = y[idx].to(device)
        loss_sum += float(F.cross_entropy(logits.float(), target, reduction="sum"))
        pred = logits.argmax(-1).cpu()
        confusion += torch.bincount(y[idx] * C + pred, minlength=C * C).view(C, C)
    model.train(was_training)
    confusion = d.sum(confusion)
    loss_sum = float(d.sum([loss_sum])[0])
    cm = confusion.numpy().astype(np.int64)
    n = max(int(cm.sum()), 1)
    return {
        "val_loss": loss_sum / n,
        "val_acc": float(np.trace(cm)) / n,
        "val_macro_f1": macro_f1(cm),
        "confusion": cm.tolist(),
    }


def finetune(
    train_ids: np.ndarray,
    train_labels: np.ndarray,
    val_ids: np.ndarray,
    val_labels: np.ndarray,
    *,
    train_ctx: np.ndarray | None = None,
    val_ctx: np.ndarray | None = None,
    init: dict[str, Any] | None,
    labels: list[str],
    run_dir: Path,
    cfg: ModelConfig | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_frac: float = 0.1,
    balance: str = "none",
    patience: int | None = None,
    vocab_sha256: str | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    outlier_ids: np.ndarray | None = None,
    outlier_ctx: np.ndarray | None = None,
    outlier_weight: float = 0.5,
) -> dict[str, Any]:
    """Fine-tune a classifier on [CLS] from a pre-trained checkpoint dict (init), or from
    random weights when init is None (the no-pre-training baseline; cfg is then required).

    labels: class names; train_labels/val_labels index into it. Selection uses validation
    macro-F1 (classes are imbalanced, so accuracy would favour the big ones): the best epoch
    is written as run_dir/best.pt, plus run_dir/config.json. Test data is never an argument.
    balance: "none", "weights" (loss weighted by n / (classes * n_class)) or "sampler"
    (class-balanced sampling with replacement). patience: stop after that many epochs
    without a better macro-F1. Returns the best metrics and the per-epoch history.
    outlier_ids/outlier_ctx: flows of none of the classes (other captures, labels unused). With
    them, each step also draws as many of those as it has training flows and adds outlier_weight
    times their cross-entropy to the uniform distribution (outlier exposure, Hendrycks et al.
    2019), teaching the classifier a low, flat softmax for traffic that is none of its classes.
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be none, weights or sampler, not {balance!r}")
    if init is not None:
        base = cfg or ModelConfig.from_dict(init["config"])
        if vocab_sha256 is not None and vocab_sha256 != init["vocab_sha256"]:
            raise ValueError("vocab_sha256 differs from the pre-trained checkpoint's")
        vocab_sha256 = init["vocab_sha256"]
    elif cfg is None:
        raise ValueError("random-weights fine-tuning (init=None) needs a cfg")
    else:
        base = cfg
    cfg = replace(base, n_classes=len(labels))
    run_dir = Path(run_dir)
    device = pick_device()
    d = _Dist(device)
    data, y = _as_tensor(train_ids), _as_tensor(train_labels)
    if len(data) != len(y) or len(val_ids) != len(val_labels):
        raise ValueError("ids and labels differ in length")
    ctx = _as_ctx(train_ctx, len(data), cfg)
    val_ctx = _as_ctx(val_ctx, len(val_ids), cfg)
    if int(y.min()) < 0 or int(y.max()) >= len(labels):
        raise ValueError("train_labels must index into labels")
    outliers = None
    if outlier_ids is not None and len(outlier_ids):
        outliers = _as_tensor(outlier_ids), _as_ctx(outlier_ctx, len(outlier_ids), cfg)

    torch.manual_seed(seed)
    model = FlagEncoder(cfg)
    if init is not None:
        model.load_pretrained(init["model"])
    model.to(device)
    counts = np.bincount(y.numpy(), minlength=len(labels)).astype(np.float64)
    class_weight = None
    sample_weight = None
    if balance == "weights":
        w = np.divide(
            counts.sum(), len(labels) * counts, out=np.zeros_like(counts), where=counts > 0
        )
        class_weight = torch.tensor(w, dtype=torch.float32, device=device)
    elif balance == "sampler":
        sample_weight = 1.0 / counts[y.numpy()]
    steps_per_epoch = math.ceil(math.ceil(len(data) / d.world) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_frac * total))
    settings = {
        "model": cfg.to_dict(),
        "train": dict(
            task="finetune",
            epochs=epochs,
            steps=total,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            balance=balance,
            patience=patience,
            seed=seed,
            world_size=d.world,
            device=device.type,
            pretrained=init is not None,
            n_outliers=0 if outliers is None else len(outliers[0]),
            outlier_weight=0.0 if outliers is None else outlier_weight,
            n_train=len(data),
            n_val=len(val_ids),
            class_counts=counts.astype(int).tolist(),
        ),
        "labels": list(labels),
        "vocab_sha256": vocab_sha256 or "",
    }
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(settings, run_dir / "config.json")
    torch.manual_seed(seed + 1 + d.rank)
    # the masked-phrase head takes no part in classification: tell DDP not to wait for it
    ddp = _wrap(_Classify(model), d, device, find_unused_parameters=True)
    opt = _optimizer(model, lr, weight_decay)

    bar = _Progress(progress and d.main, total, 0, "flows", "finetune")
    say = log or bar.log
    best: dict[str, Any] = {"val_macro_f1": -1.0, "epoch": -1}
    history: list[dict[str, Any]] = []
    step, flows, t0, loss_ema = 0, 0, time.perf_counter(), math.nan
    model.train()
    try:
        for epoch in range(epochs):
            indices = _epoch_indices(len(data), epoch, seed, d, sample_weight)
            for i in range(0, len(indices), batch_size):
                idx = indices[i : i + batch_size]
                b_ids, b_ctx, target = _to(device, *_take(data, ctx, idx), y[idx])
                if outliers is not None:  # one forward pass over both: cheaper than two
                    pick = torch.randint(len(outliers[0]), (len(idx),),
                                         generator=_step_generator(seed, step, d.rank)).tolist()
                    o_ids, o_ctx = _to(device, *_take(*outliers, pick))
                    b_ids, b_ctx = _stack(b_ids, o_ids), None if b_ctx is None else _stack(b_ctx, o_ctx)
                with autocast(device):
                    logits = ddp(b_ids, b_ctx).float()
                loss = F.cross_entropy(logits[: len(idx)], target, weight=class_weight)
                if outliers is not None:
                    loss = loss - outlier_weight * F.log_softmax(logits[len(idx):], -1).mean()
                _step(opt, model, loss, _lr_at(step, total, warmup, lr))
                step += 1
                flows += len(idx) * d.world
                value = loss.item()
                loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
                bar.update(step, loss_ema, flows / (time.perf_counter() - t0))
            metrics = evaluate_classifier(model, val_ids, val_labels, ctx=val_ctx,
                                          batch_size=batch_size, device=device, d=d)
            history.append({"epoch": epoch, "step": step, "train_loss": loss_ema, **metrics})
            if metrics["val_macro_f1"] > best["val_macro_f1"]:
                best = {"epoch": epoch, "step": step, "train_loss": loss_ema, **metrics}
                if d.main:
                    figures = {k: best[k] for k in ("val_loss", "val_acc", "val_macro_f1", "epoch")}
                    ckpt = make_checkpoint(
                        model,
                        cfg,
                        vocab_sha256=vocab_sha256 or "",
                        labels=labels,
                        step=step,
                        metrics=figures,
                    )
                    ckpt["confusion"] = metrics["confusion"]
                    _save(ckpt, run_dir / "best.pt")
            if d.main:
                say(
                    f"epoch {epoch + 1}/{epochs}  train {loss_ema:.4f}  "
                    f"val loss {metrics['val_loss']:.4f}  acc {metrics['val_acc']:.3f}  "
                    f"macro-F1 {metrics['val_macro_f1']:.3f}"
                )
            if patience is not None and epoch - best["epoch"] >= patience:
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return {
        "best_epoch": best["epoch"],
        "best_val_macro_f1": best["val_macro_f1"],
        "best_val_acc": best["val_acc"],
        "best_val_loss": best["val_loss"],
        "confusion": best["confusion"],
        "flows_per_s": flows / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "weights_sha256": weights_sha256(model),
        "history": history,
    }
