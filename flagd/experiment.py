"""The paper's protocol in one call, an honest variant and the shipped model's run beside it.

Paper protocol (section 4): all flows of a class-per-directory tree, split at random per class:
40% unlabelled for pre-training, the other 60% labelled and split 6:2:2 into train, validation
and test. FLAG is pre-trained (on the unlabelled 40% plus the train flows, without labels) and
fine-tuned with all train labels and with 10% of them. On the same splits: the same model
without pre-training, FLAG with the bytes-only dictionary (Fig. 2's ablation), FLAG with the
paper's flat input where the others are packet-aware (flagd.inputs), a shallower FLAG that
fine-tunes only the first pre-trained layers (flag-shallow: faster live inference, same
pre-training), and the strongest simple
baseline, a random forest on the first RF_BYTES bytes of each of the first K packets.
With a fraction of the labels, self-training (Protocol.self_train) can follow: the fraction's
model labels the flows whose labels the fraction lacks, the unlabelled split and the rest of
train, and a student learns from the flows it is sure of.

Product mode: what a shipped model is trained on. Every labelled flow but a test split: 80/10/10
per class into train, validation (early stopping, rejection threshold) and test; pre-training on
the train flows plus any extra unlabelled captures.

Honest mode: the same runs, but (1) the dataset is rebuilt with every shortcut mask on (ports,
sequence numbers, IP ID, TTL, checksums, TCP timestamps), and (2) the split is by source
capture where a class has several captures, else by time: each capture's flows in start-time
order are cut into contiguous blocks, so flows of one burst do not sit on both sides.
The test split is only ever touched by `evaluate_split`, after training.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flagd import evaluate, inputs
from flagd.dataset import Dataset, build
from flagd.flows import FlowSettings
from flagd.infer import predict_logits, prepare_for_inference, save_bundle
from flagd.labels import labeller
from flagd.model import ModelConfig, load_checkpoint
from flagd.outliers import synthesize
from flagd.phrases import PhraseDict
from flagd.preprocess import Preprocessing
from flagd.train import finetune, pretrain

SHARES = (0.40, 0.36, 0.12, 0.12)  # unlabelled, train, validation, test (60% split 6:2:2)
PRODUCT_SHARES = (0.0, 0.80, 0.10, 0.10)  # every label used; test held out
SPLITS = ("unlabelled", "train", "val", "test")
VARIANTS = ("flag", "flag-flat", "flag-shallow", "no-pretrain", "bytes-only", "rf")
# leave-one-implementation-out modes (lab runs only) -> what a vpn-* class holds out (split_loio)
LOIO_MODES = {"loio": "tunnel", "loio-client": "client"}
MODES = ("paper", "honest", "product", *LOIO_MODES)
RF_BYTES = 64  # the random forest's bytes per packet
RF_TREES = 300


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
    pretrain_batch_size: int | None = None  # None: batch_size (a GPU takes bigger batches)
    pretrain_lr: float = 5e-4
    finetune_lr: float = 3e-4
    balance: str = "weights"
    fractions: tuple[float, ...] = (1.0, 0.1)
    variants: tuple[str, ...] = VARIANTS
    modes: tuple[str, ...] = ("paper", "honest")
    packet_aware: bool = True  # input of flag, no-pretrain and bytes-only (flag-flat: never)
    # every variant, the forest included, reads VPN tunnel flows from inside (flagd.tunnels)
    unwrap_tunnels: bool = False
    tunnel_packets: int = 0  # with unwrap_tunnels: a tunnel flow's first N data packets; 0: all
    unlabelled: tuple[str, ...] = ()  # extra captures for pre-training only (labels unused)
    outliers: tuple[str, ...] = ()  # foreign captures for outlier exposure in fine-tuning
    outlier_weight: float = 0.5
    # outlier exposure also to flows made from each fine-tuning's own train rows
    # (flagd.outliers): near misses of the classes, which foreign captures rarely show
    synthetic_outliers: bool = False
    shallow_layers: int = 0  # flag-shallow's encoder blocks; 0: one fewer than the preset's
    # fine-tune a label fraction f for finetune_epochs / f epochs: as many optimizer steps as
    # all labels get (10% of labels at a fixed epoch count is a tenth of the steps)
    equal_steps: bool = False
    # product mode: "flow" deals flows at random (a session's flows may straddle train and
    # test), "capture" deals whole captures, as honest mode does (lab runs: one per session)
    split_by: str = "flow"
    seed: int = 0  # the split, pre-training and (with draw 0) labelled rows and fine-tuning
    # Another draw of the labelled rows, fine-tuning and forest seeds (seed + draw) on the same
    # split and pre-training: how much a figure moves with the labels a run happened to get.
    draw: int = 0
    # Self-training for label fractions under 1: the fine-tuned model labels the flows whose
    # labels the fraction lacks (the unlabelled split and the rest of train, never test or
    # --unlabelled captures); those it gives at least this probability join the labelled flows
    # for a student fine-tuned from the same start. None: off. Each further round's student
    # learns from the previous round's.
    self_train: float | None = None
    self_train_rounds: int = 1
    overrides: dict = field(default_factory=dict)  # extra ModelConfig fields (tests: smaller)

    def flow_settings(self, honest: bool) -> FlowSettings:
        pre = Preprocessing.honest(packet_bytes=self.packet_bytes) if honest else \
            Preprocessing(packet_bytes=self.packet_bytes)
        return FlowSettings(ready_packets=self.ready_packets, preprocessing=pre)

    def stretched(self, variant: str, frac: float) -> bool:
        """Whether this variant and label fraction get equal_steps' longer schedule."""
        return self.equal_steps and frac < 1 and variant != "rf"

    def shallow(self, cfg: ModelConfig) -> ModelConfig:
        """flag-shallow's config: the first shallow_layers blocks of cfg (default one fewer)."""
        return cfg.first_layers(self.shallow_layers or cfg.n_layer - 1)


