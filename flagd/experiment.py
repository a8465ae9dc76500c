"""The paper's protocol in one call, and an honest variant beside it.

Paper protocol (section 4): all flows of a class-per-directory tree, split at random per class:
40% unlabelled for pre-training, the other 60% labelled and split 6:2:2 into train, validation
and test. FLAG is pre-trained (on the unlabelled 40% plus the train flows, without labels) and
fine-tuned with all train labels and with 10% of them; two baselines run on the same splits: the
same model without pre-training, and FLAG with the bytes-only dictionary (Fig. 2's ablation).

Honest mode: the same runs, but (1) the dataset is rebuilt with every shortcut mask on (ports,
sequence numbers, IP ID, TTL, checksums, TCP timestamps), and (2) the split is by source
capture where a class has several captures, else by time: each capture's flows in start-time
order are cut into contiguous blocks, so flows of one burst do not sit on both sides.
The test split is only ever touched by `evaluate_split`, after training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flagd import evaluate
from flagd.dataset import Dataset, build
from flagd.flows import FlowSettings
from flagd.infer import predict_logits, prepare_for_inference, save_bundle
from flagd.labels import labeller
from flagd.model import ModelConfig, load_checkpoint
from flagd.phrases import PhraseDict
from flagd.preprocess import Preprocessing
from flagd.train import finetune, pretrain

SHARES = (0.40, 0.36, 0.12, 0.12)  # unlabelled, train, validation, test (60% split 6:2:2)
SPLITS = ("unlabelled", "train", "val", "test")


@dataclass
class Protocol:
    preset: str = "small"
    max_len: int = 128
    vocab_size: int = 4096  # m, including the 256 single bytes
    ready_packets: int = 5  # K
    packet_bytes: int = 128  # B
    pretrain_epochs: int = 20
    finetune_epochs: int = 20
    batch_size: int = 64
    pretrain_lr: float = 5e-4
    finetune_lr: float = 3e-4
    balance: str = "weights"
    fractions: tuple[float, ...] = (1.0, 0.1)
    variants: tuple[str, ...] = ("flag", "no-pretrain", "bytes-only")
    modes: tuple[str, ...] = ("paper", "honest")
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # extra ModelConfig fields (tests: smaller)

    def flow_settings(self, honest: bool) -> FlowSettings:
        pre = Preprocessing.honest(packet_bytes=self.packet_bytes) if honest else \
            Preprocessing(packet_bytes=self.packet_bytes)
        return FlowSettings(ready_packets=self.ready_packets, preprocessing=pre)


def split_random(ds: Dataset, seed: int) -> dict[str, np.ndarray]:
    """The paper's split: per class, a random 40/36/12/12 cut."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(len(ds.classes)):
        idx = rng.permutation(np.flatnonzero(ds.labels == c))
        for name, chunk in zip(SPLITS, _cut(idx, SHARES), strict=True):
            parts[name] += chunk.tolist()
    return {k: np.array(sorted(v), np.int64) for k, v in parts.items()}


def split_grouped(ds: Dataset, seed: int) -> dict[str, np.ndarray]:
    """No source capture on two sides; with one capture per class, contiguous time blocks."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(len(ds.classes)):
        rows = np.flatnonzero(ds.labels == c)
        groups = np.unique(ds.source[rows])
        if len(groups) >= 8:  # enough captures to give every split whole ones
            order = rng.permutation(groups)
            for name, chunk in zip(SPLITS, _cut(order, SHARES), strict=True):
                parts[name] += rows[np.isin(ds.source[rows], chunk)].tolist()
        else:
            for g in groups:
                g_rows = rows[ds.source[rows] == g]
                g_rows = g_rows[np.argsort(ds.start[g_rows], kind="stable")]
                # Blocks of ~50 flows in time order (at least 10 blocks), dealt to the splits
                # in proportion.
                blocks = np.array_split(g_rows, min(len(g_rows), max(10, len(g_rows) // 50)))
                order = rng.permutation(len(blocks))
                for name, chunk in zip(SPLITS, _cut(order, SHARES), strict=True):
                    for b in chunk:
                        parts[name] += blocks[b].tolist()
    return {k: np.array(sorted(v), np.int64) for k, v in parts.items()}


def _cut(items: np.ndarray, shares: tuple[float, ...]) -> list[np.ndarray]:
    bounds = np.round(np.cumsum(shares) * len(items)).astype(int)
    return np.split(items, bounds[:-1])


def subsample(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A per-class random `fraction` of idx (at least one flow of each class present)."""
    if fraction >= 1:
        return idx
    rng = np.random.default_rng(seed + 1)
    keep = []
    for c in np.unique(labels[idx]):
        rows = idx[labels[idx] == c]
        keep += rng.choice(rows, max(1, round(fraction * len(rows))), replace=False).tolist()
    return np.array(sorted(keep), np.int64)


def evaluate_split(model_dir: Path, ids: np.ndarray, labels: np.ndarray, classes: list[str],
                   n_dropped: int) -> dict:
    model, _ = load_checkpoint(model_dir / "best.pt")
    model = prepare_for_inference(model)
    pred = predict_logits(model, torch.from_numpy(ids.astype(np.int64))).argmax(-1).numpy()
    return evaluate.metrics(labels, pred, classes, n_dropped=n_dropped)


