"""Do side channels carry a class across implementations where bytes do not? Forests on a LOIO split.

Reads a finished `flagd train --mode loio` run (its dataset.npz and split.json) and fits the
run's random forest (300 trees) on four inputs of the same train flows: the first 64 model bytes
of each of the first K packets (the run's own forest row), side channels only (direction-signed
wire length and log gap of each of the first K packets, plus per-flow packet and byte totals),
and the side channels with each length minus the flow's smallest (a tunnel's constant overhead
drops out), alone and beside the bytes. Prints validation and test macro-F1, test macro-F1 by
what was new to the model (implementation, condition, both) and per-class F1 of the vpn-* classes.

    python benchmarks/loio_side_channels.py runs/lab-loio/loio [--packets 32]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flagd.dataset import Dataset
from flagd.evaluate import metrics
from flagd.experiment import RF_TREES, held_out_condition, implementation, lab_sessions, rf_features


def side_channels(sides: list[list[tuple[int, int, float]]], k: int, relative: bool) -> np.ndarray:
    """(N, 3k + 5): signed lengths, log10 gaps, directions of the first k packets; packets,
    packets and bytes each way."""
    x = np.zeros((len(sides), 3 * k + 5), np.float32)
    for i, flow in enumerate(sides):
        s = np.array(flow[:k], np.float64).reshape(-1, 3)  # direction, wire length, gap
        n = len(s)
        if not n:
            continue
        sign = np.where(s[:, 0] == 0, 1.0, -1.0)  # client -> server positive
        size = s[:, 1] - s[:, 1].min() if relative else s[:, 1]
        x[i, :n] = sign * size
        x[i, k:k + n] = np.log10(s[:, 2] + 1e-6)
        x[i, 2 * k:2 * k + n] = sign
        up = s[:, 0] == 0
        x[i, 3 * k:] = [n, up.sum(), (~up).sum(), size[up].sum(), size[~up].sum()]
    return x


def novelty(ds: Dataset, split: dict[str, np.ndarray]) -> np.ndarray:
    """For each test flow: what was new to a model trained on train + validation."""
    rec = lab_sessions(ds)
    seen = {(int(ds.labels[i]), implementation(rec[ds.source[i]]))
            for i in np.concatenate([split["train"], split["val"]])}
    out = []
    for i in split["test"]:
        new_impl = (int(ds.labels[i]), implementation(rec[ds.source[i]])) not in seen
        new_cond = held_out_condition(rec[ds.source[i]])
        out.append({(True, False): "implementation", (False, True): "condition",
                    (True, True): "both", (False, False): "neither"}[(new_impl, new_cond)])
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a loio mode directory: RUN/loio")
    ap.add_argument("--packets", type=int, default=32, help="K, as the run's dataset was built")
    a = ap.parse_args()
    ds = Dataset.load(a.run / "dataset.npz")
    split = {k: np.array(v, np.int64) for k, v in json.loads((a.run / "split.json").read_text()).items()}
    k = a.packets

    def sides(idx: np.ndarray, relative: bool) -> np.ndarray:
        return side_channels([ds.sides[i] for i in idx], k, relative)

    def raw(idx: np.ndarray) -> np.ndarray:
        return rf_features([ds.flows[i] for i in idx], k).astype(np.float32)

    inputs: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "bytes (the run's forest)": raw,
        "side channels": lambda idx: sides(idx, False),
        "side channels, relative sizes": lambda idx: sides(idx, True),
        "bytes + relative sizes": lambda idx: np.hstack([raw(idx), sides(idx, True)]),
    }
    from sklearn.ensemble import RandomForestClassifier

    tr, va, te = split["train"], split["val"], split["test"]
    y, kind = ds.labels, novelty(ds, split)
    for name, features in inputs.items():
        rf = RandomForestClassifier(n_estimators=RF_TREES, n_jobs=-1, random_state=0)
        rf.fit(features(tr), y[tr])
        val = metrics(y[va], rf.predict(features(va)), ds.classes)["macro_f1"]
        pred = rf.predict(features(te))
        test = metrics(y[te], pred, ds.classes)
        row = [f"validation {val:.3f}", f"test {test['macro_f1']:.3f}"]
        for part in ("implementation", "condition", "both"):
            m = kind == part
            if m.any():  # mean F1 over the classes in this part's truth (as the card's scorer)
                sub = metrics(y[te][m], pred[m], ds.classes)["classes"]
                row.append(f"{part} {np.mean([sub[ds.classes[c]]['f1'] for c in set(y[te][m])]):.3f}")
        vpn = [f"{c} {v['f1']:.2f}" for c, v in test["classes"].items() if c.startswith("vpn-")]
        print(f"{name:32s} " + "  ".join(row) + "\n" + " " * 33 + "  ".join(vpn))


if __name__ == "__main__":
    main()