def split_random(ds: Dataset, seed: int,
                 shares: tuple[float, ...] = SHARES) -> dict[str, np.ndarray]:
    """The paper's split: per class, a random 40/36/12/12 cut (or other shares)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(len(ds.classes)):
        idx = rng.permutation(np.flatnonzero(ds.labels == c))
        for name, chunk in zip(SPLITS, _cut(idx, shares), strict=True):
            parts[name] += chunk.tolist()
    return {k: np.array(sorted(v), np.int64) for k, v in parts.items()}


def split_grouped(ds: Dataset, seed: int,
                  shares: tuple[float, ...] = SHARES) -> dict[str, np.ndarray]:
    """No source capture on two sides; with few captures per class, contiguous time blocks."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(len(ds.classes)):
        rows = np.flatnonzero(ds.labels == c)
        groups = np.unique(ds.source[rows])
        if len(groups) >= 8:  # enough captures to give every split whole ones
            order = rng.permutation(groups)
            for name, chunk in zip(SPLITS, _cut(order, shares), strict=True):
                parts[name] += rows[np.isin(ds.source[rows], chunk)].tolist()
        else:
            for g in groups:
                g_rows = rows[ds.source[rows] == g]
                g_rows = g_rows[np.argsort(ds.start[g_rows], kind="stable")]
                # Blocks of ~50 flows in time order (at least 10 blocks), dealt to the splits
                # in proportion.
                blocks = np.array_split(g_rows, min(len(g_rows), max(10, len(g_rows) // 50)))
                order = rng.permutation(len(blocks))
                for name, chunk in zip(SPLITS, _cut(order, shares), strict=True):
                    for b in chunk:
                        parts[name] += blocks[b].tolist()
    return {k: np.array(sorted(v), np.int64) for k, v in parts.items()}


# Leave-one-implementation-out (`--mode loio`, lab runs only): the network-condition bins that go
# entirely to test, and the bins every test flow is reported in (lower bound inclusive).
LOIO_HELD_OUT = {"rate_mbit": "1-2 Mbit/s", "mtu": "1280-1319"}
LOIO_BINS = {
    "rate_mbit": ((1, "1-2 Mbit/s"), (2, "2-10 Mbit/s"), (10, "10-100 Mbit/s")),
    "mtu": ((1280, "1280-1319"), (1320, "1320-1409"), (1410, "1410-1500")),
}
LOIO_VAL = 0.12  # share of the remaining captures of a class for validation


def lab_sessions(ds: Dataset) -> list[dict]:
    """Per source capture of `ds`, its `flagd lab generate` manifest record (the capture is
    RUN/<class>/<session>.pcap; its run's RUN/manifest.json names app, tunnel and conditions)."""
    runs: dict[Path, dict] = {}
    out = []
    for src in ds.sources:
        path = Path(src)
        run = path.parent.parent / "manifest.json"
        if run not in runs:
            if not run.exists():
                raise ValueError(f"loio splits lab runs: {src} has no {run} "
                                 "(a capture tree written by `flagd lab generate`)")
            runs[run] = {r["id"]: r for r in json.loads(run.read_text())["sessions"]}
        if path.stem not in runs[run]:
            raise ValueError(f"{src}: no session {path.stem!r} in {run}")
        out.append(runs[run][path.stem])
    return out


def condition_bins(record: dict) -> dict[str, str]:
    """A lab session's network conditions as LOIO_BINS bins, plus its congestion control."""
    cond = record.get("conditions")
    if not cond:
        return {k: "none" for k in (*LOIO_BINS, "congestion")}
    bins = {k: [name for low, name in edges if cond[k] >= low][-1]
            for k, edges in LOIO_BINS.items()}
    return bins | {"congestion": cond["congestion"]}


def held_out_condition(record: dict) -> bool:
    """True for a lab session in one of the LOIO_HELD_OUT condition bins (loio puts it in test)."""
    bins = condition_bins(record)
    return any(bins[k] == v for k, v in LOIO_HELD_OUT.items())


def implementation(record: dict, vpn: str = "tunnel") -> str:
    """What a class's flows are made by: the client app; for a vpn-* class its tunnel kind
    (`vpn="tunnel"`: the inner apps are the plain classes') or the client app inside it
    (`vpn="client"`)."""
    return record["tunnel"] if record["tunnel"] != "none" and vpn == "tunnel" else record["app"]


def split_loio(ds: Dataset, seed: int, vpn: str = "tunnel") -> dict[str, np.ndarray]:
    """Whole implementations and whole network conditions in test, none of them in training.

    Per class one implementation, drawn with the seed, goes entirely to test: a plain class's
    client app among those that share their server program with another app of the class (a
    second client: `sendxmpp-tls` beside `xmpp-tls`, not IRC, whose protocol no other chat app
    speaks); a VPN class's tunnel kind (`vpn="tunnel"`, `--mode loio`) or, like a plain class,
    the client app inside the tunnel, through every tunnel kind (`vpn="client"`, `--mode
    loio-client`: the tunnels stay known). Every session in a LOIO_HELD_OUT condition bin goes
    to test too. Of the other captures, LOIO_VAL of each class validates, the rest trains (and
    pre-trains: no unlabelled split).
    """
    from flagd.lab.apps import APPS  # the server program of each lab app

    rng = np.random.default_rng(seed)
    records = lab_sessions(ds)
    impl = np.array([implementation(records[s], vpn) for s in range(len(records))])[ds.source]
    held_bin = np.array([held_out_condition(r) for r in records])[ds.source]
    test = held_bin.copy()
    for c in range(len(ds.classes)):
        rows = ds.labels == c
        kinds = sorted(set(impl[rows]))
        if ds.classes[c].startswith("vpn-") and vpn == "tunnel":
            pool = kinds
        else:
            server = {k: APPS[k].programs[0] if k in APPS else k for k in kinds}
            pool = [k for k in kinds if sum(v == server[k] for v in server.values()) > 1]
        if not pool:
            raise ValueError(f"loio: class {ds.classes[c]!r} has no implementation to hold out "
                             f"({', '.join(kinds)}: none with a second client)")
        test |= rows & (impl == pool[rng.integers(len(pool))])
    parts = {"unlabelled": [], "train": [], "val": [], "test": np.flatnonzero(test).tolist()}
    for c in range(len(ds.classes)):
        rows = np.flatnonzero((ds.labels == c) & ~test)
        groups = rng.permutation(np.unique(ds.source[rows]))
        val = groups[: round(LOIO_VAL * len(groups))]
        parts["val"] += rows[np.isin(ds.source[rows], val)].tolist()
        parts["train"] += rows[~np.isin(ds.source[rows], val)].tolist()
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


def rf_features(flows: list[list[bytes]], k: int) -> np.ndarray:
    """(N, k * RF_BYTES) uint8: the first RF_BYTES model bytes of each of the first k packets,
    zero-padded: what the random forest sees (the same bytes the encoder reads, cut shorter)."""
    x = np.zeros((len(flows), k * RF_BYTES), np.uint8)
    for i, flow in enumerate(flows):
        for j, pkt in enumerate(flow[:k]):
            x[i, j * RF_BYTES: j * RF_BYTES + min(len(pkt), RF_BYTES)] = np.frombuffer(
                pkt[:RF_BYTES], np.uint8)
    return x


def random_forest(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  seed: int) -> np.ndarray:
    """Predictions of a RF_TREES-tree random forest (scikit-learn, the `train` extra)."""
    try:
        from sklearn.ensemble import RandomForestClassifier
    except ImportError:
        raise ValueError("the random-forest baseline needs scikit-learn: "
                         "pip install 'flagd[train]' (or leave out --variant rf)") from None
    rf = RandomForestClassifier(n_estimators=RF_TREES, n_jobs=-1, random_state=seed)
    return rf.fit(x_train, y_train).predict(x_test)


def run_logits(model_dir: Path, ids: np.ndarray, ctx: np.ndarray | None) -> torch.Tensor:
    """Class logits of the fine-tuned model in model_dir (its best.pt) for these rows."""
    model = prepare_for_inference(load_checkpoint(model_dir / "best.pt")[0])
    return predict_logits(model, torch.from_numpy(ids.astype(np.int64)),
                          ctx=None if ctx is None else torch.from_numpy(ctx))


def evaluate_split(model_dir: Path, ids: np.ndarray, ctx: np.ndarray | None, labels: np.ndarray,
                   classes: list[str], n_dropped: int) -> dict:
    pred = run_logits(model_dir, ids, ctx).argmax(-1).numpy()
    return evaluate.metrics(labels, pred, classes, n_dropped=n_dropped)


def _splits(ds: Dataset, mode: str, p: Protocol) -> dict[str, np.ndarray]:
    if mode == "honest":
        return split_grouped(ds, p.seed)
    if mode in LOIO_MODES:
        return split_loio(ds, p.seed, vpn=LOIO_MODES[mode])
    if mode == "product":
        split = split_grouped if p.split_by == "capture" else split_random
        return split(ds, p.seed, PRODUCT_SHARES)
    return split_random(ds, p.seed, SHARES)


def run_mode(ds: Dataset, mode: str, p: Protocol, out: Path, extra: Dataset | None = None,
             log: Callable[[str], None] = print, progress: bool = True,
             outliers: Dataset | None = None) -> list[dict]:
    """Every variant and label fraction of one mode on one dataset; returns table rows.
    extra: unlabelled flows built with the same settings, added to pre-training only.
    outliers: foreign flows built alike, pushed towards a flat prediction while every neural
    variant fine-tunes (outlier exposure), so their rows stay comparable."""
    split = _splits(ds, mode, p)  # captures and labels only: the same with tunnels unwrapped
    if p.unwrap_tunnels:
        ds, extra, outliers = (None if d is None else unwrapped_dataset(d, p.tunnel_packets)
                               for d in (ds, extra, outliers))
    (out / mode).mkdir(parents=True, exist_ok=True)
    (out / mode / "split.json").write_text(json.dumps({k: v.tolist() for k, v in split.items()}))
    log(f"[{mode}] {len(ds)} flows: " + ", ".join(f"{k} {len(v)}" for k, v in split.items())
        + (f"; {len(extra)} extra unlabelled flows for pre-training" if extra else ""))
    empty = [k for k in ("train", "val", "test") if not len(split[k])]
    if empty:
        raise ValueError(f"{mode}: {len(ds)} flows in {len(ds.classes)} classes are too few to "
                         f"split; the {' and '.join(empty)} split would be empty")
    corpus = ds if extra is None else _concat(ds, extra)
    pre_rows = np.concatenate([split["unlabelled"], split["train"],
                               np.arange(len(ds), len(corpus))])  # labels unused
    n_dropped = sum(ds.stats.get("dropped", {}).values())
    te = split["test"]
    rows = []
    dicts: dict[str, PhraseDict] = {}
    encoded: dict[tuple[str, bool], tuple] = {}
    seed = p.seed + p.draw
    for variant in p.variants:
        for frac in p.fractions:
            tr = subsample(split["train"], ds.labels, frac, seed)
            va = subsample(split["val"], ds.labels, frac, seed)
            pool = np.concatenate([split["unlabelled"], np.setdiff1d(split["train"], tr)])
            name = variant_dir(variant, frac, p)
            # self-training: after this fraction's model, each round's student learns from the
            # previous round's model
            rounds = p.self_train_rounds if p.self_train is not None and frac < 1 \
                and variant != "rf" else 0
            for student in range(rounds + 1):  # 0: the fraction's own model
                run = out / mode / _round_dir(name, student)
                if (run / "row.json").exists():  # finished before this run was interrupted
                    rows.append(json.loads((run / "row.json").read_text()))
                    log(f"[{mode}] {run.name}: finished in an earlier run, kept")
                    continue
                t0 = time.monotonic()
                if variant == "rf":
                    k = p.ready_packets
                    pred = random_forest(rf_features([ds.flows[i] for i in tr], k), ds.labels[tr],
                                         rf_features([ds.flows[i] for i in te], k), seed)
                    report = evaluate.metrics(ds.labels[te], pred, ds.classes, n_dropped=n_dropped)
                    run.mkdir(parents=True, exist_ok=True)
                    evaluate.write_json(report, run / "report.json")
                    rows.append(evaluate.compare_row(f"{mode}: random forest", report, labels=frac,
                                                     draw=p.draw, wall_s=time.monotonic() - t0))
                    _finish(log, mode, run, rows[-1], report)
                    continue
                key = "bytes" if variant == "bytes-only" else "phrases"
                if key not in dicts:
                    dicts[key] = PhraseDict.bytes_only() if key == "bytes" else PhraseDict.fit(
                        (pk for i in pre_rows for pk in corpus.flows[i]), p.vocab_size)
                phrases = dicts[key]
                aware = p.packet_aware and variant != "flag-flat"
                if (key, aware) not in encoded:  # once per input kind, not per label fraction
                    encoded[key, aware] = (
                        inputs.encode(phrases, corpus.flows, corpus.sides, p.max_len, aware),
                        (None, None) if outliers is None else
                        inputs.encode(phrases, outliers.flows, outliers.sides, p.max_len, aware))
                (ids, ctx), (o_ids, o_ctx) = encoded[key, aware]
                cfg = ModelConfig.preset(p.preset, vocab_size=phrases.vocab_size, max_len=p.max_len,
                                         packet_aware=aware, unwrap_tunnels=p.unwrap_tunnels,
                                         tunnel_packets=p.tunnel_packets,
                                         **p.overrides)
                init, pre_wall = None, 0.0
                tuned_cfg = cfg
                if variant == "flag-shallow":
                    tuned_cfg = p.shallow(cfg)
                if variant != "no-pretrain":
                    init, pre_wall = _pretrained(
                        out / mode / f"pretrain-{key}{'' if aware else '-flat'}", ids, ctx,
                        pre_rows, split["val"], cfg, phrases, p, log, progress)
                fit, fit_y = tr, ds.labels[tr]
                if p.synthetic_outliers:
                    o_ids, o_ctx = with_synthetic(o_ids, o_ctx, ds, tr, phrases, p.max_len, aware,
                                                  seed, run / "synthetic-outliers.npz")
                stretched = p.stretched(variant, frac)
                epochs = math.ceil(p.finetune_epochs / frac) if stretched else p.finetune_epochs
                if student:  # the teacher's confident labels join the real ones; as many steps
                    teacher = out / mode / _round_dir(name, student - 1)
                    extra_rows, extra_y = pseudo_labelled(teacher, ids, ctx, pool, p.self_train)
                    fit = np.concatenate([tr, extra_rows])
                    fit_y = np.concatenate([fit_y, extra_y])
                    steps = epochs * math.ceil(len(tr) / p.batch_size)
                    epochs = math.ceil(steps / math.ceil(len(fit) / p.batch_size))
                tuned = finetune(ids[fit], fit_y, ids[va], ds.labels[va], init=init, cfg=tuned_cfg,
                                 train_ctx=_rows(ctx, fit), val_ctx=_rows(ctx, va),
                                 labels=ds.classes, run_dir=run, epochs=epochs,
                                 batch_size=p.batch_size, lr=p.finetune_lr, balance=p.balance,
                                 vocab_sha256=phrases.sha256, seed=seed, progress=progress, log=log,
                                 outlier_ids=o_ids, outlier_ctx=o_ctx,
                                 outlier_weight=p.outlier_weight)
                wall = time.monotonic() - t0 + pre_wall
                phrases.save(run / "phrases.json")
                report = evaluate_split(run, ids[te], _rows(ctx, te), ds.labels[te], ds.classes,
                                        n_dropped)
                evaluate.write_json(report, run / "report.json")
                n_params = sum(v.numel() for v in
                               torch.load(run / "best.pt", weights_only=True)["model"].values())
                evaluate.write_json({k: v for k, v in tuned.items() if k != "confusion"},
                                    run / "finetune.json")  # the per-epoch validation history
                how = (", equal steps" if stretched else "") + (
                    f", self-trained ({len(fit) - len(tr)} pseudo-labels)" if student else "") + (
                    f", round {student}" if student > 1 else "")
                rows.append(evaluate.compare_row(f"{mode}: {variant}{how}", report, labels=frac,
                                                 draw=p.draw, wall_s=wall, model_params=n_params)
                            | {"val_macro_f1": tuned["best_val_macro_f1"]})  # what a sweep picks on
                if variant in ("flag", "flag-shallow") and frac == 1.0:  # models to ship: bundles
                    export(run, phrases, ds, p, report, te)
                _finish(log, mode, run, rows[-1], report)
    return rows


def with_synthetic(o_ids: np.ndarray | None, o_ctx: np.ndarray | None, ds: Dataset,
                   rows: np.ndarray, phrases: PhraseDict, max_len: int, aware: bool, seed: int,
                   path: Path, unwrap_tunnels: bool = False, tunnel_packets: int = 0
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """The exposure input plus synthetic outliers made from `rows` (training rows only), which
    are also saved at `path`, for `flagd calibrate --exposure`."""
    synthetic = synthesize(ds, rows, seed)
    synthetic.save(path)
    s_ids, s_ctx = inputs.encode(phrases, synthetic.flows, synthetic.sides, max_len, aware,
                                 unwrap_tunnels, tunnel_packets)
    if o_ids is None:
        return s_ids, s_ctx
    return np.concatenate([o_ids, s_ids]), None if o_ctx is None else np.concatenate([o_ctx, s_ctx])


def pseudo_labelled(teacher: Path, ids: np.ndarray, ctx: np.ndarray | None, pool: np.ndarray,
                    min_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """The rows of pool that the fine-tuned model in teacher/ gives at least min_prob, and the
    classes it gives them: self-training's extra flows (their own labels are never read)."""
    logits = run_logits(teacher, ids[pool], _rows(ctx, pool))
    prob, label = torch.softmax(logits, -1).max(-1)
    keep = (prob >= min_prob).numpy()
    return pool[keep], label.numpy()[keep]


def _round_dir(name: str, student: int) -> str:
    return name if not student else f"{name}-self-trained" + (str(student) if student > 1 else "")


def variant_dir(variant: str, frac: float, p: Protocol) -> str:
    """A variant's directory in the run: its own for every label fraction, equal-steps
    schedule and draw, so one run directory takes them all and resumes each."""
    steps = "-equal-steps" if p.stretched(variant, frac) else ""
    return f"{variant}-{int(frac * 100)}{steps}" + (f"-draw{p.draw}" if p.draw else "")


def _rows(ctx: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if ctx is None else ctx[idx]


def _finish(log: Callable[[str], None], mode: str, run: Path, row: dict, report: dict) -> None:
    """Log a finished variant and mark it done (row.json), so a restarted run skips it."""
    (run / "row.json").write_text(json.dumps(row))
    log(f"[{mode}] {run.name}: accuracy {report['accuracy']:.4f} macro-F1 "
        f"{report['macro_f1']:.4f} TPR {report['tpr']:.4f} FPR {report['fpr']:.4f}")


def _pretrained(run: Path, ids: np.ndarray, ctx: np.ndarray | None, rows: np.ndarray,
                val: np.ndarray, cfg: ModelConfig, phrases: PhraseDict, p: Protocol,
                log: Callable[[str], None], progress: bool) -> tuple[dict, float]:
    """The pre-trained checkpoint of one dictionary and input kind: trained once per mode,
    resumed if interrupted, reused by every label fraction."""
    if not (run / "wall_s").exists():  # not finished: start, or resume an interrupted run
        done = pretrain(ids[rows], ids[val], cfg, run, train_ctx=_rows(ctx, rows),
                        val_ctx=_rows(ctx, val), epochs=p.pretrain_epochs,
                        batch_size=p.pretrain_batch_size or p.batch_size, lr=p.pretrain_lr,
                        vocab_sha256=phrases.sha256, seed=p.seed, progress=progress, log=log,
                        resume=(run / "last.pt").exists())
        evaluate.write_json(done, run / "history.json")  # the validation curve a card prints
        (run / "wall_s").write_text(f"{done['seconds']:.1f}")  # every sitting's
    return torch.load(run / "best.pt", weights_only=True), float((run / "wall_s").read_text())


def unwrapped_dataset(ds: Dataset, tunnel_packets: int = 0) -> Dataset:
    """ds with every VPN tunnel flow read from inside (at most tunnel_packets data packets), as
    a model with unwrap_tunnels reads it."""
    flows, sides = inputs.unwrapped(ds.flows, ds.sides, tunnel_packets)
    return Dataset(flows, sides, ds.labels, ds.classes, ds.source, ds.sources, ds.start,
                   ds.settings, ds.stats)


def _concat(a: Dataset, b: Dataset) -> Dataset:
    """a's flows then b's, b unlabelled (its sources appended to a's)."""
    return Dataset(a.flows + b.flows, a.sides + b.sides,
                   np.concatenate([a.labels, np.full(len(b), -1, a.labels.dtype)]), a.classes,
                   np.concatenate([a.source, b.source + len(a.sources)]), a.sources + b.sources,
                   np.concatenate([a.start, b.start]), a.settings, a.stats)


def export(run: Path, phrases: PhraseDict, ds: Dataset, p: Protocol, report: dict,
           test: np.ndarray) -> Path:
    """Write run/model/, a bundle `flagd replay --model` loads, with its test report and the
    flows of its test split (capture and flow start), so a test can score them again."""
    best = torch.load(run / "best.pt", weights_only=True)
    test_flows = sorted([ds.sources[ds.source[i]], float(ds.start[i])] for i in test)
    return save_bundle(run / "model", best, phrases, FlowSettings.from_dict(ds.settings),
                       p.max_len, metrics=report, test_flows=test_flows)


def _dataset(path: Path, make: Callable[[], Dataset]) -> Dataset:
    """The dataset saved at path by an earlier (interrupted) run of the same protocol, or a new
    one built and saved there."""
    if path.exists():
        return Dataset.load(path)
    ds = make()
    ds.save(path)
    return ds


def run_protocol(tree: list[Path], out: Path, p: Protocol, label_kind: str = "dir",
                 log: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Build the datasets, run every mode, write out/report.json; returns the table rows."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(asdict(p), indent=2))
    rows = []
    for mode in p.modes:
        # loio splits lab runs, whose random server ports are one per app and run: mask them
        settings = p.flow_settings(honest=mode == "honest" or mode in LOIO_MODES)
        ds = _dataset(out / mode / "dataset.npz",
                      lambda settings=settings: build(tree, settings, label=labeller(label_kind)))
        log(f"[{mode}] dataset: {len(ds)} flows, {ds.stats.get('duplicates', 0)} duplicates "
            f"removed, dropped {ds.stats['dropped']}")
        # the extra flows are masked exactly as the labelled ones, also when those were built
        # beforehand with other masks (`flagd dataset build --honest` for a product run):
        # exposure flows that differ in a masked field alone would teach that field
        settings = FlowSettings.from_dict(ds.settings)
        extra = None
        if p.unlabelled:
            extra = _dataset(out / mode / "unlabelled.npz",
                             lambda settings=settings: build(p.unlabelled, settings))
        outliers = None
        if p.outliers:
            outliers = _dataset(out / mode / "outliers.npz",
                                lambda settings=settings: build(p.outliers, settings))
            if not len(outliers):
                raise ValueError(f"no flows in {', '.join(p.outliers)} for outlier exposure")
            log(f"[{mode}] {len(outliers)} foreign flows for outlier exposure")
        rows += run_mode(ds, mode, p, out, extra, log, progress, outliers)
    (out / "report.json").write_text(json.dumps({"protocol": asdict(p), "rows": rows}, indent=2))
    return rows
