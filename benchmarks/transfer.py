"""Does a `flagd train` run's ranking hold on other captures? Its models on flows it never saw.

Reads a finished run's mode directory (dataset.npz, split.json, and protocol.json beside it) and
scores each of its all-labels models (`*-100`: FLAG, no pre-training, bytes-only, ...) and its
random forest, refitted on the same train flows with the run's seed, on the run's own test
split and on other labelled datasets built with the run's settings (`flagd dataset build` with
its flags). Flows from `flagd lab generate` runs are also broken down by their session's delay
and loss, and by whether their class was trained in that implementation (client app or tunnel
kind: a LOIO run's held-out ones). Prints macro-F1 (accuracy) per group and per-class F1.

    python benchmarks/transfer.py runs/lab-train/product d6.npz d7.npz [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from flagd import evaluate, inputs
from flagd.dataset import Dataset
from flagd.experiment import (
    LOIO_MODES,
    implementation,
    lab_sessions,
    random_forest,
    rf_features,
    run_logits,
    unwrapped_dataset,
)
from flagd.phrases import PhraseDict


def lab_groups(
    parts: list[Dataset], y: np.ndarray, trained: set, vpn: str
) -> dict[str, np.ndarray]:
    """Masks over the concatenated flows of `parts` by their lab session; {} if any is no lab run."""
    recs = []
    try:
        for d in parts:
            per_capture = lab_sessions(d)
            recs += [per_capture[j] for j in d.source]
    except ValueError:
        return {}
    cond = [r.get("conditions") or {} for r in recs]
    delay = np.array([c.get("delay_ms", 0.0) for c in cond])
    loss = np.array([c.get("loss_pct", 0.0) for c in cond])
    new_impl = np.array(
        [(int(c), implementation(r, vpn)) not in trained for c, r in zip(y, recs, strict=True)]
    )
    groups = {"delay < 10 ms": delay < 10, "delay 10-50 ms": (delay >= 10) & (delay < 50),
              "delay >= 50 ms": delay >= 50, "loss > 0": loss > 0, "loss = 0": loss == 0}  # fmt: skip
    if new_impl.any():
        groups |= {"trained implementation": ~new_impl, "new implementation": new_impl}
    return {k: v for k, v in groups.items() if v.any()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a flagd train mode directory (…/product, …/loio)")
    ap.add_argument("data", type=Path, nargs="+", help="labelled datasets (.npz), same settings")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    proto = json.loads((a.run.parent / "protocol.json").read_text())
    ds = Dataset.load(a.run / "dataset.npz")
    split = {
        k: np.array(v, np.int64) for k, v in json.loads((a.run / "split.json").read_text()).items()
    }
    tr, te = split["train"], split["test"]
    parts = [Dataset.load(p) for p in a.data]
    for p, d in zip(a.data, parts, strict=True):
        if d.settings != ds.settings:
            raise SystemExit(f"{p}: built with other settings than {a.run / 'dataset.npz'}")
    if proto.get("unwrap_tunnels"):  # VPN flows from inside, as the run's models and forest read them
        n = proto.get("tunnel_packets", 0)
        ds, parts = unwrapped_dataset(ds, n), [unwrapped_dataset(d, n) for d in parts]
    y = np.concatenate([[ds.classes.index(d.classes[i]) for i in d.labels] for d in parts])
    flows = [f for d in parts for f in d.flows]
    sides = [s for d in parts for s in d.sides]
    vpn = LOIO_MODES.get(a.run.name, "tunnel")  # what a vpn-* class holds out
    try:
        recs = lab_sessions(ds)
        trained = {(int(ds.labels[i]), implementation(recs[ds.source[i]], vpn)) for i in tr}
    except ValueError:
        trained = set()
    groups = {"run's test": None, "new flows": np.ones(len(y), bool)}
    groups |= lab_groups(parts, y, trained, vpn) if trained else {}
    print(
        f"{a.run}: train {len(tr)}, test {len(te)}; new flows {len(y)} from "
        + ", ".join(str(p) for p in a.data)
    )
    print("  ".join(f"{g} ({len(te) if m is None else int(m.sum())})" for g, m in groups.items()))
    out: dict = {}

    def score(name: str, pred_test: np.ndarray, pred_new: np.ndarray) -> None:
        row = {}
        for g, m in groups.items():
            truth, pred = (ds.labels[te], pred_test) if m is None else (y[m], pred_new[m])
            r = evaluate.metrics(truth, pred, ds.classes)
            row[g] = {"n": len(truth), "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                      "f1": {c: v["f1"] for c, v in r["classes"].items()}}  # fmt: skip
        out[name] = row
        print(
            f"{name:>16}  "
            + "  ".join(f"{g}: {v['macro_f1']:.4f} ({v['accuracy']:.4f})" for g, v in row.items()),
            flush=True,
        )

    for model in sorted(a.run.glob("*-100/best.pt")):
        d = model.parent
        phrases = PhraseDict.load(d / "phrases.json")
        aware = json.loads((d / "config.json").read_text())["model"]["packet_aware"]
        ids, ctx = inputs.encode(phrases, [ds.flows[i] for i in te], [ds.sides[i] for i in te],
                                 proto["max_len"], aware)  # fmt: skip
        n_ids, n_ctx = inputs.encode(phrases, flows, sides, proto["max_len"], aware)
        score(
            d.name,
            run_logits(d, ids, ctx).argmax(-1).numpy(),
            run_logits(d, n_ids, n_ctx).argmax(-1).numpy(),
        )
    if (a.run / "rf-100").is_dir():
        k = proto["ready_packets"]
        x = np.concatenate([rf_features([ds.flows[i] for i in te], k), rf_features(flows, k)])
        pred = random_forest(rf_features([ds.flows[i] for i in tr], k), ds.labels[tr], x,
                             proto["seed"] + proto.get("draw", 0))  # fmt: skip
        score("rf-100", pred[: len(te)], pred[len(te) :])
    print("per-class F1 on the new flows:")
    for name, row in out.items():
        print(f"{name:>16}  " + " ".join(f"{c} {f:.3f}" for c, f in row["new flows"]["f1"].items()
                                         if f is not None))  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
