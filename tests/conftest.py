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
