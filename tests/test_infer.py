"""Inference through the bundle: a flow's result does not depend on its batch-mates, the one
encoder call returns classify's logits, Prediction lives beside the code that makes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flagd.dataset import build
from flagd.infer import Bundle, Prediction, _head, predict_logits, prepare_for_inference
from flagd.model import load_checkpoint

MODELS = Path(__file__).resolve().parents[1] / "models"
SAMPLE = Path(__file__).parent / "data" / "lab-tls.pcap"


def noise_flows(rng: np.random.Generator, n: int, k: int) -> tuple[list, list]:
    """Batch-mates of every length up to K packets of 128 random bytes (longer and shorter
    than the flow under test, so the batch's padding and trim differ)."""
    flows, sides = [], []
    for _ in range(n):
        pkts = [rng.integers(0, 256, int(rng.integers(20, 129)), dtype=np.uint8).tobytes()
                for _ in range(int(rng.integers(1, k + 1)))]
        flows.append(pkts)
        sides.append([(int(rng.integers(0, 2)), len(p) + 14, float(rng.random())) for p in pkts])
    return flows, sides


@pytest.mark.parametrize("name", ["iscx-vpn2016", "lab12"])
def test_a_flow_alone_and_among_63_others_gets_the_same_label_and_confidence(name):
    bundle = Bundle.load(MODELS / name, device="cpu")
    ds = build([SAMPLE], bundle.settings)
    assert len(ds) >= 5
    rng = np.random.default_rng(0)
    worst = 0.0
    for i in range(len(ds)):
        alone = bundle.predict(bundle.encode_packets([ds.flows[i]], [ds.sides[i]]), [1])[0]
        others, other_sides = noise_flows(rng, 63, bundle.settings.ready_packets)
        at = int(rng.integers(0, 64))
        others.insert(at, ds.flows[i])
        other_sides.insert(at, ds.sides[i])
        batch = bundle.predict(bundle.encode_packets(others, other_sides), [1] * 64)[at]
        assert batch.label == alone.label and batch.top_k[0][0] == alone.top_k[0][0]
        worst = max(worst, abs(batch.confidence - alone.confidence),
                    abs(batch.score - alone.score) / max(1.0, abs(alone.score)))
    assert worst < 1e-3


def test_the_one_encoder_call_returns_classifys_logits():
    bundle = Bundle.load(MODELS / "iscx-vpn2016", device="cpu")
    flows, sides = noise_flows(np.random.default_rng(1), 8, bundle.settings.ready_packets)
    ids, ctx = bundle.encode_packets(flows, sides)  # the shipped model is packet-aware
    ids, ctx = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(ctx)
    model = bundle.model
    with torch.inference_mode():
        logits, cls = _head(model, ids, ctx)
        assert torch.allclose(logits, model.classify(ids, ctx=ctx)[0], atol=1e-6)
        assert torch.allclose(cls, model.cls_embedding(ids, ctx), atol=1e-6)


def test_int8_keeps_99_percent_of_fp32_accuracy_on_the_model_test_split(shipped_test_flows):
    """The optional int8 path against fp32 (the default), on the bundle's own test flows
    (test-flows.json: capture and flow start), rebuilt from the captures."""
    path, test = shipped_test_flows
    bundle = Bundle.load(path, device="cpu")
    y = np.array([bundle.labels.index(test.classes[i]) for i in test.labels])
    ids, ctx = bundle.encode_packets(test.flows, test.sides)
    x, c = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(ctx)
    model, _ = load_checkpoint(path / "model.pt")
    fp32 = (predict_logits(prepare_for_inference(model), x, ctx=c).argmax(1).numpy() == y).mean()
    int8 = (predict_logits(prepare_for_inference(model, quantize=True), x, ctx=c)
            .argmax(1).numpy() == y).mean()
    assert fp32 > 0.85
    assert int8 >= 0.99 * fp32


def test_prediction_dict_has_score_only_when_rejection_is_fitted():
    top = (("chat", 0.61234), ("voip", 0.3))
    plain = Prediction("chat", 0.61234, top, 3, "m").to_dict()
    assert "score" not in plain and plain["confidence"] == 0.6123
    refused = Prediction("unknown", 0.61234, top, 3, "m", score=-201.23456).to_dict()
    assert refused["label"] == "unknown" and refused["score"] == -201.2346
    assert refused["top_k"][0] == {"label": "chat", "confidence": 0.6123}


def test_events_module_stays_free_of_torch():
    code = ("import sys, flagd.events, flagd.pipeline; "
            "assert 'torch' not in sys.modules; assert not hasattr(flagd.events, 'Prediction')")
    subprocess.run([sys.executable, "-c", code], check=True)
