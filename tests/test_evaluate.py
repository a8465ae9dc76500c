"""Metrics against confusion matrices worked out by hand, the report schema, and the renderers."""

from __future__ import annotations

import json
import struct
from io import StringIO

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from flagd.evaluate import (
    PAPER_FLAG_RESULTS,
    REPORT_SCHEMA,
    compare_row,
    compare_table,
    confusion_matrix,
    metrics,
    render_openset,
    render_table,
    save_heatmap,
    write_json,
)

VALIDATOR = jsonschema.Draft202012Validator(REPORT_SCHEMA)


def labels_from_confusion(cm: list[list[int]]) -> tuple[list[int], list[int]]:
    """y_true, y_pred that produce exactly the confusion matrix cm."""
    y_true, y_pred = [], []
    for t, row in enumerate(cm):
        for p, count in enumerate(row):
            y_true += [t] * count
            y_pred += [p] * count
    return y_true, y_pred


def render(renderable) -> str:
    console = Console(file=StringIO(), width=140, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def check_consistent(report: dict) -> None:
    """What the JSON Schema cannot say about a report."""
    VALIDATOR.validate(report)
    names = report["class_names"]
    cm = np.array(report["confusion"])
    assert cm.shape == (len(names), len(names))
    assert list(report["classes"]) == names
    assert cm.sum() == report["n_flows"]
    assert [report["classes"][n]["support"] for n in names] == cm.sum(axis=1).tolist()


# Worked example, 3 classes, N = 10 flows (rows = true class, columns = predicted):
#
#            a  b  c    support N_c   TP  FN  FP  TN
#     a    [ 3, 1, 0 ]        4        3   1   1   5
#     b    [ 1, 2, 1 ]        4        2   2   1   5
#     c    [ 0, 0, 2 ]        2        2   0   1   7
#
# TPR_c = TP/(TP+FN):  a 3/4,  b 2/4,  c 2/2
# FPR_c = FP/(FP+TN):  a 1/6,  b 1/6,  c 1/8
# precision = TP/(TP+FP): a 3/4, b 2/3, c 2/3
# F1_c = 2TP/(2TP+FP+FN): a 6/8, b 4/7, c 4/5  -> macro-F1 = (3/4 + 4/7 + 4/5) / 3
# TPR_AVE = (4*3/4 + 4*2/4 + 2*1) / 10 = 7/10 (= accuracy)
# FPR_AVE = (4*1/6 + 4*1/6 + 2*1/8) / 10 = (2/3 + 2/3 + 1/4) / 10 = 19/120
# FTF = 0.4 * (3/4)/(1+1/6) + 0.4 * (1/2)/(1+1/6) + 0.2 * 1/(1+1/8)
#     = 0.3 * 6/7 + 0.2 * 6/7 + 0.2 * 8/9 = 3/7 + 8/45 = 191/315 ~= 0.60635
WORKED = [[3, 1, 0], [1, 2, 1], [0, 0, 2]]


def test_confusion_matrix_counts_pairs():
    y_true, y_pred = labels_from_confusion(WORKED)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y_true))  # order of flows must not matter
    cm = confusion_matrix(np.array(y_true)[order], np.array(y_pred)[order], 3)
    assert cm.tolist() == WORKED
    assert cm.dtype == np.int64


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 1], [-1, 1], 3)
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix([0, 1], [0], 3)


def test_worked_example_matches_hand_computation():
    r = metrics(*labels_from_confusion(WORKED), ["a", "b", "c"])
    assert r["n_flows"] == 10
    assert r["n_dropped"] == 0
    assert r["accuracy"] == pytest.approx(0.7)
    assert r["tpr"] == pytest.approx(0.7)
    assert r["fpr"] == pytest.approx(19 / 120)
    assert r["ftf"] == pytest.approx(191 / 315)
    assert r["macro_f1"] == pytest.approx((3 / 4 + 4 / 7 + 4 / 5) / 3)
    expect = {
        "a": (3 / 4, 1 / 6, 3 / 4, 6 / 8, 4),
        "b": (2 / 4, 1 / 6, 2 / 3, 4 / 7, 4),
        "c": (2 / 2, 1 / 8, 2 / 3, 4 / 5, 2),
    }
    for name, (tpr, fpr, precision, f1, support) in expect.items():
        c = r["classes"][name]
        assert c["tpr"] == pytest.approx(tpr)
        assert c["fpr"] == pytest.approx(fpr)
        assert c["precision"] == pytest.approx(precision)
        assert c["f1"] == pytest.approx(f1)
        assert c["support"] == support
    assert r["confusion"] == WORKED
    assert r["class_names"] == ["a", "b", "c"]
    check_consistent(r)


def test_report_has_exactly_the_report_keys():
    r = metrics([0, 1], [0, 1], ["a", "b"], n_dropped=5)
    assert set(r) == {"n_flows", "n_dropped", "accuracy", "macro_f1", "tpr", "fpr", "ftf",
                      "classes", "confusion", "class_names"}
    assert r["n_dropped"] == 5
    assert r["n_flows"] == 2  # dropped flows are recorded, not scored


