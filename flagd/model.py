"""FLAG's flow encoder: a BERT-style Transformer over phrase ids, with its two heads.

One file, in reading order: config and presets -> embeddings -> attention -> MLP -> block ->
encoder -> heads (masked-phrase prediction, [CLS] classification) -> checkpoint dicts ->
CPU inference helpers. The model never prints, opens files or picks a device; the entry point
decides device and dtype.

Blocks are pre-LN by default (LayerNorm before attention/MLP, one final LayerNorm), unlike the
post-LN of the original BERT that the paper follows. Pre-LN keeps gradients well scaled at every
depth, so pre-training from scratch is stable without a long, carefully tuned warm-up and with
larger learning rates; that matters here, where runs are short and tuned little. `norm_first=False`
gives the paper's post-LN blocks for a faithful comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from os import PathLike
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flagd.inputs import FIELD_SIZES
from flagd.phrases import NUM_SPECIAL, PAD

CHECKPOINT_FORMAT = 1  # bump when the checkpoint dict's keys change meaning


@dataclass
class ModelConfig:
    vocab_size: int  # phrase dictionary size including the NUM_SPECIAL special ids
    max_len: int = 128  # positions: [CLS] ... [EOS] must fit
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd
    dropout: float = 0.1  # on embeddings, attention output, MLP output and the classifier
    n_classes: int = 0  # 0 = no classification head (pre-training)
    norm_first: bool = True  # pre-LN blocks (see module docstring); False = BERT's post-LN
    # Packet-aware input (beyond the paper): every id also gets embeddings of its packet's
    # index, direction, size and gap (flagd.inputs), and pre-training predicts masked sizes
    # and gaps too. False is the paper's flat phrase sequence.
    packet_aware: bool = False
    # VPN tunnel flows read from inside (flagd.tunnels.unwrap): their data packets at inner
    # size, tunnel framing removed, so a class learnt through one tunnel kind carries to another.
    unwrap_tunnels: bool = False
    # With unwrap_tunnels: a tunnel flow's first tunnel_packets data packets (0: all it has).
    tunnel_packets: int = 0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.vocab_size <= NUM_SPECIAL:
            raise ValueError(f"vocab_size={self.vocab_size} leaves no room for phrases")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset by name, e.g. `ModelConfig.preset("small", vocab_size=len(dictionary))`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def first_layers(self, n_layer: int) -> ModelConfig:
        """This config with only its first n_layer blocks (a shallower model fine-tuned from a
        deeper pre-training, `FlagEncoder.load_pretrained`)."""
        if not 0 < n_layer <= self.n_layer:
            raise ValueError(f"the pre-trained encoder has {self.n_layer} layers: "
                             f"choose 1 to {self.n_layer}, not {n_layer}")
        return replace(self, n_layer=n_layer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Every preset but vocab_size, which comes from the phrase dictionary.
PRESETS: dict[str, dict[str, Any]] = {
    # for tests: trains in seconds on a CPU
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, mlp_ratio=4),
    # default for live CPU inference, sized with benchmarks/bench_inference.py: 4 x 256 with
    # a 2x MLP runs ~1.5x the 200 flows/s target at length 128 on 2 cores (int8); a 4x MLP
    # only just meets it, leaving nothing for the rest of the daemon
    "small": dict(n_layer=4, n_embd=256, n_head=4, mlp_ratio=2),
    # what the shipped ISCX model uses: trainable in minutes on 2 CPU cores (the budget it was
    # built in), several times faster than `small` at inference
    "mini": dict(n_layer=3, n_embd=128, n_head=4, mlp_ratio=2),
    # the paper's experiments: 6 layers, 768 hidden, 6 heads
    "paper": dict(n_layer=6, n_embd=768, n_head=6, mlp_ratio=4),
}


def padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """True where a position holds a real token (anything but PAD)."""
    return ids != PAD


class Embeddings(nn.Module):
    """Token + learned position embeddings (+ the packet context's four, when packet-aware),
    then LayerNorm and dropout (as in BERT)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len, cfg.n_embd)
        # packet index, direction, size, gap; id 0 ("none": CLS, EOS, PAD) adds nothing
        self.ctx = nn.ModuleList(
            nn.Embedding(n, cfg.n_embd, padding_idx=0) for n in FIELD_SIZES
        ) if cfg.packet_aware else None
        self.ln = nn.LayerNorm(cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        T = ids.size(1)
        pos = torch.arange(T, device=ids.device)
        x = self.tok(ids) + self.pos(pos)  # (B, T, C)
        if self.ctx is not None:
            if ctx is None:
                raise ValueError("a packet-aware model needs the packet context (B, T, 4)")
            ctx = ctx.long()
            for i, emb in enumerate(self.ctx):
                x = x + emb(ctx[..., i])  # (B, T, C)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; padded keys are never attended to."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v stacked (MHA's in_proj)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, first_only: bool = False
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or (B, 1, C) for the first query only when first_only."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        if first_only:
            q, T = q[:, :1], 1  # (B, 1, C); keys and values still cover every position
        q = q.reshape(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, -1, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T_k, hs)
        v = v.view(B, -1, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T_k, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, first_only: bool = False
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); first_only: only position 0's output, (B, 1, C)."""
        x0 = x[:, :1] if first_only else x  # the residual stream of the outputs we want
        if self.norm_first:  # pre-LN: the residual stream itself is never normalised
            x = x0 + self.attn(self.ln1(x), attn_mask, first_only)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x0 + self.attn(x, attn_mask, first_only))  # post-LN, as in BERT
        return self.ln2(x + self.mlp(x))


