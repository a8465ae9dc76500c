"""The shipped default model: it loads, checks out, classifies the sample capture, and scores
on its own held-out test flows (re-read from ../shared) what its card says."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flagd.cli import app
from flagd.evaluate import metrics as score
from flagd.infer import Bundle, default_model
from flagd.labels import CLASSES_12

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).parent / "data" / "lab-tls.pcap"


def test_shipped_model_loads_with_its_twelve_classes():
    bundle = Bundle.load(default_model())
    assert bundle.name == "iscx-vpn2016"
    assert sorted(bundle.labels) == sorted(CLASSES_12)
    assert bundle.settings.ready_packets == 5 and bundle.max_len == 64  # the input sweep's choice
    size = sum(f.stat().st_size for f in default_model().iterdir())
    assert size < 25e6
    metrics = json.loads((default_model() / "metrics.json").read_text())
    assert metrics["test"]["n_flows"] > 500  # figures come from a real held-out split


def test_shipped_model_scores_its_card_on_its_own_test_flows(shipped_test_flows):
    """The bundle lists its test split (capture, flow start). Rebuild those flows from the
    captures, classify them through the daemon's inference path, and require the accuracy the
    card and metrics.json report, within 0.01: a check of the model, not of its paperwork."""
    path, test = shipped_test_flows
    bundle = Bundle.load(path)
    index = [bundle.labels.index(c) for c in test.classes]
    truth = [index[i] for i in test.labels]
    report = score(truth, bundle.predict_flows(test.flows, test.sides), bundle.labels)
    card = json.loads((path / "metrics.json").read_text())["test"]
    assert report["n_flows"] == card["n_flows"]
    assert abs(report["accuracy"] - card["accuracy"]) <= 0.01, (report["accuracy"], card["accuracy"])


def test_replay_with_the_default_model_classifies_every_flow(tmp_path):
    log = tmp_path / "events.jsonl"
    r = CliRunner().invoke(app, ["replay", str(SAMPLE), "--log", str(log)])
    assert r.exit_code == 0, r.output
    events = [json.loads(x) for x in log.read_text().splitlines()]
    flows = [e for e in events if e["event_type"] == "flow"]
    cls = {e["flow_id"]: e for e in events if e["event_type"] == "classification"}
    assert len(flows) == 9  # 7 TLS connections and 2 UDP exchanges
    for f in flows:
        c = cls[f["flow_id"]]
        assert c["flag"]["label"] in (*CLASSES_12, "unknown") and c["flag"]["model"] == "iscx-vpn2016"
        assert f["flag"]["label"] == c["flag"]["label"]


def test_committed_pretraining_checkpoint_resumes_the_shipped_model():
    """checkpoints/iscx-vpn2016-pretrain.pt is what `flagd train` resumes pre-training from (the
    card says how): the shipped model's encoder config (it may use fewer of the layers) and
    phrase dictionary, loadable weights, optimizer state and the curve up to its step."""
    import torch

    from flagd.model import FlagEncoder, ModelConfig

    ckpt = torch.load(ROOT / "checkpoints" / "iscx-vpn2016-pretrain.pt", weights_only=True)
    bundle = Bundle.load(default_model())
    assert ckpt["vocab_sha256"] == bundle.phrases.sha256
    cfg = ModelConfig.from_dict(ckpt["config"])
    shipped = bundle.model.cfg.to_dict()
    assert shipped["n_layer"] <= cfg.n_layer  # flag-shallow fine-tunes the first layers only
    assert cfg.to_dict() == {**shipped, "n_classes": 0, "n_layer": cfg.n_layer}
    FlagEncoder(cfg).load_state_dict(ckpt["model"])  # strict: every weight, nothing else
    assert ckpt["optimizer"]["state"] and ckpt["history"][-1]["step"] == ckpt["step"] > 0


LAB12 = ROOT / "models" / "lab12"


def test_lab12_model_loads_with_the_settings_it_was_trained_with():
    bundle = Bundle.load(LAB12)
    assert bundle.name == "lab12"
    assert sorted(bundle.labels) == sorted(CLASSES_12)
    assert bundle.settings.ready_packets == 32 and bundle.max_len == 128
    pre = bundle.settings.preprocessing
    assert pre.packet_bytes == 64 and "ports" in pre.extra_masks  # the honest mode's masks
    metrics = json.loads((LAB12 / "metrics.json").read_text())
    assert metrics["test"]["n_flows"] > 200  # the held-out, session-split test


def test_replay_with_the_lab12_model(tmp_path):
    log = tmp_path / "events.jsonl"
    r = CliRunner().invoke(app, ["replay", str(SAMPLE), "--model", str(LAB12), "--log", str(log)])
    assert r.exit_code == 0, r.output
    events = [json.loads(x) for x in log.read_text().splitlines()]
    labels = {e["flag"]["label"] for e in events if e["event_type"] == "classification"}
    assert len([e for e in events if e["event_type"] == "flow"]) == 9
    assert labels and labels <= {*CLASSES_12, "unknown"}  # unknown: open-set rejection
