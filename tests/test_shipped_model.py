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
