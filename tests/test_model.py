"""The encoder: shapes, attention against torch's reference, padding, heads, checkpoints,
and the CPU inference helpers."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flagd.infer import predict_logits, prepare_for_inference
from flagd.model import (
    PRESETS,
    FlagEncoder,
    ModelConfig,
    SelfAttention,
    load_checkpoint,
    make_checkpoint,
    trim_padding,
)
from flagd.phrases import CLS, EOS, MASK, NUM_SPECIAL, PAD, SEP

V = 96  # a small phrase vocabulary for tests (not equal to any width)


def tiny(**kw) -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=V, **{"dropout": 0.0, **kw})


def flows(n: int, lengths: list[int] | None = None, T: int = 32, seed: int = 0) -> torch.Tensor:
    """[CLS] phrases (a [SEP] every 8) [EOS] then PAD, one row per length."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [T] * n
    ids = torch.full((n, T), PAD, dtype=torch.long)
    for i, L in enumerate(lengths):
        body = torch.randint(NUM_SPECIAL, V, (L - 2,), generator=g)
        body[7::8] = SEP
        ids[i, :L] = torch.cat([torch.tensor([CLS]), body, torch.tensor([EOS])])
    return ids


def test_presets_sizes_and_overrides():
    sizes = {}
    for name in PRESETS:
        cfg = ModelConfig.preset(name, vocab_size=4096)
        sizes[name] = sum(p.numel() for p in FlagEncoder(cfg).parameters())
    assert sizes["tiny"] < sizes["small"] < sizes["paper"]
    paper = ModelConfig.preset("paper", vocab_size=4096)
    assert (paper.n_layer, paper.n_embd, paper.n_head) == (6, 768, 6)
    assert ModelConfig.preset("small", vocab_size=100, n_classes=5).n_classes == 5
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge", vocab_size=100)
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig.preset("tiny", vocab_size=100, n_head=3)
    assert ModelConfig.from_dict(paper.to_dict()) == paper


def test_forward_shapes_and_masked_loss():
    model = FlagEncoder(tiny()).eval()
    ids = flows(3, [32, 20, 9])
    logits, loss = model(ids)
    assert logits.shape == (3, 32, V) and loss is None
    targets = torch.full_like(ids, -100)
    targets[0, 3], targets[1, 5], targets[2, 1] = 10, 11, 12
    sub, loss = model(ids, targets)
    assert sub.shape == (3, V)  # only the positions with a target
    keep = targets != -100
    torch.testing.assert_close(sub, logits[keep])
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, V), targets.view(-1)))


def test_mlm_head_is_tied_to_token_embeddings():
    model = FlagEncoder(tiny()).eval()
    ids = flows(2)
    ids[ids == 20] = 21  # phrase 20 is not in the input, so its row only feeds the decoder
    with torch.no_grad():
        model.emb.tok.weight[20] = 0.0
        model.mlm_bias[20] = 7.0
    logits, _ = model(ids)
    assert (logits[..., 20] == 7.0).all()  # the decoder row of phrase 20 is its embedding
    names = [n for n, p in model.named_parameters() if p.shape == model.emb.tok.weight.shape]
    assert names == ["emb.tok.weight"]  # no second copy of the matrix


@pytest.mark.parametrize("with_padding", [False, True])
def test_attention_matches_torch_multihead_attention(with_padding):
    torch.manual_seed(0)
    cfg = tiny(n_embd=48, n_head=4)
    ours = SelfAttention(cfg).eval()
    ref = nn.MultiheadAttention(48, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(3, 10, 48)
    keep = torch.ones(3, 10, dtype=torch.bool)
    if with_padding:
        keep[1, 6:] = False
        keep[2, 2:] = False
    expected, _ = ref(x, x, x, key_padding_mask=~keep, need_weights=False)
    got = ours(x, keep[:, None, None, :])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and the last-block shortcut: the first query alone gives the same row
    torch.testing.assert_close(ours(x, keep[:, None, None, :], first_only=True), got[:, :1])


def test_attention_matches_float64_reference():
    torch.manual_seed(1)
    attn = SelfAttention(tiny(n_embd=32, n_head=2)).eval()
    x = torch.randn(2, 7, 32)
    keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    got = attn(x, keep[:, None, None, :])
    a = attn.double()
    q, k, v = a.qkv(x.double()).split(32, dim=2)
    q, k, v = (t.view(2, 7, 2, 16).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) / 16**0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(got.double(), a.proj(y), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_cls_only_matches_full_forward(norm_first):
    torch.manual_seed(2)
    model = FlagEncoder(tiny(norm_first=norm_first, n_classes=3)).eval()
    ids = flows(4, [32, 17, 5, 30])
    full = model.encode(ids)
    torch.testing.assert_close(model.encode(ids, cls_only=True), full[:, :1])
    torch.testing.assert_close(model.cls_embedding(ids), full[:, 0])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(3, 24), min_size=1, max_size=5), st.integers(0, 8))