def test_perfect_prediction():
    y = [0, 0, 1, 2, 2, 2]
    r = metrics(y, y, ["a", "b", "c"])
    assert r["accuracy"] == r["tpr"] == r["ftf"] == r["macro_f1"] == 1.0
    assert r["fpr"] == 0.0
    for c in r["classes"].values():
        assert (c["tpr"], c["fpr"], c["precision"], c["f1"]) == (1.0, 0.0, 1.0, 1.0)
    check_consistent(r)


def test_class_never_predicted():
    # cm = [[2, 0], [2, 0]]: b has flows but is never predicted.
    # a: TPR 1, FPR 2/2 = 1, precision 2/4, F1 4/6.   b: TPR 0, FPR 0/2, precision 0/0, F1 0/2.
    # FTF = 0.5 * 1/(1+1) + 0.5 * 0/(1+0) = 0.25;  FPR_AVE = 0.5 * 1 + 0.5 * 0 = 0.5
    r = metrics([0, 0, 1, 1], [0, 0, 0, 0], ["a", "b"])
    b = r["classes"]["b"]
    assert b["precision"] is None  # 0/0: undefined, not 0
    assert b["tpr"] == 0.0 and b["fpr"] == 0.0 and b["f1"] == 0.0
    assert r["classes"]["a"]["fpr"] == 1.0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)  # b counts: it has flows
    assert r["ftf"] == pytest.approx(0.25)
    assert r["fpr"] == pytest.approx(0.5)
    check_consistent(r)


