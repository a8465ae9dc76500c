"""`flagd train`, `dataset build`, `vocab build` and `evaluate` end to end on a tiny crafted tree."""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from typer.testing import CliRunner

from flagd.cli import app
from flagd.evaluate import REPORT_SCHEMA
from flagd.frames import LINKTYPE_ETHERNET
from tests import crafted

runner = CliRunner()


def flows_of(kind: str, n: int, seed: int) -> list[crafted.Record]:
    """n flows of one made-up application, each with 6 packets of its own byte patterns."""
    rng = random.Random(seed)
    recs, t = [], 1_700_000_000.0 + seed
    for i in range(n):
        c, s = f"198.51.100.{1 + i % 250}", "203.0.113.5"
        for k in range(6):
            t += 0.01
            if kind == "tls":
                l4 = TCP(sport=30000 + i, dport=443, flags="PA") / (b"\x17\x03\x03" + rng.randbytes(60))
            elif kind == "rtp":
                l4 = UDP(sport=40000 + i, dport=3478) / (b"\x80\x78" + rng.randbytes(2) + b"\x00" * 20)
            else:
                l4 = TCP(sport=50000 + i, dport=22, flags="PA") / (b"SSH-2.0-OpenSSH_9" + rng.randbytes(20))
            ip = IP(src=c, dst=s) if k % 2 == 0 else IP(src=s, dst=c)
            if k % 2:
                l4.sport, l4.dport = l4.dport, l4.sport
            recs.append(crafted.Record(t, crafted.ether(ip / l4)))
    return recs