class FlagEncoder(nn.Module):
    """The encoder with a masked-phrase head (tied to the token embeddings) and, when
    cfg.n_classes > 0, a classification head on the [CLS] position (paper section 3.4)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # pre-LN leaves the residual stream unnormalised; post-LN blocks already end in one
        self.ln_f = nn.LayerNorm(cfg.n_embd) if cfg.norm_first else nn.Identity()
        # masked-phrase head: BERT's transform, then a decoder that shares the token
        # embedding matrix (F.linear on self.emb.tok.weight, so no second copy exists)
        self.mlm_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlm_ln = nn.LayerNorm(cfg.n_embd)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.packet_aware:  # masked side channel: a packet's size and gap bucket
            self.side_heads = nn.ModuleList(nn.Linear(cfg.n_embd, n) for n in FIELD_SIZES[2:])
        if cfg.n_classes > 0:  # BERT's pooler (dense + tanh on [CLS]) and a linear classifier
            self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd)
            self.cls_drop = nn.Dropout(cfg.dropout)
            self.classifier = nn.Linear(cfg.n_embd, cfg.n_classes)
        self.apply(self._init_weights)
        if cfg.norm_first:  # GPT-2: scale residual projections by depth so the stream stays O(1)
            for name, p in self.named_parameters():
                if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])

    def encode(
        self, ids: torch.Tensor, ctx: torch.Tensor | None = None, cls_only: bool = False
    ) -> torch.Tensor:
        """Final hidden states (B, T, C) for int ids (B, T) and, packet-aware, their context
        (B, T, 4); PAD positions are ignored as keys.

        cls_only: return (B, 1, C), position 0 only. The last block then computes just that
        query, its MLP and norms (keys and values still come from every position), which is
        exact and saves about a fifth of a 4-layer forward pass when only [CLS] is wanted."""
        B, T = ids.shape
        if T > self.cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={self.cfg.max_len}")
        keep = padding_mask(ids)  # (B, T)
        # key 0 always stays visible so that an all-PAD row gives numbers, not NaN (softmax of
        # nothing); for real sequences it is [CLS], which is attended to anyway
        keep[:, 0] = True
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
        if not self.training and bool(keep.all()):
            attn_mask = None  # nothing to hide: SDPA may take its unmasked fast kernel
        x = self.emb(ids, ctx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, first_only=cls_only and i == len(self.blocks) - 1)
        return self.ln_f(x)  # (B, T, C), or (B, 1, C) when cls_only

    def cls_embedding(self, ids: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """The flow representation: the final hidden state at [CLS] (position 0), (B, C)."""
        return self.encode(ids, ctx, cls_only=True)[:, 0]

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        return F.linear(h, self.emb.tok.weight, self.mlm_bias)  # (..., vocab_size)

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        ctx: torch.Tensor | None = None,
        side_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masked-phrase prediction.

        Without targets: logits (B, T, vocab_size) at every position and loss None.
        With targets (B, T), -100 where not predicted: logits (M, vocab_size) for just the M
        positions with a target, in row-major order (what loss and accuracy need; the other
        85% of the vocabulary projection is skipped), and the mean cross-entropy over them.
        side_targets (B, T, 2), packet-aware only: the size and gap bucket ids of tokens whose
        packet's side channel was masked, -100 elsewhere; their cross-entropy is added.
        """
        h = self.encode(ids, ctx)  # (B, T, C)
        if targets is None:
            return self.mlm_logits(h), None
        chosen = targets != -100  # (B, T)
        logits = self.mlm_logits(h[chosen])  # (M, V)
        loss = F.cross_entropy(logits.float(), targets[chosen])
        if side_targets is not None:
            for i, head in enumerate(self.side_heads):
                hit = side_targets[..., i] != -100  # (B, T)
                if hit.any():
                    side = head(h[hit]).float()  # (S, buckets)
                    loss = loss + 0.5 * F.cross_entropy(side, side_targets[..., i][hit])
        return logits, loss

    def classify(
        self, ids: torch.Tensor, labels: torch.Tensor | None = None,
        ctx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits (B, n_classes) from [CLS], and the cross-entropy when labels are given."""
        if self.cfg.n_classes <= 0:
            raise RuntimeError("this model has no classification head (n_classes=0)")
        pooled = torch.tanh(self.pooler(self.cls_embedding(ids, ctx)))  # (B, C)
        logits = self.classifier(self.cls_drop(pooled))  # (B, n_classes)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return logits, loss

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        """Load a pre-trained encoder (+ masked-phrase head) and keep this model's fresh
        classification head; anything else missing or unexpected is an error. A model with
        fewer layers than the checkpoint takes its first n_layer blocks: a shallower, faster
        classifier starts from the pre-trained lower layers rather than from random weights."""
        heads = ("pooler.", "classifier.")
        deeper = tuple(f"blocks.{i}." for i in range(self.cfg.n_layer, _depth(state)))
        own = {k: v for k, v in state.items() if not k.startswith(heads + deeper)}
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.startswith(heads)]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit: missing {missing}, unexpected {unexpected}")


def _depth(state: dict[str, torch.Tensor]) -> int:
    """The number of encoder blocks a state dict holds."""
    return 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)


# ---------------------------------------------------------------------------------------------
# Checkpoints: one plain dict that torch.load(weights_only=True) can read.


def make_checkpoint(
    model: nn.Module,
    cfg: ModelConfig,
    *,
    vocab_sha256: str,
    labels: list[str] | None,
    step: int,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """Weights, the config as a dict, the phrase dictionary's hash, class labels, step and
    validation figures. Callers may add keys of plain types (e.g. optimizer state)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": cfg.to_dict(),
        "vocab_sha256": vocab_sha256,
        "labels": list(labels or []),
        "step": int(step),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def load_checkpoint(
    path_or_dict: str | PathLike[str] | dict[str, Any], map_location: str | torch.device = "cpu"
) -> tuple[FlagEncoder, dict[str, Any]]:
    """Rebuild the model from a checkpoint file (read with weights_only=True) or dict."""
    if isinstance(path_or_dict, dict):
        ckpt = path_or_dict
    else:
        ckpt = torch.load(path_or_dict, map_location=map_location, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unsupported checkpoint format {ckpt.get('format')!r}")
    model = FlagEncoder(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(map_location), ckpt


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are PAD in every row (no effect on real positions)."""
    lengths = padding_mask(ids).sum(1)
    return ids[:, : max(int(lengths.max()) if len(lengths) else 0, 1)]