def test_class_absent_from_truth_and_predictions_is_left_out_of_macro_f1():
    # c never occurs: nothing measured for it, so macro-F1 is over a and b only.
    r = metrics([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b", "c"])
    c = r["classes"]["c"]
    assert (c["tpr"], c["precision"], c["f1"], c["support"]) == (None, None, None, 0)
    assert c["fpr"] == 0.0  # 0 false positives among 4 negatives
    f1_a, f1_b = 2 / 3, 4 / 5  # a: 2*1/(2+0+1), b: 2*2/(4+1+0)
    assert r["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    check_consistent(r)


def test_class_only_predicted_counts_in_macro_f1():
    # c has no flows but is predicted once: F1_c = 0/(0+1+0) = 0, and it pulls macro-F1 down.
    r = metrics([0, 0, 1, 1], [0, 0, 1, 2], ["a", "b", "c"])
    c = r["classes"]["c"]
    assert c["tpr"] is None and c["f1"] == 0.0 and c["precision"] == 0.0
    assert c["fpr"] == pytest.approx(1 / 4)
    assert r["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    # Flow-weighted averages give c weight 0 (N_c = 0): its false alarm shows only in FPR_b/FPR_a.
    assert r["fpr"] == pytest.approx(0.0)
    check_consistent(r)


def test_single_class_holding_every_flow():
    r = metrics([0, 0, 0], [0, 0, 0], ["a", "b"])
    assert r["classes"]["a"]["fpr"] is None  # no negatives at all
    assert r["fpr"] == 0.0 and r["ftf"] == 1.0 and r["macro_f1"] == 1.0
    check_consistent(r)


def test_metrics_rejects_empty_and_duplicate_names():
    with pytest.raises(ValueError, match="no flows"):
        metrics([], [], ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        metrics([0], [0], ["a", "a"])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6).flatmap(
    lambda k: st.tuples(
        st.just(k),
        st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=60),
    )))
def test_metric_invariants(case):
    k, pairs = case
    y_true, y_pred = zip(*pairs, strict=True)
    r = metrics(y_true, y_pred, [f"c{i}" for i in range(k)])
    check_consistent(r)
    # Flow-weighted recall is the overall accuracy.
    assert r["tpr"] == pytest.approx(r["accuracy"])
    assert r["accuracy"] == pytest.approx(np.mean(np.array(y_true) == np.array(y_pred)))
    # Dividing by 1 + FPR_c >= 1 can only lower the score, by at most the factor 1/2.
    assert r["tpr"] / 2 - 1e-12 <= r["ftf"] <= r["tpr"] + 1e-12
    # Reference macro-F1 straight from the definition, one class at a time.
    f1s = []
    for c in range(k):
        tp = sum(t == c and p == c for t, p in pairs)
        fp = sum(t != c and p == c for t, p in pairs)
        fn = sum(t == c and p != c for t, p in pairs)
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    assert r["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    # The report survives JSON as it is (no NaN, no numpy scalars).
    assert json.loads(json.dumps(r, allow_nan=False)) == r


def test_schema_is_valid_and_rejects_bad_reports():
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    good = metrics(*labels_from_confusion(WORKED), ["a", "b", "c"])
    VALIDATOR.validate(good)
    for bad in (
        {**good, "extra": 1},
        {**good, "tpr": 1.5},
        {**good, "n_flows": 0},
        {k: v for k, v in good.items() if k != "ftf"},
        {**good, "classes": {"a": {**good["classes"]["a"], "support": -1}}},
        {**good, "confusion": [[1.5]]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(bad)


def test_write_json_round_trips_and_validates(tmp_path):
    report = metrics([0, 0, 1, 1], [0, 0, 0, 0], ["a", "b"], n_dropped=3)
    path = write_json(report, tmp_path / "out" / "report.json")
    loaded = json.loads(path.read_text())
    assert loaded == report
    assert loaded["classes"]["b"]["precision"] is None  # written as null
    VALIDATOR.validate(loaded)


def test_render_table_shows_classes_and_totals():
    report = metrics([0, 0, 1, 1], [0, 0, 0, 0], ["chat", "voip"], n_dropped=7)
    out = render(render_table(report))
    for text in ("chat", "voip", "TPR", "FPR", "precision", "F1", "support",
                 "flow-weighted", "macro", "0.3333", "0.5000", "n/a", "7 dropped"):
        assert text in out, text


def test_heatmap_writes_png(tmp_path):
    from flagd.labels import CLASSES_12

    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 12, 500)
    y_pred = np.where(rng.random(500) < 0.8, y_true, rng.integers(0, 12, 500))
    y_true[:3] = 11  # a class with flows never predicted right is fine too
    report = metrics(y_true, y_pred, CLASSES_12)
    path = save_heatmap(report, tmp_path / "plots" / "confusion.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the signature
    assert width > 300 and height > 300


def test_heatmap_handles_a_class_without_flows(tmp_path):
    report = metrics([0, 0, 1], [0, 1, 1], ["a", "b", "empty"])
    data = save_heatmap(report, tmp_path / "h.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")


def test_compare_table_includes_paper_figures():
    report = metrics(*labels_from_confusion(WORKED), ["a", "b", "c"])
    rows = [compare_row("flagd small", report, labels=1.0, wall_s=12.34, model_params=1_234_567),
            compare_row("flagd small", report, labels=0.1)]
    out = render(compare_table(rows))
    for text in ("flagd small", "100%", "10%", "0.7000", "0.6063", "12.3 s", "1.2M",
                 "FLAG (paper)", "0.9865", "0.9807"):
        assert text in out, text
    assert "FLAG (paper)" not in render(compare_table(rows, include_paper=False))
    assert [r["tpr"] for r in PAPER_FLAG_RESULTS] == [0.9865, 0.9807]


# --- open-set figures ---------------------------------------------------------------------


def test_auroc_by_hand_with_ties():
    from flagd.evaluate import auroc

    # pairs (in, out): 3 vs 1 win, 3 vs 2 win, 1 vs 1 tie (1/2), 1 vs 2 loss -> 2.5 / 4
    assert auroc([3, 1], [1, 2]) == 0.625
    assert auroc([5, 6], [1, 2]) == 1.0 and auroc([1, 2], [5, 6]) == 0.0
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_ece_by_hand():
    from flagd.evaluate import ece

    # bin 13 (0.9): two flows, one right: |1 - 1.8| = 0.8; bin 3 (0.2): |0 - 0.2| = 0.2; N = 3
    assert ece([0.9, 0.9, 0.2], [True, False, False]) == pytest.approx(1.0 / 3)
    assert ece([1.0, 1.0], [True, True]) == 0.0  # confidence 1 lands in the last bin
    assert ece([0.5] * 4, [True, False, True, False]) == 0.0


def test_openset_report_validates_and_counts():
    from flagd.evaluate import openset_report

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    scores = np.array([5.0, 1.0, 4.0, 3.0])
    accepted = scores >= 2
    o = openset_report([0, 1, 1, 1], probs, probs, scores, accepted,
                       {"lab": (np.array([0.0, 2.5, 0.5]), np.array([False, True, False]),
                                ["runs/a.pcap", "runs/b.pcap", "runs/a.pcap"])},
                       method="mahalanobis", temperature=1.5, threshold=2.0)
    assert o["coverage"] == 0.75 and o["rejection_rate"] == 0.25
    assert o["accepted_accuracy"] == pytest.approx(2 / 3)  # accepted 0, 2 right; 3 wrong
    # foreign 0.0 and 0.5 below all 4; 2.5 below 3 of 4: AUROC (4 + 3 + 4) / 12
    # per capture: a.pcap 2 of 2 unknown, b.pcap 0 of 1: mean 0.5 (per flow 2 of 3)
    assert o["foreign"]["lab"] == {
        "n_flows": 3, "auroc": pytest.approx(11 / 12), "rejection_rate": pytest.approx(2 / 3),
        "n_captures": 2, "capture_rejection_rate": 0.5, "most_accepted": [["b.pcap", 1, 1]]}
    report = metrics([0, 1, 1, 1], probs.argmax(1), ["a", "b"])
    report["openset"] = o
    VALIDATOR.validate(report)
    assert "Open-set" in render(render_openset(report))
