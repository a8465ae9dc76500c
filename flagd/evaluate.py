"""Classification metrics and reports: the paper's TPR/FPR/FTF, macro-F1, confusion matrix.

Pure numpy: the caller runs the model and hands over integer labels (`y_true`, `y_pred`), so this
module can score any classifier and is tested on matrices small enough to check by hand.

Definitions (FLAG, Wei et al., APNet 2021, doi:10.1145/3469393.3469394, eqs. 5-8, which take
them from FS-Net, Liu et al., INFOCOM 2019). We could not find either paper's own text of the
equations, so these are the definitions as our design brief states them. FS-Net's published
figures (TPR 0.9914, FPR 0.0005, FTF 0.9906) at least fit this form: FTF is close to TPR/(1+FPR).

    TPR_c   = TP_c / (TP_c + FN_c)             recall of class c
    FPR_c   = FP_c / (FP_c + TN_c)             flows wrongly predicted as c, over flows not of c
    TPR_AVE = sum_c N_c TPR_c / sum_c N_c      N_c = number of flows whose true class is c
    FPR_AVE = sum_c N_c FPR_c / sum_c N_c
    FTF     = sum_c w_c TPR_c / (1 + FPR_c)    w_c = N_c / N

Note that the flow-weighted TPR_AVE is sum_c TP_c / N, i.e. exactly the overall accuracy; the
report keeps both keys because the paper's tables speak of TPR.

Undefined rates (0/0) are reported as None (JSON null), never as a made-up 0:
- `tpr` of a class with no flows, `precision` of a class never predicted, `fpr` of a class
  that holds every flow (it has no negatives), `f1` of a class absent from both y_true and y_pred.
- In the flow-weighted sums a class with no flows has weight 0, and the one FPR that can be
  undefined with a non-zero weight (one class holds every flow) counts as 0: with no negatives
  there can be no false positive.
- F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c), defined whenever c occurs in y_true or y_pred; a class
  with flows that is never predicted gets F1 = 0. macro-F1 averages F1 over the classes that occur
  in y_true or y_pred and leaves out classes absent from both (nothing was measured for them).
  This is what scikit-learn's f1_score(average="macro") does when `labels` is not given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

# The paper's published FLAG figures on ISCX VPN-nonVPN, 12 classes (Wei et al., APNet 2021,
# abstract: "98.65% in 100% of dataset and 98.07% in 10% of dataset in terms of true positive
# rate"). We did not find the paper's FPR/FTF/accuracy figures, so they stay None.
PAPER_FLAG_RESULTS: tuple[dict[str, Any], ...] = (
    {"name": "FLAG (paper)", "labels": 1.0, "tpr": 0.9865, "fpr": None, "ftf": None},
    {"name": "FLAG (paper)", "labels": 0.1, "tpr": 0.9807, "fpr": None, "ftf": None},
)

_RATE = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_UNIT = {"type": "number", "minimum": 0, "maximum": 1}
_COUNT = {"type": "integer", "minimum": 0}

# JSON Schema (draft 2020-12) of the dict `metrics` returns and `write_json` writes. What it
# cannot say (confusion is len(class_names) square, classes keyed by class_names, rows sum to
# support) is checked in tests/test_evaluate.py.
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://flagd.invalid/schema/evaluation-report.json",
    "title": "flagd evaluation report",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "n_flows", "n_dropped", "accuracy", "macro_f1", "tpr", "fpr", "ftf",
        "classes", "confusion", "class_names",
    ],
    "properties": {
        "n_flows": {**_COUNT, "minimum": 1, "description": "flows scored"},
        "n_dropped": {**_COUNT, "description": "flows left out: no relevant packet"},
        "accuracy": _UNIT,
        "macro_f1": _UNIT,
        "tpr": {**_UNIT, "description": "TPR_AVE, flow-weighted over classes"},
        "fpr": {**_UNIT, "description": "FPR_AVE, flow-weighted over classes"},
        "ftf": {**_UNIT, "description": "sum_c (N_c/N) TPR_c / (1 + FPR_c)"},
        "classes": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["tpr", "fpr", "precision", "f1", "support"],
                "properties": {
                    "tpr": _RATE,
                    "fpr": _RATE,
                    "precision": _RATE,
                    "f1": _RATE,
                    "support": _COUNT,
                },
            },
        },
        "confusion": {
            "description": "rows = true class, columns = predicted class, in class_names order",
            "type": "array",
            "items": {"type": "array", "items": _COUNT},
        },
        "class_names": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "openset": {
            "description": "open-set rejection at the bundle's threshold (the closed-set figures "
                           "above have rejection off)",
            "type": "object",
            "additionalProperties": False,
            "required": ["method", "temperature", "threshold", "coverage", "accepted_accuracy",
                         "rejection_rate", "ece_before", "ece_after", "foreign"],
            "properties": {
                "method": {"type": ["string", "null"], "description": "null: no rejection fitted"},
                "temperature": {"type": "number", "exclusiveMinimum": 0},
                "threshold": {"type": ["number", "null"]},
                "min_confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "coverage": {**_UNIT, "description": "share of flows accepted (not unknown)"},
                "accepted_accuracy": {**_RATE, "description": "accuracy on accepted flows"},
                "rejection_rate": {**_UNIT, "description": "share labelled unknown: 1 - coverage"},
                "ece_before": {**_UNIT, "description": "ECE, 15 bins, softmax at T = 1"},
                "ece_after": {**_UNIT, "description": "ECE, 15 bins, at the fitted temperature"},
                "foreign": {
                    "description": "per foreign source: flows, AUROC of the rejection score "
                                   "(these flows vs the scored ones), share labelled unknown, "
                                   "and the same share per capture file",
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["n_flows", "auroc", "rejection_rate", "n_captures",
                                     "capture_rejection_rate", "most_accepted"],
                        "properties": {
                            "n_flows": {**_COUNT, "minimum": 1}, "auroc": _UNIT,
                            "rejection_rate": _UNIT,
                            "n_captures": {**_COUNT, "minimum": 1},
                            "capture_rejection_rate": {
                                **_UNIT, "description": "mean over captures of the share of "
                                                        "their flows labelled unknown"},
                            "most_accepted": {
                                "description": "the captures with the most accepted flows: "
                                               "[capture, accepted, flows], at most 5",
                                "type": "array", "maxItems": 5,
                                "items": {"type": "array", "prefixItems": [
                                    {"type": "string"}, _COUNT, _COUNT], "items": False},
                            },
                        },
                    },
                },
            },
        },
    },
}


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts; row = true class, column = predicted class."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels, y_pred has {p.size}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} holds labels outside [0, {n_classes})")
    # One bincount over the flattened (true, pred) pair index: no Python loop over flows.
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes)


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the truth or the predictions (rows: true class,
    columns: predicted), as sklearn's f1_score(average="macro") computes it."""
    cm = np.asarray(confusion, np.float64)
    tp = np.diag(cm)
    f1 = _ratio(2 * tp, cm.sum(1) + cm.sum(0))
    present = ~np.isnan(f1)
    return float(f1[present].mean()) if present.any() else 0.0


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den element-wise, NaN where den == 0 (an undefined rate, not a zero one)."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
            class_names: Sequence[str], n_dropped: int = 0) -> dict[str, Any]:
    """Score integer predictions; label i means class_names[i]. Returns the report dict.

    `n_dropped` (flows that never reached the classifier because no relevant packet was left)
    is only recorded: the rates are over the scored flows, as in the paper.
    """
    names = [str(c) for c in class_names]
    if len(set(names)) != len(names):
        raise ValueError("class_names must be unique")
    cm = confusion_matrix(y_true, y_pred, len(names))
    n = int(cm.sum())
    if n == 0:
        raise ValueError("no flows to evaluate")

    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)  # N_c
    predicted = cm.sum(axis=0).astype(np.float64)
    fn = support - tp
    fp = predicted - tp
    tn = n - tp - fn - fp

    tpr = _ratio(tp, tp + fn)
    fpr = _ratio(fp, fp + tn)
    precision = _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)

    w = support / n  # w_c = N_c / N; zero for classes with no flows
    tpr_w = np.nan_to_num(tpr, nan=0.0)  # NaN only where w == 0
    fpr_w = np.nan_to_num(fpr, nan=0.0)  # NaN with w > 0 only when one class holds every flow

    return {
        "n_flows": n,
        "n_dropped": int(n_dropped),
        "accuracy": float(tp.sum() / n),
        "macro_f1": macro_f1(cm),
        "tpr": float(np.sum(w * tpr_w)),
        "fpr": float(np.sum(w * fpr_w)),
        "ftf": float(np.sum(w * tpr_w / (1.0 + fpr_w))),
        "classes": {
            name: {
                "tpr": _opt(tpr[i]),
                "fpr": _opt(fpr[i]),
                "precision": _opt(precision[i]),
                "f1": _opt(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion": cm.tolist(),
        "class_names": names,
    }


def auroc(inside: Sequence[float] | np.ndarray, outside: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of a score meant to be higher for `inside` than for `outside`
    flows: the probability that a random inside flow outscores a random outside one, ties
    counting one half (the Mann-Whitney U statistic over the two sizes)."""
    a = np.asarray(inside, np.float64).ravel()
    b = np.asarray(outside, np.float64).ravel()
    if not len(a) or not len(b):
        raise ValueError("AUROC needs flows on both sides")
    both = np.concatenate([a, b])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # tied scores share the mean of their ranks
    uniq, inv, counts = np.unique(both, return_inverse=True, return_counts=True)
    if len(uniq) < len(both):
        sums = np.bincount(inv, weights=ranks)
        ranks = (sums / counts)[inv]
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def ece(confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray,
        bins: int = 15) -> float:
    """Expected calibration error: over `bins` equal-width confidence bins, the flow-weighted
    mean of |accuracy - mean confidence| (Guo et al. 2017; 15 bins as there)."""
    conf = np.asarray(confidence, np.float64).ravel()
    ok = np.asarray(correct, np.float64).ravel()
    if conf.shape != ok.shape or not len(conf):
        raise ValueError("confidence and correct must be equally long and not empty")
    b = np.minimum((conf * bins).astype(np.int64), bins - 1)  # confidence 1.0 in the last bin
    n = np.bincount(b, minlength=bins)
    gap = np.abs(np.bincount(b, ok, bins) - np.bincount(b, conf, bins))
    return float(gap.sum() / n.sum())


def openset_report(y_true: Sequence[int] | np.ndarray, probs_before: np.ndarray,
                   probs_after: np.ndarray, scores: np.ndarray, accepted: np.ndarray,
                   foreign: dict[str, tuple[np.ndarray, np.ndarray]], *, method: str | None,
                   temperature: float, threshold: float | None,
                   min_confidence: float = 0.0) -> dict[str, Any]:
    """The report's `openset` part, from arrays the caller computed with the model.

    probs_before/after: softmax at T = 1 and at the fitted T (N, K); scores: rejection score per
    flow (higher = in-distribution); accepted: not labelled unknown; foreign: per source name,
    its (scores, accepted, capture of each flow)."""
    y = np.asarray(y_true, np.int64)
    accepted = np.asarray(accepted, bool)
    right = probs_after.argmax(1) == y
    n_acc = int(accepted.sum())
    return {
        "method": method,
        "temperature": float(temperature),
        "threshold": None if threshold is None else float(threshold),
        "min_confidence": float(min_confidence),
        "coverage": n_acc / len(y),
        "accepted_accuracy": float(right[accepted].mean()) if n_acc else None,
        "rejection_rate": 1 - n_acc / len(y),
        "ece_before": ece(probs_before.max(1), probs_before.argmax(1) == y),
        "ece_after": ece(probs_after.max(1), right),
        "foreign": {name: _foreign_figures(scores, *f) for name, f in foreign.items()},
    }


def _foreign_figures(inside: np.ndarray, scores: np.ndarray, accepted: np.ndarray,
                     captures: Sequence[str]) -> dict[str, Any]:
    """One foreign source's figures. A foreign corpus is lumpy (one capture of a scan or a
    flood can hold a sixth of its flows), so the share per capture and the captures that let
    the most flows through stand next to the share per flow."""
    accepted = np.asarray(accepted, bool)
    names, which = np.unique(np.asarray(captures, str), return_inverse=True)
    flows = np.bincount(which, minlength=len(names))
    took = np.bincount(which, accepted, len(names)).astype(np.int64)
    top = [i for i in np.argsort(-took, kind="stable")[:5] if took[i]]
    return {"n_flows": len(accepted), "auroc": auroc(inside, scores),
            "rejection_rate": float(1 - accepted.mean()), "n_captures": len(names),
            "capture_rejection_rate": float(np.mean(1 - took / flows)),
            "most_accepted": [[Path(names[i]).name, int(took[i]), int(flows[i])] for i in top]}


def render_openset(report: dict[str, Any]) -> Table:
    """The open-set figures: calibration, coverage, and per foreign source AUROC/rejection."""
    o = report["openset"]
    method = o["method"] or "none fitted (scores: max softmax)"
    table = Table(title="Open-set rejection",
                  caption=(f"method {method}, T {o['temperature']:.3f}, threshold "
                           f"{_fmt(o['threshold'])}; ECE (15 bins) {o['ece_before']:.4f} before, "
                           f"{o['ece_after']:.4f} after temperature scaling"))
    table.add_column("flows")
    for col in ("n", "AUROC", "labelled unknown", "per capture", "accuracy on accepted"):
        table.add_column(col, justify="right")
    table.add_row("in-distribution (above)", str(report["n_flows"]), "",
                  f"{o['rejection_rate']:.2%}", "", _fmt(o["accepted_accuracy"]))
    for name, f in o["foreign"].items():
        table.add_row(f"foreign: {name}", f"{f['n_flows']} in {f['n_captures']} captures",
                      f"{f['auroc']:.4f}", f"{f['rejection_rate']:.2%}",
                      f"{f['capture_rejection_rate']:.2%}", "")
    leaks = [f"{name}: " + ", ".join(f"{c} {a}/{n}" for c, a, n in f["most_accepted"])
             for name, f in o["foreign"].items() if f["most_accepted"]]
    if leaks:
        table.caption += "\nmost accepted foreign flows (capture accepted/flows): " + "; ".join(leaks)
    return table


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_table(report: dict[str, Any]) -> Table:
    """Per-class TPR/FPR/precision/F1/support, then the flow-weighted and macro totals."""
    table = Table(
        title="Evaluation",
        caption=(f"{report['n_flows']} flows scored, {report['n_dropped']} dropped (no relevant "
                 f"packet); accuracy {_fmt(report['accuracy'])}, FTF {_fmt(report['ftf'])}"),
    )
    table.add_column("class")
    for col in ("TPR", "FPR", "precision", "F1", "support"):
        table.add_column(col, justify="right")
    for name in report["class_names"]:
        c = report["classes"][name]
        table.add_row(name, _fmt(c["tpr"]), _fmt(c["fpr"]), _fmt(c["precision"]), _fmt(c["f1"]),
                      str(c["support"]))
    table.add_section()
    table.add_row("flow-weighted", _fmt(report["tpr"]), _fmt(report["fpr"]), "", "",
                  str(report["n_flows"]), style="bold")
    table.add_row("macro", "", "", "", _fmt(report["macro_f1"]), "", style="bold")
    return table


def save_heatmap(report: dict[str, Any], path: str | Path) -> Path:
    """Write the row-normalised confusion matrix as a PNG, counts annotated in each cell."""
    # matplotlib is imported here, not at module level: it costs ~0.5 s and only reports draw.
    # Figure + savefig uses the Agg canvas directly, so no pyplot global state or backend switch
    # (safe from any thread, and in a daemon with no display).
    from matplotlib.figure import Figure

    names = report["class_names"]
    cm = np.asarray(report["confusion"], dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)

    k = len(names)
    side = max(4.0, 0.6 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(k), labels=names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion, rows normalised: accuracy {report['accuracy']:.4f}, "
                 f"{report['n_flows']} flows")
    fontsize = 8 if k <= 12 else 6
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=fontsize,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as indented JSON (null for undefined rates)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def compare_row(name: str, report: dict[str, Any], *, labels: float, draw: int = 0,
                wall_s: float | None = None, model_params: int | None = None) -> dict[str, Any]:
    """One `compare_table` row from a report: `labels` is the labelled fraction (1.0, 0.1),
    `draw` which random draw of those labels (0: the run's seed)."""
    return {
        "name": name, "labels": labels, "draw": draw, "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"], "tpr": report["tpr"], "fpr": report["fpr"],
        "ftf": report["ftf"], "wall_s": wall_s, "model_params": model_params,
    }


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "n/a"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def rf_gap(rows: list[dict[str, Any]], row: dict[str, Any]) -> float | None:
    """row's accuracy minus the random forest's of the same mode, labels and draw, in points."""
    mode = str(row["name"]).split(":")[0]
    for other in rows:
        if (other["name"] == f"{mode}: random forest" and other.get("labels") == row.get("labels")
                and other.get("draw", 0) == row.get("draw", 0)):
            if row.get("accuracy") is None or other.get("accuracy") is None:
                return None
            return 100 * (row["accuracy"] - other["accuracy"])
    return None


def compare_table(rows: list[dict[str, Any]], include_paper: bool = True,
                  title: str = "Comparison") -> Table:
    """A Table-1-style comparison of runs, with the paper's FLAG figures (ISCX VPN-nonVPN, 12
    classes) underneath.

    Row keys (all but `name` optional, None shown as n/a): name, labels (labelled fraction),
    draw (which draw of those labels), accuracy, macro_f1, tpr, fpr, ftf, wall_s (seconds),
    model_params (parameter count).
    "acc - RF" is a row's accuracy minus the random forest's ("<mode>: random forest") with
    the same labels and draw, in points.
    """
    table = Table(title=title)
    table.add_column("model")
    for col in ("labels", "accuracy", "acc - RF", "macro-F1", "TPR", "FPR", "FTF", "wall time",
                "params"):
        table.add_column(col, justify="right")

    def add(row: dict[str, Any]) -> None:
        labels = row.get("labels")
        wall = row.get("wall_s")
        gap = rf_gap(rows, row)
        table.add_row(
            str(row["name"]),
            ("n/a" if labels is None else f"{labels:.0%}")
            + (f", draw {row['draw']}" if row.get("draw") else ""),
            _fmt(row.get("accuracy")), "n/a" if gap is None else f"{gap:+.1f}",
            _fmt(row.get("macro_f1")), _fmt(row.get("tpr")),
            _fmt(row.get("fpr")), _fmt(row.get("ftf")),
            "n/a" if wall is None else f"{wall:.1f} s",
            _fmt_params(row.get("model_params")),
        )

    for row in rows:
        add(row)
    if include_paper:
        table.add_section()  # the paper's rows are on ISCX VPN-nonVPN, whatever the data above
        for row in PAPER_FLAG_RESULTS:
            add(row)
    return table