def test_padding_never_changes_real_positions(lengths, extra):
    torch.manual_seed(3)
    model = FlagEncoder(tiny(n_classes=4)).eval()
    ids = flows(len(lengths), lengths, T=24)
    padded = F.pad(ids, (0, extra), value=PAD)
    with torch.no_grad():
        a, b = model.encode(ids), model.encode(padded)
        keep = ids != PAD
        torch.testing.assert_close(b[:, :24][keep], a[keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.classify(padded)[0], model.classify(trim_padding(padded))[0], atol=1e-5, rtol=0
        )
    assert trim_padding(padded).shape[1] == max(lengths)


def test_all_pad_row_and_too_long_input():
    model = FlagEncoder(tiny(n_classes=2)).eval()
    ids = flows(2)
    ids[1] = PAD
    assert torch.isfinite(model.classify(ids)[0]).all()
    with pytest.raises(ValueError, match="max_len"):
        model(torch.full((1, 129), MASK))
    with pytest.raises(RuntimeError, match="no classification head"):
        FlagEncoder(tiny()).classify(ids)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(4)
    model = FlagEncoder(tiny(n_classes=3))
    ids = flows(16, T=24, seed=4)
    labels = torch.arange(16) % 3
    targets = torch.full_like(ids, -100)
    masked = ids.clone()
    targets[:, 5], masked[:, 5] = ids[:, 5], MASK
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(100):
        _, mlm = model(masked, targets)
        _, cls = model.classify(ids, labels)
        opt.zero_grad()
        (mlm + cls).backward()
        opt.step()
    model.eval()
    assert mlm.item() < 0.05 and cls.item() < 0.05
    assert (model.classify(ids)[0].argmax(-1) == labels).all()
    assert (model(masked, targets)[0].argmax(-1) == ids[:, 5]).all()


def test_checkpoint_round_trips_bit_exactly():
    torch.manual_seed(5)
    cfg = tiny(n_classes=3, dropout=0.1)
    model = FlagEncoder(cfg)
    ckpt = make_checkpoint(
        model, cfg, vocab_sha256="ab" * 32, labels=["a", "b", "c"], step=7, metrics={"f1": 0.5}
    )
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    loaded, meta = load_checkpoint(torch.load(buf, weights_only=True))
    assert meta["labels"] == ["a", "b", "c"] and meta["step"] == 7
    assert meta["vocab_sha256"] == "ab" * 32 and meta["metrics"] == {"f1": 0.5}
    assert loaded.cfg == cfg
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b), k
    ids = flows(3)
    model.eval(), loaded.eval()
    assert torch.equal(model.classify(ids)[0], loaded.classify(ids)[0])
    assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_checkpoint_file_loads_with_weights_only(tmp_path):
    cfg = tiny()
    path = tmp_path / "m.pt"
    torch.save(
        make_checkpoint(FlagEncoder(cfg), cfg, vocab_sha256="", labels=None, step=0, metrics={}),
        path,
    )
    model, meta = load_checkpoint(path)
    assert isinstance(model, FlagEncoder) and meta["labels"] == []


def test_load_pretrained_keeps_fresh_head_and_rejects_misfits():
    torch.manual_seed(6)
    pre = FlagEncoder(tiny())
    fine = FlagEncoder(tiny(n_classes=5))
    head = fine.classifier.weight.clone()
    fine.load_pretrained(pre.state_dict())
    assert torch.equal(fine.emb.tok.weight, pre.emb.tok.weight)
    assert torch.equal(fine.classifier.weight, head)
    with pytest.raises(RuntimeError):  # a wider model cannot take these weights
        FlagEncoder(tiny(n_embd=128)).load_pretrained(pre.state_dict())
    with pytest.raises(ValueError, match="missing"):
        FlagEncoder(tiny(n_layer=3)).load_pretrained(pre.state_dict())
    # a shallower model takes the first blocks (flag-shallow), and only those
    shallow = FlagEncoder(tiny(n_layer=1, n_classes=5))
    shallow.load_pretrained(pre.state_dict())
    assert torch.equal(shallow.blocks[0].mlp.fc.weight, pre.blocks[0].mlp.fc.weight)
    assert torch.equal(shallow.ln_f.weight, pre.ln_f.weight) and len(shallow.blocks) == 1


def _trained_classifier() -> tuple[FlagEncoder, torch.Tensor, torch.Tensor]:
    """A tiny classifier that has learned a rule (class = which phrase range dominates)."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    n, T = 384, 40
    labels = torch.randint(0, 3, (n,), generator=g)
    lengths = torch.randint(6, T + 1, (n,), generator=g)
    ids = torch.full((n, T), PAD)
    for i in range(n):
        lo = NUM_SPECIAL + 16 * int(labels[i])
        body = torch.randint(lo, lo + 16, (int(lengths[i]) - 2,), generator=g)
        noise = torch.rand(body.shape, generator=g) < 0.3
        body[noise] = torch.randint(NUM_SPECIAL, V, (int(noise.sum()),), generator=g)
        ids[i, : lengths[i]] = torch.cat([torch.tensor([CLS]), body, torch.tensor([EOS])])
    model = FlagEncoder(tiny(n_classes=3, max_len=T))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(4):
        for b in range(0, n, 32):
            _, loss = model.classify(ids[b : b + 32], labels[b : b + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), ids, labels


def test_inference_helpers_keep_predictions():
    model, ids, labels = _trained_classifier()
    with torch.no_grad():
        reference = model.classify(ids)[0]  # fp32, full padded length, one batch
    assert (reference.argmax(-1) == labels).float().mean() > 0.95
    fp32 = predict_logits(prepare_for_inference(model, quantize=False), ids, batch_size=50)
    torch.testing.assert_close(fp32, reference, atol=1e-4, rtol=1e-4)
    int8 = predict_logits(prepare_for_inference(model, quantize=True), ids, batch_size=50)
    assert torch.equal(int8.argmax(-1), reference.argmax(-1))
    assert (int8 - reference).abs().max() < 0.1
    assert not any(p.requires_grad for p in model.parameters())
