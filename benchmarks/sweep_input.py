"""Choose K (packets), B (bytes per packet) and max_len on validation, never on test.

Builds nothing itself: give it a dataset built with the largest K and B of the sweep
(`flagd dataset build TREE -o big.npz --packets 8 --packet-bytes 128`); smaller K and B are
exact cuts of it (the first K kept packets, the first B model bytes of each; flagd's model
bytes are capped after masking and padding, so a cut equals a rebuild). Each setting is scored
by a packet-aware FLAG fine-tuned from random weights (pre-training would cost each setting an
hour here, and the input question is the same for both) and by the random forest, both on the
product split's validation flows (flagd.experiment: 80/10/10 per class, seed 0). The test split
is never read.

    python benchmarks/sweep_input.py big.npz --out runs/sweep --setting 5,128,128 --setting 8,64,128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flagd import evaluate, inputs
from flagd.dataset import Dataset
from flagd.experiment import PRODUCT_SHARES, random_forest, rf_features, split_random
from flagd.model import ModelConfig
from flagd.phrases import PhraseDict
from flagd.train import finetune


def cut(ds: Dataset, k: int, b: int) -> tuple[list[list[bytes]], list[list[tuple]]]:
    return [[p[:b] for p in f[:k]] for f in ds.flows], [s[:k] for s in ds.sides]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--setting", action="append", required=True, help="K,B,max_len")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()

    ds = Dataset.load(args.dataset)
    split = split_random(ds, 0, PRODUCT_SHARES)
    tr, va = split["train"], split["val"]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "sweep.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for setting in args.setting:
        k, b, max_len = map(int, setting.split(","))
        if setting in results:
            continue
        flows, sides = cut(ds, k, b)
        t0 = time.monotonic()
        rf_pred = random_forest(rf_features([flows[i] for i in tr], k), ds.labels[tr],
                                rf_features([flows[i] for i in va], k), seed=0)
        rf = evaluate.metrics(ds.labels[va], rf_pred, ds.classes)
        phrases = PhraseDict.fit((p for i in tr for p in flows[i]), args.vocab_size)
        ids, ctx = inputs.encode(phrases, flows, sides, max_len, packet_aware=True)
        cfg = ModelConfig.preset(args.preset, vocab_size=phrases.vocab_size, max_len=max_len,
                                 packet_aware=True)
        m = finetune(ids[tr], ds.labels[tr], ids[va], ds.labels[va], train_ctx=ctx[tr],
                     val_ctx=ctx[va], init=None, cfg=cfg, labels=ds.classes,
                     run_dir=args.out / f"k{k}-b{b}-len{max_len}", epochs=args.epochs,
                     batch_size=32, lr=1e-3, balance="weights", progress=False, log=print)
        results[setting] = {"K": k, "B": b, "max_len": max_len,
                            "val_macro_f1": m["best_val_macro_f1"], "val_acc": m["best_val_acc"],
                            "rf_val_macro_f1": rf["macro_f1"], "rf_val_acc": rf["accuracy"],
                            "seconds": round(time.monotonic() - t0, 1)}
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps(results[setting]), flush=True)
    print(f"{'K':>3} {'B':>4} {'len':>4}  {'FLAG val F1':>11} {'acc':>6}  {'RF val F1':>9} {'acc':>6}")
    for r in results.values():
        print(f"{r['K']:>3} {r['B']:>4} {r['max_len']:>4}  {r['val_macro_f1']:>11.4f} "
              f"{r['val_acc']:>6.4f}  {r['rf_val_macro_f1']:>9.4f} {r['rf_val_acc']:>6.4f}")


if __name__ == "__main__":
    main()