def make_tree(root):
    for cls, kind in (("chat", "ssh"), ("streaming", "tls"), ("voip", "rtp")):
        (root / cls).mkdir(parents=True)
        for part in range(2):
            crafted.write_pcap(root / cls / f"{part}.pcap", flows_of(kind, 30, seed=part * 7 + len(cls)),
                               LINKTYPE_ETHERNET)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One `flagd train` run on the tiny tree (both modes), shared by the tests below."""
    root = tmp_path_factory.mktemp("train")
    tree = make_tree(root / "tree")
    out = root / "run"
    r = runner.invoke(app, ["train", str(tree), "-o", str(out), "--preset", "tiny", "--max-len", "48",
                            "--vocab-size", "512", "--pretrain-epochs", "1", "--finetune-epochs", "3",
                            "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    return tree, out, r.output


def test_train_runs_the_protocol_and_writes_reports(trained):
    tree, out, output = trained
    report = json.loads((out / "report.json").read_text())
    names = {(row["name"], row["labels"]) for row in report["rows"]}
    for mode in ("paper", "honest"):
        for variant in ("flag", "flag-flat", "flag-shallow", "no-pretrain", "bytes-only", "rf"):
            for frac in (1.0, 0.1):
                assert (f"{mode}: {'random forest' if variant == 'rf' else variant}", frac) in names
                run_report = json.loads((out / mode / f"{variant}-{int(frac * 100)}" / "report.json").read_text())
                jsonschema.validate(run_report, REPORT_SCHEMA)
                assert run_report["n_flows"] > 0
    split = json.loads((out / "paper" / "split.json").read_text())
    sets = [set(v) for v in split.values()]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])  # disjoint
    assert (out / "paper" / "flag-100" / "model" / "bundle.json").exists()
    assert "Comparison" in output and "0.9865" in output  # the paper's figure alongside
    assert "acc - RF" in output
    # the flat variant is the paper's input; the others see the packet context
    flat = json.loads((out / "paper" / "flag-flat-100" / "config.json").read_text())
    aware = json.loads((out / "paper" / "flag-100" / "config.json").read_text())
    assert not flat["model"]["packet_aware"] and aware["model"]["packet_aware"]
    # flag-shallow: one layer fewer, from the same pre-training, and a bundle of its own
    shallow = json.loads((out / "paper" / "flag-shallow-100" / "config.json").read_text())
    assert shallow["model"]["n_layer"] == aware["model"]["n_layer"] - 1
    assert shallow["train"]["pretrained"]
    assert (out / "paper" / "flag-shallow-100" / "model" / "bundle.json").exists()


def test_extra_flows_are_masked_like_a_prebuilt_dataset(tmp_path):
    """A product run on a dataset built beforehand with the honest masks (as lab12's is)
    builds its pre-training and exposure flows with those masks too, not product mode's."""
    from flagd.dataset import Dataset

    tree = make_tree(tmp_path / "tree")
    extra = tmp_path / "extra"
    extra.mkdir()
    crafted.write_pcap(extra / "other.pcap", flows_of("tls", 20, seed=99), LINKTYPE_ETHERNET)
    out = tmp_path / "run"
    r = runner.invoke(app, ["dataset", "build", str(tree), "--honest",
                            "-o", str(out / "product" / "dataset.npz")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", str(tree), "-o", str(out), "--mode", "product",
                            "--variant", "rf", "--fraction", "1", "--unlabelled", str(extra),
                            "--outliers", str(extra)])
    assert r.exit_code == 0, r.output
    labelled = Dataset.load(out / "product" / "dataset.npz").settings
    assert "ports" in labelled["preprocessing"]["extra_masks"]  # the honest masks
    for name in ("unlabelled.npz", "outliers.npz"):
        assert Dataset.load(out / "product" / name).settings == labelled, name


def test_product_split_by_capture_keeps_every_capture_on_one_side(tmp_path):
    """--split-by capture deals whole captures 80/10/10 per class (a lab session's flows stay
    together); the default deals flows, so captures straddle the splits."""
    from flagd.dataset import Dataset

    tree = tmp_path / "tree"
    for cls, kind in (("chat", "ssh"), ("streaming", "tls")):
        (tree / cls).mkdir(parents=True)
        for part in range(10):  # ten captures of three flows per class
            crafted.write_pcap(tree / cls / f"{part}.pcap", flows_of(kind, 3, seed=part),
                               LINKTYPE_ETHERNET)
    sides = {}
    for split_by in ("capture", "flow"):
        out = tmp_path / split_by
        r = runner.invoke(app, ["train", str(tree), "-o", str(out), "--mode", "product",
                                "--variant", "rf", "--fraction", "1", "--split-by", split_by])
        assert r.exit_code == 0, r.output
        split = json.loads((out / "product" / "split.json").read_text())
        source = Dataset.load(out / "product" / "dataset.npz").source
        by_capture = {}  # capture -> the splits its flows went to
        for name, rows in split.items():
            for row in rows:
                by_capture.setdefault(int(source[row]), set()).add(name)
        sides[split_by] = max(len(names) for names in by_capture.values())
    assert sides == {"capture": 1, "flow": 3}
    assert len(split["test"]) == 6  # (the flow split) 10% of 2 x 30 flows
    r = runner.invoke(app, ["train", str(tree), "-o", str(tmp_path / "x"), "--split-by", "app"])
    assert r.exit_code != 0 and "flow or capture" in r.output


def test_product_mode_pretrains_on_extra_captures_and_records_its_test_flows(tmp_path):
    tree = make_tree(tmp_path / "tree")
    extra = tmp_path / "extra"
    extra.mkdir()
    crafted.write_pcap(extra / "other.pcap", flows_of("tls", 20, seed=99), LINKTYPE_ETHERNET)
    out = tmp_path / "run"
    argv = ["train", str(tree), "-o", str(out), "--mode", "product",
            "--variant", "flag", "--variant", "rf", "--unlabelled", str(extra),
            "--preset", "tiny", "--max-len", "48", "--vocab-size", "512",
            "--pretrain-epochs", "1", "--finetune-epochs", "2", "--batch-size", "16",
            "--pretrain-batch-size", "8", "--equal-steps"]
    r = runner.invoke(app, argv)
    assert r.exit_code == 0, r.output
    assert "20 extra unlabelled flows for pre-training" in r.output
    curve = json.loads((out / "product" / "pretrain-phrases" / "history.json").read_text())
    assert [h["step"] for h in curve["history"]][-1] == curve["step"] > 0
    tuned = json.loads((out / "product" / "flag-100" / "finetune.json").read_text())
    assert len(tuned["history"]) == 2 and "confusion" not in tuned
    # --equal-steps: 10% of the labels get 10x the epochs (about as many steps as all labels)
    few = json.loads((out / "product" / "flag-10-equal-steps" / "config.json").read_text())["train"]
    assert few["epochs"] == 20
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["val_macro_f1"] == tuned["best_val_macro_f1"]
    split = json.loads((out / "product" / "split.json").read_text())
    assert not split["unlabelled"] and len(split["test"]) == 18  # 10% of 3 x 60
    pre = json.loads((out / "product" / "pretrain-phrases" / "config.json").read_text())
    assert pre["train"]["n_train"] == len(split["train"]) + 20  # labels unused, test never
    assert pre["train"]["batch_size"] == 8
    test_flows = json.loads((out / "product" / "flag-100" / "model" / "test-flows.json").read_text())
    assert len(test_flows) == 18 and all(c.endswith(".pcap") for c, _ in test_flows)
    # an interrupted run resumes: what finished is kept, not trained again
    best = out / "product" / "flag-100" / "best.pt"
    stamp = best.stat().st_mtime_ns
    (out / "product" / "rf-100" / "row.json").unlink()
    r = runner.invoke(app, argv)  # the same command again
    assert r.exit_code == 0, r.output
    assert "flag-100: finished in an earlier run, kept" in r.output
    assert "rf-100: accuracy" in r.output and best.stat().st_mtime_ns == stamp
    # another draw of the labelled rows: directories of its own, seeds + 2, rows compared with
    # the forest of the same draw
    pre_best = out / "product" / "pretrain-phrases" / "best.pt"
    stamp = pre_best.stat().st_mtime_ns
    r = runner.invoke(app, argv + ["--fraction", "0.1", "--draw", "2", "--synthetic-outliers"])
    assert r.exit_code == 0, r.output
    assert "10%, draw 2" in r.output and pre_best.stat().st_mtime_ns == stamp
    drawn = json.loads((out / "product" / "flag-10-equal-steps-draw2" / "config.json").read_text())
    assert drawn["train"]["seed"] == few["seed"] + 2 and drawn["train"]["epochs"] == 20
    # synthetic outliers: one per flow this model was fine-tuned on, its 10% of train only
    from flagd.dataset import Dataset

    synthetic = out / "product" / "flag-10-equal-steps-draw2" / "synthetic-outliers.npz"
    assert len(Dataset.load(synthetic)) == drawn["train"]["n_train"] == drawn["train"]["n_outliers"]
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert {(row["name"], row["draw"]) for row in rows} == {("product: flag, equal steps", 2),
                                                            ("product: random forest", 2)}
    # self-training: the 10% model labels the rest of train (a minimum probability of 0 takes
    # every flow) for a student beside it, as many steps; the teacher is not trained again
    r = runner.invoke(app, argv + ["--fraction", "0.1", "--self-train", "0",
                                   "--self-train-rounds", "2"])
    assert r.exit_code == 0, r.output
    assert "flag-10-equal-steps: finished in an earlier run, kept" in r.output
    n_train = len(split["train"])
    for d in ("flag-10-equal-steps-self-trained", "flag-10-equal-steps-self-trained2"):
        student = json.loads((out / "product" / d / "config.json").read_text())["train"]
        assert student["n_train"] == n_train and student["pretrained"]
        assert few["steps"] <= student["steps"] < few["steps"] + n_train / 16
    n_pseudo = n_train - few["n_train"]
    names = [row["name"] for row in json.loads((out / "report.json").read_text())["rows"]]
    assert f"product: flag, equal steps, self-trained ({n_pseudo} pseudo-labels), round 2" in names
    assert not (out / "product" / "rf-10-self-trained").exists()  # the forest has no student
    r = runner.invoke(app, ["train", str(tree), "-o", str(out), "--variant", "nope"])
    assert r.exit_code == 2 and "unknown variant or mode: nope" in r.output


def test_dataset_vocab_evaluate_commands(tmp_path):
    tree = make_tree(tmp_path / "tree")
    ds = tmp_path / "ds.npz"
    r = runner.invoke(app, ["dataset", "build", str(tree), "-o", str(ds)])
    assert r.exit_code == 0, r.output
    assert "180 flows in 3 classes" in r.output
    from flagd.dataset import Dataset

    d = Dataset.load(ds)
    assert d.classes == ["chat", "streaming", "voip"] and len(d) == 180
    assert all(len(f) == 5 for f in d.flows)  # K relevant packets each
    assert np.bincount(d.labels).tolist() == [60, 60, 60]
    r = runner.invoke(app, ["vocab", "build", str(ds), "-o", str(tmp_path / "v.json"), "--size", "600"])
    assert r.exit_code == 0, r.output
    assert "bytes covered" in r.output
    r = runner.invoke(app, ["dataset", "build", str(tmp_path / "missing"), "-o", str(ds)])
    assert r.exit_code == 1 and "missing" in r.output


def test_evaluate_writes_report_and_heatmap(trained, tmp_path):
    tree, out, _ = trained
    model = out / "paper" / "flag-100" / "model"
    rep = tmp_path / "eval.json"
    r = runner.invoke(app, ["evaluate", str(model), str(tree), "--json", str(rep)])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["n_flows"] == 180
    assert sum(map(sum, report["confusion"])) == 180
    assert rep.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataset_split_gives_the_runs_own_test_flows(trained, tmp_path):
    from flagd.dataset import Dataset

    _, out, _ = trained
    r = runner.invoke(app, ["dataset", "split", str(out / "paper"), "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    split = json.loads((out / "paper" / "split.json").read_text())
    for part, rows in split.items():
        assert len(Dataset.load(tmp_path / "s" / f"{part}.npz")) == len(rows)
    # evaluating the cut test set scores exactly what the run scored on its test flows
    rep = tmp_path / "test.json"
    r = runner.invoke(app, ["evaluate", str(out / "paper" / "flag-100" / "model"),
                            str(tmp_path / "s" / "test.npz"), "--json", str(rep)])
    assert r.exit_code == 0, r.output
    run_report = json.loads((out / "paper" / "flag-100" / "report.json").read_text())
    assert json.loads(rep.read_text())["accuracy"] == pytest.approx(run_report["accuracy"])
    (tmp_path / "nosplit").mkdir()
    Dataset.load(out / "paper" / "dataset.npz").save(tmp_path / "nosplit" / "dataset.npz")
    r = runner.invoke(app, ["dataset", "split", str(tmp_path / "nosplit"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "split.json: No such file" in r.output


def test_a_split_saved_from_a_dataset_does_not_count_the_builds_dropped_flows(trained, tmp_path):
    from flagd.dataset import Dataset

    tree, out, _ = trained
    # one flow without a relevant packet (a handshake, no payload) next to the 60 chat flows
    crafted.write_pcap(tree / "chat" / "handshake.pcap", [crafted.Record(
        1_700_000_100.0 + i, crafted.ether(IP(src="198.51.100.9", dst="203.0.113.5") /
                                           TCP(sport=41000, dport=22, flags=f)))
        for i, f in enumerate(("S", "A"))], LINKTYPE_ETHERNET)
    try:
        r = runner.invoke(app, ["dataset", "build", str(tree), "-o", str(tmp_path / "all.npz")])
    finally:
        (tree / "chat" / "handshake.pcap").unlink()  # the module's other tests share the tree
    assert r.exit_code == 0, r.output
    full = Dataset.load(tmp_path / "all.npz")
    assert sum(full.stats["dropped"].values()) == 1
    full.subset(np.arange(0, len(full), 2)).save(tmp_path / "half.npz")
    model = str(out / "paper" / "flag-100" / "model")
    for name, dropped in (("all.npz", 1), ("half.npz", 0)):
        rep = tmp_path / f"{name}.json"
        r = runner.invoke(app, ["evaluate", model, str(tmp_path / name), "--json", str(rep)])
        assert r.exit_code == 0, r.output
        assert json.loads(rep.read_text())["n_dropped"] == dropped


def test_pretrain_then_finetune_commands_make_a_bundle(tmp_path):
    tree = make_tree(tmp_path / "tree")
    ds = tmp_path / "all.npz"
    assert runner.invoke(app, ["dataset", "build", str(tree), "-o", str(ds)]).exit_code == 0
    from flagd.dataset import Dataset

    d = Dataset.load(ds)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d))
    d.subset(order[:120]).save(tmp_path / "train.npz")
    d.subset(order[120:]).save(tmp_path / "val.npz")
    vocab = tmp_path / "v.json"
    assert runner.invoke(app, ["vocab", "build", str(ds), "-o", str(vocab), "--size", "600"]).exit_code == 0
    r = runner.invoke(app, ["pretrain", str(ds), "--vocab", str(vocab), "--preset", "tiny",
                            "--max-len", "48", "--epochs", "1", "-o", str(tmp_path / "pre")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["finetune", str(tmp_path / "train.npz"), str(tmp_path / "val.npz"),
                            "--vocab", str(vocab), "--init", str(tmp_path / "pre" / "best.pt"),
                            "--epochs", "2", "-o", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "ft" / "model"), str(tmp_path / "val.npz")])
    assert r.exit_code == 0, r.output
    # --layers: only the first pre-trained layers; more than the checkpoint has is refused
    r = runner.invoke(app, ["finetune", str(tmp_path / "train.npz"), str(tmp_path / "val.npz"),
                            "--vocab", str(vocab), "--init", str(tmp_path / "pre" / "best.pt"),
                            "--epochs", "1", "--layers", "1", "-o", str(tmp_path / "ft1")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ft1" / "config.json").read_text())["model"]["n_layer"] == 1
    r = runner.invoke(app, ["finetune", str(tmp_path / "train.npz"), str(tmp_path / "val.npz"),
                            "--vocab", str(vocab), "--init", str(tmp_path / "pre" / "best.pt"),
                            "--layers", "3", "-o", str(tmp_path / "ft3")])
    assert r.exit_code == 2 and "has 2 layers" in r.output, r.output
    r = runner.invoke(app, ["finetune", str(tmp_path / "train.npz"), str(tmp_path / "val.npz"),
                            "--vocab", str(vocab), "-o", str(tmp_path / "ft2")])
    assert r.exit_code == 2 and "--no-pretrain" in r.output
    # outlier exposure: a capture tree is built with the training set's settings; a dataset
    # built with another K is refused in one line
    r = runner.invoke(app, ["finetune", str(tmp_path / "train.npz"), str(tmp_path / "val.npz"),
                            "--vocab", str(vocab), "--init", str(tmp_path / "pre" / "best.pt"),
                            "--epochs", "1", "-o", str(tmp_path / "oe"), "--outliers", str(tree),
                            "--balance", "sampler", "--synthetic-outliers"])
    assert r.exit_code == 0, r.output
    trained = json.loads((tmp_path / "oe" / "config.json").read_text())["train"]
    # plus one synthetic outlier per train flow, saved for `flagd calibrate --exposure`
    synthetic = Dataset.load(tmp_path / "oe" / "synthetic-outliers.npz")
    assert len(synthetic) == len(Dataset.load(tmp_path / "train.npz"))
    assert trained["n_outliers"] == len(d) + len(synthetic) and trained["balance"] == "sampler"
    # flagd train's class weighting unless told otherwise
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["train"]["balance"] == "weights"
    other = tmp_path / "k3.npz"
    assert runner.invoke(app, ["dataset", "build", str(tree), "-o", str(other), "--packets", "3"]).exit_code == 0
    r = runner.invoke(app, ["finetune", str(tmp_path / "train.npz"), str(tmp_path / "val.npz"),
                            "--vocab", str(vocab), "--init", str(tmp_path / "pre" / "best.pt"),
                            "-o", str(tmp_path / "oe2"), "--outliers", str(other)])
    assert r.exit_code == 1 and "other flow settings" in r.output
    flat = tmp_path / "flat"  # no flows at all: an error, not training without exposure
    flat.mkdir()
    (flat / "notes.txt").write_text("no captures here")
    r = runner.invoke(app, ["finetune", str(tmp_path / "train.npz"), str(tmp_path / "val.npz"),
                            "--vocab", str(vocab), "--init", str(tmp_path / "pre" / "best.pt"),
                            "-o", str(tmp_path / "oe3"), "--outliers", str(flat)])
    assert r.exit_code == 1 and "no flows in" in r.output, r.output


def test_train_on_too_few_flows_is_one_line(tmp_path):
    for cls, kind in (("chat", "ssh"), ("voip", "rtp")):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        crafted.write_pcap(tmp_path / "tree" / cls / "0.pcap", flows_of(kind, 1, seed=1), LINKTYPE_ETHERNET)
    r = runner.invoke(app, ["train", str(tmp_path / "tree"), "-o", str(tmp_path / "run"),
                            "--preset", "tiny", "--mode", "paper"])
    assert r.exit_code == 1, r.output
    assert "2 flows in 2 classes are too few to split" in r.output


def test_train_rejects_bad_packet_settings(tmp_path):
    r = runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "run"), "--packet-bytes", "32"])
    assert r.exit_code == 2 and "packet_bytes must be at least 40" in r.output
    # a flag-shallow depth the preset does not have: refused before any data is read
    r = runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "run"), "--preset", "mini",
                            "--variant", "flag-shallow", "--shallow-layers", "5"])
    assert r.exit_code == 2 and "has 3 layers: choose 1 to 3, not 5" in r.output
    r = runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "run"), "--preset", "huge"])
    assert r.exit_code == 2 and "unknown preset 'huge'" in r.output
    r = runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "run"), "--fraction", "1",
                            "--self-train", "0.5"])
    assert r.exit_code == 2 and "--self-train needs a label fraction under 1" in r.output
    assert not (tmp_path / "run").exists()


def test_train_loio_mode_is_for_lab_runs_only(tmp_path):
    tree = make_tree(tmp_path / "tree")
    r = runner.invoke(app, ["train", str(tree), "-o", str(tmp_path / "run"), "--preset", "tiny",
                            "--mode", "loio"])
    assert r.exit_code == 1 and "loio splits lab runs" in r.output, r.output
