"""Packet-aware model input: which packet each phrase id came from, the side-channel buckets,
the masked side channel of pre-training, the encoder's use of the context, datasets that carry
it, and the random forest's view of the same flows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flagd import inputs
from flagd.dataset import Dataset, DatasetError
from flagd.experiment import RF_BYTES, rf_features
from flagd.model import FlagEncoder, ModelConfig
from flagd.phrases import CLS, EOS, PAD, SEP, PhraseDict
from flagd.train import IGNORE, mask_sides

BYTES = PhraseDict.bytes_only()


def test_packet_index_follows_each_packets_ids_and_sep():
    ids, packet_of = BYTES.encode_flows_with_packets([[b"abc", b"de"], [b"x"]], 10)
    assert ids[0].tolist() == [CLS, *BYTES.encode(b"abc"), SEP, *BYTES.encode(b"de"), EOS, PAD, PAD]
    assert packet_of[0].tolist() == [0, 1, 1, 1, 1, 2, 2, 0, 0, 0]
    assert packet_of[1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert (ids == BYTES.encode_flows([[b"abc", b"de"], [b"x"]], 10)).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=40), max_size=6), max_size=5),
       st.integers(min_value=2, max_value=40))
def test_packet_index_matches_a_plain_reading_of_the_row(flows, max_len):
    """Walking each row left to right, a packet's ids end at its SEP (or at EOS for the last):
    the index must count packets that way, and be 0 exactly on CLS, EOS and PAD."""
    ids, packet_of = BYTES.encode_flows_with_packets(flows, max_len)
    for row, pk in zip(ids.tolist(), packet_of.tolist(), strict=True):
        current = 1
        for tok, p in zip(row, pk, strict=True):
            if tok in (CLS, EOS, PAD):
                assert p == 0
                continue
            assert p == current
            if tok == SEP:
                current += 1


def test_packets_read_counts_the_packets_the_input_holds():
    flows = [[b"abc", b"de", b"f"], [b"x"], []]
    sides = [[(0, 60, 0.0)] * 3, [(1, 60, 0.0)], []]
    for max_len, want in ((32, [3, 1, 0]), (6, [2, 1, 0])):  # 6 ids: CLS + 2 packets + EOS
        ids, ctx = inputs.encode(BYTES, flows, sides, max_len, packet_aware=True)
        assert inputs.packets_read(ids, ctx).tolist() == want
        flat, _ = inputs.encode(BYTES, flows, sides, max_len, packet_aware=False)
        assert inputs.packets_read(flat, None).tolist() == want


def test_buckets_of_size_direction_and_gap():
    b = inputs.bucketize(np.array([[0, 60, 0.0], [1, 1500, 0.02], [0, 9000, 500.0]]))
    assert b[:, 0].tolist() == [1, 2, 1]  # direction + 1
    assert b[:, 1].tolist() == [60 // 32 + 1, 1500 // 32 + 1, inputs.SIZE_BUCKETS]
    assert b[0, 2] == 1 and b[2, 2] == inputs.GAP_BUCKETS  # clamped at both ends
    # 20 ms: 4 steps per decade from 1 us -> floor(4 * log10(2e4)) = 17
    assert b[1, 2] == 17 + 1


def test_context_reads_each_tokens_own_packet():
    flows = [[b"ab", b"c"], [b"zz"]]
    sides = [[(0, 100, 0.0), (1, 700, 0.5)], [(1, 64, 1e-3)]]
    ids, ctx = inputs.encode(BYTES, flows, sides, 8, packet_aware=True)
    want = inputs.bucketize(np.array([s for f in sides for s in f]))
    assert ctx.shape == (2, 8, 4)
    assert ctx[0, 1].tolist() == [1, *want[0]]  # 'a' of packet 1
    assert ctx[0, 3].tolist() == [1, *want[0]]  # packet 1's SEP
    assert ctx[0, 4].tolist() == [2, *want[1]]  # 'c' of packet 2
    assert ctx[1, 1].tolist() == [1, *want[2]]
    assert (ctx[0, 0] == 0).all() and (ctx[0, 5] == 0).all()  # CLS, EOS
    flat_ids, none = inputs.encode(BYTES, flows, sides, 8, packet_aware=False)
    assert none is None and (flat_ids == ids).all()
    with pytest.raises(ValueError, match="side channel"):
        inputs.encode(BYTES, flows, None, 8, packet_aware=True)


def test_mask_sides_hides_whole_packets_and_keeps_targets():
    flows = [[bytes([i]) * 5 for i in range(6)] for _ in range(40)]
    sides = [[(i % 2, 100 + 40 * i, 10.0 ** -i) for i in range(6)] for _ in range(40)]
    _, ctx = inputs.encode(BYTES, flows, sides, 64, packet_aware=True)
    ctx = torch.from_numpy(ctx)
    masked, targets = mask_sides(ctx, torch.Generator().manual_seed(0), prob=0.3)
    hidden = masked[..., 2] == inputs.SIZE_MASK
    assert (hidden == (masked[..., 3] == inputs.GAP_MASK)).all()
    assert not hidden[ctx[..., 0] == 0].any()  # CLS, EOS, PAD never
    # a packet is hidden whole or not at all
    for r in range(len(flows)):
        for p in range(1, 7):
            h = hidden[r][ctx[r, :, 0] == p]
            assert h.all() or not h.any()
    assert 0.15 < hidden.float().sum() / (ctx[..., 0] > 0).sum() < 0.45
    assert (targets[hidden] == ctx[..., 2:].long()[hidden]).all()
    assert (targets[~hidden] == IGNORE).all()
    assert (masked[..., :2] == ctx[..., :2].long()).all()  # index and direction stay


def test_packet_aware_encoder_uses_the_context_and_learns_masked_sides():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=BYTES.vocab_size, max_len=32, n_layer=1, n_embd=32, n_head=2,
                      n_classes=3, packet_aware=True, dropout=0.0)
    model = FlagEncoder(cfg).eval()
    ids, ctx = inputs.encode(BYTES, [[b"abc", b"de"]], [[(0, 80, 0.001), (1, 1400, 0.2)]], 32,
                             packet_aware=True)
    ids, ctx = torch.from_numpy(ids).long(), torch.from_numpy(ctx)
    a, _ = model.classify(ids, ctx=ctx)
    other = ctx.clone()
    other[..., 2] = torch.where(other[..., 0] > 0, 3, 0)  # other sizes, same bytes
    b, _ = model.classify(ids, ctx=other)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="packet context"):
        model.classify(ids)
    # pre-training's loss includes the masked side channel
    masked, side_targets = mask_sides(ctx, torch.Generator().manual_seed(1), prob=1.0)
    targets = torch.full_like(ids, IGNORE)
    targets[0, 1] = ids[0, 1]
    _, with_sides = model(ids, targets, masked, side_targets)
    _, phrases_only = model(ids, targets, masked)
    assert with_sides > phrases_only


def test_dataset_keeps_sides_and_refuses_version_1(tmp_path):
    ds = Dataset([[b"ab", b"cd"], [b"e"]], [[(0, 60, 0.0), (1, 1500, 0.25)], [(1, 99, 3.5)]],
                 np.array([0, 1]), ["a", "b"], np.array([0, 0]), ["x.pcap"], np.array([1.0, 2.0]),
                 {"ready_packets": 5}, {})
    back = Dataset.load(ds.save(tmp_path / "d.npz"))
    assert back.sides == ds.sides and back.flows == ds.flows
    z = dict(np.load(tmp_path / "d.npz"))
    z["meta"] = np.array(str(z["meta"]).replace('"version": 2', '"version": 1'))
    np.savez(tmp_path / "old.npz", **z)
    with pytest.raises(DatasetError, match="version 1.*flagd dataset build"):
        Dataset.load(tmp_path / "old.npz")


def test_random_forest_sees_the_first_bytes_of_the_first_k_packets():
    x = rf_features([[b"\x01" * 100, b"\x02\x03"], [b"\x04"]], k=3)
    assert x.shape == (2, 3 * RF_BYTES)
    assert (x[0, :RF_BYTES] == 1).all()
    assert x[0, RF_BYTES:RF_BYTES + 3].tolist() == [2, 3, 0]
    assert x[1, 0] == 4 and not x[1, 1:].any()
