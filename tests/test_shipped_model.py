"""The shipped default model: it loads, checks out, and classifies the sample capture."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flagd.cli import app
from flagd.infer import Bundle, default_model
from flagd.labels import CLASSES_12

SAMPLE = Path(__file__).parent / "data" / "lab-tls.pcap"


def test_shipped_model_loads_with_its_twelve_classes():
    bundle = Bundle.load(default_model())
    assert bundle.name == "iscx-vpn2016"
    assert sorted(bundle.labels) == sorted(CLASSES_12)
    assert bundle.settings.ready_packets == 5
    size = sum(f.stat().st_size for f in default_model().iterdir())
    assert size < 25e6
    metrics = json.loads((default_model() / "metrics.json").read_text())
    assert metrics["test"]["n_flows"] > 500  # figures come from a real held-out split


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
        assert c["flag"]["label"] in CLASSES_12 and c["flag"]["model"] == "iscx-vpn2016"
        assert f["flag"]["label"] == c["flag"]["label"]


LAB12 = Path(__file__).resolve().parents[1] / "models" / "lab12"


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
    assert labels and labels <= set(CLASSES_12)
