"""Open-set rejection: the scores on numbers worked out by hand, the temperature fit, the
out-of-fold threshold, the bundle file, and `flagd calibrate` / `flagd evaluate` end to end on a
tiny bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from typer.testing import CliRunner

from flagd import openset as O
from flagd.cli import app
from flagd.dataset import Dataset
from flagd.evaluate import REPORT_SCHEMA
from flagd.flows import FlowSettings
from flagd.infer import Bundle, BundleError


def test_msp_and_energy_by_hand():
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    e = np.exp(2.0)
    assert O.msp_score(logits) == pytest.approx([e / (e + 1), 0.5])
    assert O.energy_score(logits) == pytest.approx([np.log(e + 1), np.log(2)])
    # temperature 2: softmax(logits / 2), energy T * logsumexp(logits / T)
    assert O.msp_score(logits, 2.0)[0] == pytest.approx(np.exp(1) / (np.exp(1) + 1))
    assert O.energy_score(logits, 2.0)[0] == pytest.approx(2 * np.log(np.exp(1) + 1))


def test_mahalanobis_matches_the_explicit_formula():
    rng = np.random.default_rng(0)
    feats, y = rng.normal(size=(200, 4)), rng.integers(0, 3, 200)
    means, prec = O.fit_mahalanobis(feats, y, 3)
    x = rng.normal(size=(5, 4))
    explicit = [-min((xi - m) @ prec @ (xi - m) for m in means) for xi in x]
    assert O.mahalanobis_score(x, means, prec) == pytest.approx(explicit)


def test_mahalanobis_ignores_a_class_without_flows():
    feats = np.array([[0.0, 0.0], [0.2, 0.0], [4.0, 4.0], [4.2, 4.0]])
    means, prec = O.fit_mahalanobis(feats, np.array([0, 0, 2, 2]), 3)
    assert np.isnan(means[1]).all()
    assert np.isfinite(O.mahalanobis_score(feats, means, prec)).all()


def test_knn_is_the_kth_cosine_similarity():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = np.array([[2.0, 0.0]])  # cosines to the references: 1, 0, 1/sqrt(2)
    assert O.knn_score(x, ref, k=1) == pytest.approx([1.0])
    assert O.knn_score(x, ref, k=2) == pytest.approx([2 ** -0.5])
    assert O.knn_score(x, ref, k=3) == pytest.approx([0.0])


def test_temperature_fit_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.0, size=(4000, 5))
    y = np.array([rng.choice(5, p=p) for p in O.softmax(z)])  # calibrated at T = 1 for z
    assert O.fit_temperature(3 * z, y) == pytest.approx(3.0, rel=0.1)
    assert O.nll(3 * z, y, O.fit_temperature(3 * z, y)) <= O.nll(3 * z, y, 1.0)


def test_folds_keep_captures_whole_only_when_every_class_has_enough():
    y = np.repeat([0, 1], 50)
    groups = np.arange(100) // 5  # 10 captures per class
    fold = O.folds(y, groups)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1  # a capture in one fold only
    one_capture_per_class = y.copy()  # ISCX: one capture per class -> random rows
    fold = O.folds(y, one_capture_per_class)
    assert len(set(fold[y == 0])) == O.FOLDS


def blobs(rng, n, centres, spread=0.3):
    y = rng.integers(0, len(centres), n)
    return centres[y] + rng.normal(scale=spread, size=(n, centres.shape[1])), y


def test_threshold_rejects_the_chosen_share_of_fresh_in_distribution_flows():
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=3, size=(4, 8))
    fv, yv = blobs(rng, 2000, centres)
    ft, _ = blobs(rng, 4000, centres)
    logits = np.eye(4)[yv] * 5  # confident either way: logits cannot tell foreign flows apart
    foreign = rng.normal(scale=3, size=(500, 8)) + 10
    o = O.fit(logits, fv, yv, 4, reject_rate=0.05, method="mahalanobis")
    rejected = np.mean(o.score(np.zeros((4000, 4)), ft) < o.threshold)
    assert 0.03 < rejected < 0.07
    assert np.mean(o.score(np.zeros((500, 4)), foreign) < o.threshold) == 1.0


def test_a_confidence_bound_keeps_the_fresh_rejection_rate_under_the_rate():
    # Uniform scores: the share of fresh flows below a threshold is the threshold itself.
    rng = np.random.default_rng(7)
    draws = rng.random((2000, 300))
    bound = np.array([O.threshold_for(d, 0.05, confidence=0.9) for d in draws])
    estimate = np.array([O.threshold_for(d, 0.05) for d in draws])
    assert np.mean(bound > 0.05) < 0.12  # exceeded in at most 10% of draws (+ sampling slack)
    assert 0.35 < np.mean(estimate > 0.05) < 0.65  # the plain 5% quantile: about half of them
    assert 0.03 < np.mean(bound) < 0.05  # and the bound is not trivially strict
    assert O.threshold_for(draws[0][:10], 0.05, confidence=0.9) == -np.inf  # 10 flows: k = 0


def test_method_is_chosen_on_exposure_flows():
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=3, size=(3, 6))
    fv, yv = blobs(rng, 600, centres)
    logits = np.eye(3)[yv] * 4
    far = rng.normal(size=(300, 6)) + 12
    exposure = (np.eye(3)[rng.integers(0, 3, 300)] * 4, far)  # as confident as the real ones
    o = O.fit(logits, fv, yv, 3, exposure=exposure)
    assert o.method in ("mahalanobis", "knn")
    assert o.info["exposure_auroc"][o.method] > 0.99
    assert o.info["exposure_auroc"]["msp"] < 0.7
    assert O.fit(logits, fv, yv, 3).method == O.DEFAULT_METHOD  # no exposure: the default


@pytest.mark.parametrize("method", O.METHODS)
def test_saved_file_round_trips(tmp_path, method):
    rng = np.random.default_rng(4)
    feats, y = rng.normal(size=(100, 8)), rng.integers(0, 3, 100)
    logits = rng.normal(size=(100, 3))
    o = O.fit(logits, feats, y, 3, method=method)
    back = O.OpenSet.load(o.save(tmp_path / "o.npz"))
    assert (back.method, back.temperature, back.threshold) == (o.method, o.temperature, o.threshold)
    x, lx = rng.normal(size=(10, 8)), rng.normal(size=(10, 3))
    # float32/float16 storage: scores agree to a few parts in 1e3
    assert back.score(lx, x) == pytest.approx(o.score(lx, x), rel=2e-3, abs=2e-3)


def test_load_refuses_what_is_not_an_openset_file(tmp_path):
    np.savez(tmp_path / "x.npz", header=np.array(json.dumps({"format": "other"})))
    with pytest.raises(ValueError, match="not a flagd-openset"):
        O.OpenSet.load(tmp_path / "x.npz")
    (tmp_path / "y.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not an open-set file"):
        O.OpenSet.load(tmp_path / "y.npz")


# --- on a tiny bundle ---------------------------------------------------------------------


def flows_dataset(rng: np.random.Generator, n: int, classes: list[str], kind: str,
                  settings: FlowSettings, captures: int = 20) -> Dataset:
    """n flows of 1-3 packets; `kind` picks their bytes: 'tls' (records of class-dependent
    lengths) or 'noise' (uniform random bytes, long)."""
    flows, sides, labels = [], [], rng.integers(0, len(classes), n)
    for i in range(n):
        pkts = []
        for _ in range(int(rng.integers(1, 4))):
            if kind == "tls":
                pkts.append(bytes([0x45, 0, 0, 60]) + b"\x16\x03\x01" * (5 + 10 * int(labels[i])))
            else:
                pkts.append(rng.integers(0, 256, 120, dtype=np.uint8).tobytes())
        flows.append(pkts)
        sides.append([(0, len(p), 0.01) for p in pkts])
    return Dataset(flows, sides, labels, classes, rng.integers(0, captures, n).astype(np.int32),
                   [f"cap{i}.pcap" for i in range(captures)], np.arange(n, dtype=np.float64),
                   settings.to_dict(), {})


@pytest.fixture
def bundle_dir(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture
def data(bundle_dir, tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(5)
    b = Bundle.load(bundle_dir, device="cpu")
    out = {}
    for name, n, kind in (("val", 120, "tls"), ("test", 90, "tls"), ("foreign", 60, "noise")):
        out[name] = flows_dataset(rng, n, b.labels, kind, b.settings).save(tmp_path / f"{name}.npz")
    return out


def test_fit_rejection_writes_a_hashed_file_the_bundle_loads(bundle_dir, data):
    o = O.fit_rejection(bundle_dir, Dataset.load(data["val"]), method="knn")
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    assert O.FILE in manifest["files"]
    b = Bundle.load(bundle_dir, device="cpu")
    assert b.openset.method == "knn" and b.openset.threshold == pytest.approx(o.threshold)
    (bundle_dir / O.FILE).write_bytes((bundle_dir / O.FILE).read_bytes()[:-5])
    with pytest.raises(BundleError, match="openset.npz: SHA-256"):
        Bundle.load(bundle_dir, device="cpu")


def test_predictions_below_the_threshold_are_unknown_with_their_score(bundle_dir, data):
    O.fit_rejection(bundle_dir, Dataset.load(data["val"]))
    b = Bundle.load(bundle_dir, device="cpu")
    ds = Dataset.load(data["test"])
    enc = b.encode_packets(ds.flows, ds.sides)
    preds = b.predict(enc, [len(f) for f in ds.flows])
    logits, feats = b.outputs(enc)
    scores = b.openset.score(logits, feats)
    for p, s in zip(preds, scores, strict=True):
        assert p.score == pytest.approx(s)
        assert (p.label == O.UNKNOWN) == (s < b.openset.threshold)
        assert p.top_k[0][0] in b.labels  # the classes are still listed
        assert p.to_dict()["score"] == round(s, 4)
    b.reject = False  # reject = false in flagd.toml: scores still reported, labels always given
    assert all(p.label != O.UNKNOWN for p in b.predict(enc, [1] * len(ds)))
    b.min_confidence = 1.0  # nothing is that sure
    assert all(p.label == O.UNKNOWN for p in b.predict(enc, [1] * len(ds)))


def test_calibrate_then_evaluate_with_foreign_flows(bundle_dir, data, tmp_path):
    r = CliRunner().invoke(app, ["calibrate", str(bundle_dir), str(data["val"]),
                                 "--exposure", str(data["foreign"]), "--reject-rate", "0.1"])
    assert r.exit_code == 0, r.output
    assert "rejection, threshold" in r.output and "AUROC against the exposure flows" in r.output
    plain = O.OpenSet.load(bundle_dir / O.FILE)
    r = CliRunner().invoke(app, ["calibrate", str(bundle_dir), str(data["val"]), "--reject-rate",
                                 "0.1", "--confidence", "0.9", "--method", plain.method])
    assert r.exit_code == 0, r.output
    assert "at most 10% of in-distribution flows below it with probability 0.9" in r.output
    bounded = O.OpenSet.load(bundle_dir / O.FILE)
    # these flows come in a few identical shapes, so the two thresholds may land on a tie
    assert bounded.info["confidence"] == 0.9 and bounded.threshold <= plain.threshold
    assert bounded.info["validation_rejected"] <= plain.info["validation_rejected"]
    r = CliRunner().invoke(app, ["calibrate", str(bundle_dir), str(data["val"]),
                                 "--exposure", str(data["foreign"]), "--reject-rate", "0.1"])
    assert r.exit_code == 0, r.output
    report_path = tmp_path / "report.json"
    r = CliRunner().invoke(app, ["evaluate", str(bundle_dir), str(data["test"]),
                                 "--foreign", str(data["foreign"]), "--json", str(report_path)])
    assert r.exit_code == 0, r.output
    report = json.loads(report_path.read_text())
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(report)
    o = report["openset"]
    assert o["coverage"] + o["rejection_rate"] == pytest.approx(1.0)
    assert set(o["foreign"]) == {"foreign"} and o["foreign"]["foreign"]["n_flows"] == 60
    f = o["foreign"]["foreign"]
    assert 0 <= f["auroc"] <= 1 and f["n_captures"] >= 1
    assert sum(n for _, _, n in f["most_accepted"]) <= 60
    assert f"{f['capture_rejection_rate']:.2%}" in r.output  # the per-capture column


def test_evaluate_refuses_a_dataset_built_for_another_k_or_b(bundle_dir, tmp_path):
    rng = np.random.default_rng(6)
    b = Bundle.load(bundle_dir, device="cpu")
    for settings, what in ((FlowSettings(ready_packets=5), "K=5"),
                           (FlowSettings(ready_packets=b.settings.ready_packets,
                                         preprocessing=type(b.settings.preprocessing)(packet_bytes=64)),
                            "B=64")):
        path = flows_dataset(rng, 10, b.labels, "tls", settings).save(tmp_path / "other.npz")
        for cmd in (["evaluate", str(bundle_dir), str(path)],
                    ["calibrate", str(bundle_dir), str(path)]):
            r = CliRunner().invoke(app, cmd)
            assert r.exit_code == 1
            assert what in r.output and "rebuild it" in r.output
            assert len(r.output.strip().splitlines()) == 1, r.output


def test_the_quick_start_sample_is_mostly_unknown_to_the_shipped_model_unless_rejection_is_off(tmp_path):
    """The README's sample (a Python TLS echo and a UDP echo) is none of the 12 ISCX classes:
    the shipped model says `unknown` for at least 8 of its 9 flows (the README names the one it
    labels); --no-reject gives its closed-set guesses."""
    sample = Path(__file__).parent / "data" / "lab-tls.pcap"
    labels = {}
    for flag in ("--reject", "--no-reject"):
        log = tmp_path / f"{flag}.jsonl"
        r = CliRunner().invoke(app, ["replay", str(sample), "--log", str(log), "--no-dashboard", flag])
        assert r.exit_code == 0, r.output
        events = [json.loads(line) for line in log.read_text().splitlines()]
        labels[flag] = [e["flag"]["label"] for e in events if e["event_type"] == "classification"]
    assert len(labels["--reject"]) == len(labels["--no-reject"]) == 9
    assert labels["--reject"].count(O.UNKNOWN) >= 8
    assert O.UNKNOWN not in labels["--no-reject"]
