"""Shared fixtures: the shared data location and a small random-weights model bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data() -> Path:
    root = os.environ.get("FLAGD_SHARED_DATA")
    return Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def iscx_train() -> Path:
    path = shared_data() / "iscx-vpn2016" / "train"
    if not path.is_dir():
        pytest.skip(f"ISCX training captures not found at {path}")
    return path


@pytest.fixture(scope="session")
def shipped_test_flows(iscx_train):
    """The shipped ISCX bundle's own test split (test-flows.json: capture and flow start),
    rebuilt from the captures with the bundle's settings; every listed flow found exactly once."""
    import json

    from flagd.dataset import build
    from flagd.infer import Bundle, installed_models
    from flagd.labels import labeller

    path = installed_models()["iscx-vpn2016"]
    listed = json.loads((path / "test-flows.json").read_text())
    wanted = {(Path(cap).parent.name, Path(cap).name, start) for cap, start in listed}
    ds = build([iscx_train], Bundle.load(path).settings, label=labeller("dir"))
    rows = [i for i in range(len(ds))
            if (Path(ds.sources[ds.source[i]]).parent.name, Path(ds.sources[ds.source[i]]).name,
                float(ds.start[i])) in wanted]
    assert len(rows) == len(listed)  # every test flow found again, none twice
    return path, ds.subset(rows)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle with a tiny untrained encoder: real loading and inference, meaningless labels."""
    import torch

    from flagd.flows import FlowSettings
    from flagd.infer import save_bundle
    from flagd.model import FlagEncoder, ModelConfig, make_checkpoint
    from flagd.phrases import PhraseDict

    torch.manual_seed(0)
    phrases = PhraseDict.fit([bytes(range(256)) * 4, b"\x16\x03\x01" * 50, b"\x00" * 300], 512)
    cfg = ModelConfig.preset("tiny", vocab_size=phrases.vocab_size, max_len=64, n_classes=3)
    labels = ["chat", "streaming", "voip"]
    ckpt = make_checkpoint(FlagEncoder(cfg), cfg, vocab_sha256=phrases.sha256, labels=labels,
                           step=0, metrics={})
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    return save_bundle(out, ckpt, phrases, FlowSettings(ready_packets=3), max_len=64,
                       metrics={"note": "untrained"})


def kernel_impairment(lab) -> str | None:
    """`conditions.impairment` without the user-space delay line: netem where the kernel has it."""
    from flagd.lab import conditions

    return "netem" if conditions.netem_available(lab) else None


@pytest.fixture
def no_delay_line(monkeypatch):
    """Lab sessions under the conditions the kernel applies itself (netem where it has one;
    else rate, MTU and congestion control) without the user-space delay line: for tests of
    other things (an app's session, its TLS, the daemon on the lab link) that the delay would
    only slow down. The delay line has its own tests in test_lab.py."""
    from flagd.lab import conditions

    monkeypatch.setattr(conditions, "impairment", kernel_impairment)