def run_mode(ds: Dataset, mode: str, p: Protocol, out: Path,
             log: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Every variant and label fraction of one mode on one dataset; returns table rows."""
    split = (split_grouped if mode == "honest" else split_random)(ds, p.seed)
    (out / mode).mkdir(parents=True, exist_ok=True)
    (out / mode / "split.json").write_text(json.dumps({k: v.tolist() for k, v in split.items()}))
    log(f"[{mode}] {len(ds)} flows: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    empty = [k for k in ("train", "val", "test") if not len(split[k])]
    if empty:
        raise ValueError(f"{mode}: {len(ds)} flows in {len(ds.classes)} classes are too few to "
                         f"split; the {' and '.join(empty)} split would be empty")
    pre_rows = np.concatenate([split["unlabelled"], split["train"]])  # labels unused
    n_dropped = sum(ds.stats.get("dropped", {}).values())
    rows = []
    dicts = {}
    for variant in p.variants:
        key = "bytes" if variant == "bytes-only" else "phrases"
        if key not in dicts:
            dicts[key] = PhraseDict.bytes_only() if key == "bytes" else PhraseDict.fit(
                (pk for i in pre_rows for pk in ds.flows[i]), p.vocab_size)
        phrases = dicts[key]
        ids = phrases.encode_flows(ds.flows, p.max_len)
        cfg = ModelConfig.preset(p.preset, vocab_size=phrases.vocab_size, max_len=p.max_len,
                                 **p.overrides)
        init = None
        pre_wall = 0.0
        if variant != "no-pretrain":
            run = out / mode / f"pretrain-{key}"
            if not (run / "wall_s").exists():  # not finished: start, or resume an interrupted run
                t0 = time.monotonic()
                pretrain(ids[pre_rows], ids[split["val"]], cfg, run, epochs=p.pretrain_epochs,
                         batch_size=p.batch_size, lr=p.pretrain_lr, vocab_sha256=phrases.sha256,
                         seed=p.seed, progress=progress, log=log,
                         resume=(run / "last.pt").exists())
                (run / "wall_s").write_text(f"{time.monotonic() - t0:.1f}")
            init = torch.load(run / "best.pt", weights_only=True)
            pre_wall = float((run / "wall_s").read_text()) if (run / "wall_s").exists() else 0.0
        for frac in p.fractions:
            tr = subsample(split["train"], ds.labels, frac, p.seed)
            va = subsample(split["val"], ds.labels, frac, p.seed)
            name = f"{variant}-{int(frac * 100)}"
            run = out / mode / name
            t0 = time.monotonic()
            finetune(ids[tr], ds.labels[tr], ids[va], ds.labels[va], init=init, cfg=cfg,
                     labels=ds.classes, run_dir=run, epochs=p.finetune_epochs,
                     batch_size=p.batch_size, lr=p.finetune_lr, balance=p.balance,
                     vocab_sha256=phrases.sha256, seed=p.seed, progress=progress, log=log)
            wall = time.monotonic() - t0 + pre_wall
            phrases.save(run / "phrases.json")
            te = split["test"]
            report = evaluate_split(run, ids[te], ds.labels[te], ds.classes, n_dropped)
            evaluate.write_json(report, run / "report.json")
            n_params = sum(v.numel() for v in torch.load(run / "best.pt", weights_only=True)["model"].values())
            row = evaluate.compare_row(f"{mode}: {variant}", report, labels=frac, wall_s=wall,
                                       model_params=n_params)
            if variant == "flag" and frac == 1.0:  # the model to ship: a bundle for --model
                export(run, phrases, ds, p, report)
            rows.append(row)
            log(f"[{mode}] {name}: accuracy {report['accuracy']:.4f} macro-F1 "
                f"{report['macro_f1']:.4f} TPR {report['tpr']:.4f} FPR {report['fpr']:.4f}")
    return rows


def export(run: Path, phrases: PhraseDict, ds: Dataset, p: Protocol, report: dict) -> Path:
    """Write run/model/, a bundle `flagd replay --model` loads, with its test report."""
    s = ds.settings
    settings = FlowSettings.from_dict(s)
    best = torch.load(run / "best.pt", weights_only=True)
    return save_bundle(run / "model", best, phrases, settings, p.max_len, metrics=report)


def run_protocol(tree: list[Path], out: Path, p: Protocol, label_kind: str = "dir",
                 log: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Build the datasets, run every mode, write out/report.json; returns the table rows."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(asdict(p), indent=2))
    rows = []
    for mode in p.modes:
        ds = build(tree, p.flow_settings(honest=mode == "honest"), label=labeller(label_kind))
        ds.save(out / mode / "dataset.npz")
        log(f"[{mode}] dataset: {len(ds)} flows, {ds.stats.get('duplicates', 0)} duplicates "
            f"removed, dropped {ds.stats['dropped']}")
        rows += run_mode(ds, mode, p, out, log, progress)
    (out / "report.json").write_text(json.dumps({"protocol": asdict(p), "rows": rows}, indent=2))
    return rows
