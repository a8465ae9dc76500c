"""Training loops: dynamic masking statistics, pre-training (run files, resume, real flows),
fine-tuning (model selection, class balance) and DistributedDataParallel on CPU with gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flagd.model import ModelConfig, load_checkpoint
from flagd.phrases import CLS, EOS, MASK, NUM_SPECIAL, PAD, SEP
from flagd.train import (
    IGNORE,
    evaluate_mlm,
    finetune,
    macro_f1,
    mask_tokens,
    pick_device,
    pretrain,
)

V = 96


def shared_data() -> Path:
    return Path(
        os.environ.get("FLAGD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )


def tiny(**kw) -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=V, **{"dropout": 0.0, "max_len": 32, **kw})


def random_flows(n: int, T: int = 32, seed: int = 0) -> np.ndarray:
    """[CLS] phrases with a [SEP] every 6 [EOS], then PAD; lengths vary."""
    rng = np.random.default_rng(seed)
    ids = np.full((n, T), PAD, dtype=np.int32)
    for i in range(n):
        L = int(rng.integers(4, T + 1))
        body = rng.integers(NUM_SPECIAL, V, L - 2)
        body[5::6] = SEP
        ids[i, :L] = [CLS, *body, EOS]
    return ids


# ---------------------------------------------------------------------------------------------
# Dynamic masking


def test_mask_tokens_statistics_over_many_draws():
    ids = torch.as_tensor(random_flows(4000, T=64, seed=1))
    g = torch.Generator().manual_seed(0)
    inputs, targets = mask_tokens(ids, V, g)
    chosen = targets != IGNORE
    phrase = ids >= NUM_SPECIAL
    # exactly round(15%) of each row's phrases (at least one), never a special token
    expected = torch.clamp(torch.floor(phrase.sum(1) * 0.15 + 0.5), min=1)
    assert torch.equal(chosen.sum(1), expected.long())
    assert not (chosen & ~phrase).any()
    assert abs(chosen.sum() / phrase.sum() - 0.15) < 0.01
    # targets are the originals; unchosen positions are untouched
    assert torch.equal(targets[chosen], ids[chosen].long())
    assert torch.equal(inputs[~chosen], ids[~chosen].long())
    # 80% [MASK], 10% another phrase, 10% unchanged (a random draw may hit the same phrase)
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    swapped = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01
    assert abs(kept - (0.1 + 0.1 / (V - NUM_SPECIAL))) < 0.01
    assert abs(swapped - 0.1 * (1 - 1 / (V - NUM_SPECIAL))) < 0.01
    replaced = inputs[chosen & (inputs != MASK)]
    assert (replaced >= NUM_SPECIAL).all() and (replaced < V).all()
    # every draw chooses anew
    again, _ = mask_tokens(ids, V, g)
    assert not torch.equal(again, inputs)
    assert torch.equal(mask_tokens(ids, V, torch.Generator().manual_seed(0))[0], inputs)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=40), min_size=1, max_size=6),
    st.integers(0, 2**31),
)
def test_mask_tokens_never_touches_specials(rows, seed):
    T = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (T - len(r)) for r in rows])
    inputs, targets = mask_tokens(ids, V, torch.Generator().manual_seed(seed))
    special = ids < NUM_SPECIAL
    assert torch.equal(inputs[special], ids[special])
    assert (targets[special] == IGNORE).all()
    n_phrases = (~special).sum(1)
    k = torch.floor(n_phrases * 0.15 + 0.5).clamp(min=1).long().minimum(n_phrases)
    assert torch.equal((targets != IGNORE).sum(1), k)
    assert inputs.dtype == torch.long and inputs.shape == ids.shape


# ---------------------------------------------------------------------------------------------
# Pre-training


def test_pick_device_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert pick_device() == torch.device("cpu")


def test_pretrain_writes_run_and_resumes_exactly(tmp_path):
    train, val = random_flows(96, seed=2), random_flows(32, seed=3)
    kw = dict(batch_size=16, lr=3e-3, vocab_sha256="cafe", seed=5, progress=False, eval_every=3)
    whole = pretrain(train, val, tiny(), tmp_path / "whole", steps=8, **kw)
    assert whole["step"] == 8 and len(whole["history"]) == 1 + 3  # step 0, 3, 6, 8
    settings_ = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert settings_["model"] == tiny().to_dict() and settings_["vocab_sha256"] == "cafe"
    assert settings_["train"]["steps"] == 8 and settings_["train"]["batch_size"] == 16

    # an interrupted run: the same schedule, stopped right after its first checkpoint (step 3)
    class Interrupted(Exception):
        pass

    def crash(line: str) -> None:
        raise Interrupted(line)

    part = tmp_path / "part"
    with pytest.raises(Interrupted, match="step 3/8"):
        pretrain(train, val, tiny(), part, steps=8, log=crash, **kw)
    first = torch.load(part / "last.pt", weights_only=True)
    assert first["step"] == 3 and first["seconds"] > 0
    resumed = pretrain(train, val, tiny(), part, steps=8, resume=True, **kw)
    assert resumed["step"] == 8
    # the cost reported is both sittings', not the last one's
    assert resumed["seconds"] > first["seconds"]
    assert torch.load(part / "last.pt", weights_only=True)["seconds"] == pytest.approx(
        resumed["seconds"], abs=0.5)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"] == b["history"]

    best, meta = load_checkpoint(tmp_path / "whole" / "best.pt")
    assert meta["metrics"]["val_loss"] == whole["best_val_loss"] and meta["vocab_sha256"] == "cafe"
    assert best.cfg.n_classes == 0
    with pytest.raises(ValueError, match="another model config"):
        pretrain(train, val, tiny(n_layer=1), part, steps=8, resume=True, **kw)
    # a finished run's last.pt alone in a new directory (how the committed checkpoint is
    # reused): nothing left to train; best.pt is its weights where its last step was its best
    last = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    for best_step, alone in ((8, tmp_path / "alone"), (3, tmp_path / "alone-earlier-best")):
        alone.mkdir()
        torch.save({**last, "best": {**last["best"], "step": best_step}}, alone / "last.pt")
        if best_step == 8:
            # written before the config had its tunnel fields (the committed ISCX checkpoint)
            old_config = {k: v for k, v in last["config"].items() if "tunnel" not in k}
            torch.save({**last, "config": old_config}, alone / "last.pt")
            assert pretrain(train, val, tiny(), alone, steps=8, resume=True, **kw)["step"] == 8
            kept = torch.load(alone / "best.pt", weights_only=True)["model"]
            assert all(torch.equal(kept[k], last["model"][k]) for k in last["model"])
        else:
            with pytest.raises(ValueError, match="copy the run's best.pt too"):
                pretrain(train, val, tiny(), alone, steps=8, resume=True, **kw)


def test_pretrain_progress_bar_and_log(tmp_path, capsys):
    lines = []
    pretrain(
        random_flows(64, seed=4), random_flows(16, seed=5), tiny(), tmp_path, epochs=2,
        batch_size=32, progress=True, log=lines.append,
    )  # fmt: skip
    assert [line.split()[:2] for line in lines] == [["step", "2/4"], ["step", "4/4"]]
    assert "masked-phrase acc" in lines[-1]
    out = capsys.readouterr().out
    assert "pretrain" in out and "phrases/s" in out  # rich's bar, drawn on stdout


def _real_flow_sample(max_len: int) -> np.ndarray:
    """Sequences of 3 consecutive packets from a real capture: the IP layer's bytes with the
    addresses zeroed, 64 bytes at most, id = byte + NUM_SPECIAL, [SEP] between packets."""
    pcap = shared_data() / "iscx-vpn2016" / "train" / "chat" / "ethernet.pcap"
    if not pcap.exists():
        pytest.skip(f"shared data absent: {pcap}")
    from scapy.layers.inet import IP
    from scapy.utils import rdpcap

    packets = []
    for p in rdpcap(str(pcap), count=2000):
        if IP in p:
            raw = bytearray(bytes(p[IP]))[:64]
            raw[12:20] = bytes(8)  # source and destination address
            packets.append(np.frombuffer(bytes(raw), dtype=np.uint8).astype(np.int32) + NUM_SPECIAL)
    rows = []
    for i in range(0, len(packets) - 2, 3):
        seq = [CLS]
        for p in packets[i : i + 3]:
            seq += [*p.tolist(), SEP]
        seq = seq[: max_len - 1] + [EOS]
        rows.append(seq + [PAD] * (max_len - len(seq)))
    return np.array(rows, dtype=np.int32)


def test_pretrain_loss_falls_on_real_flows(tmp_path):
    ids = _real_flow_sample(max_len=128)
    assert len(ids) > 300
    cfg = ModelConfig.preset("tiny", vocab_size=256 + NUM_SPECIAL, dropout=0.0)
    val, train = ids[:64], ids[64:]
    out = pretrain(
        train, val, cfg, tmp_path, steps=40, batch_size=32, lr=1e-2, progress=False, eval_every=20
    )
    start = out["history"][0]
    assert start["val_loss"] > 5.0  # ln(264): knows nothing yet
    assert out["best_val_loss"] < 0.6 * start["val_loss"]
    assert out["best_val_acc"] > 0.3
    assert out["phrases_per_s"] > 0


def test_evaluate_mlm_is_repeatable():
    from flagd.model import FlagEncoder

    model = FlagEncoder(tiny())
    val = random_flows(40, seed=9)
    assert evaluate_mlm(model, val, V, batch_size=16) == evaluate_mlm(model, val, V, batch_size=16)


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def labelled_flows(n: int, seed: int, weights=(0.7, 0.2, 0.1)) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced classes; class c draws most phrases from its own band of the vocabulary."""
    rng = np.random.default_rng(seed)
    ids = random_flows(n, seed=seed)
    y = rng.choice(3, size=n, p=weights)
    for i in range(n):
        real = (ids[i] >= NUM_SPECIAL) & (rng.random(ids.shape[1]) < 0.6)
        lo = NUM_SPECIAL + 20 * y[i]
        ids[i, real] = rng.integers(lo, lo + 20, real.sum())
    return ids, y


def test_macro_f1_matches_hand_count():
    cm = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 2 absent in truth and predictions
    f1_0 = 2 * 5 / (6 + 7)
    f1_1 = 2 * 2 / (4 + 3)
    assert macro_f1(cm) == pytest.approx((f1_0 + f1_1) / 2)


def test_finetune_from_pretrained_keeps_best(tmp_path):
    train_x, train_y = labelled_flows(240, seed=11)
    val_x, val_y = labelled_flows(90, seed=12)
    pre = pretrain(
        train_x, val_x, tiny(), tmp_path / "pre", steps=10, batch_size=32, progress=False
    )
    assert pre["step"] == 10
    init = torch.load(tmp_path / "pre" / "best.pt", weights_only=True)
    labels = ["chat", "email", "voip"]
    out = finetune(
        train_x,
        train_y,
        val_x,
        val_y,
        init=init,
        labels=labels,
        run_dir=tmp_path / "ft",
        epochs=6,
        batch_size=32,
        lr=3e-3,
        balance="weights",
        progress=False,
    )
    assert out["best_val_macro_f1"] > 0.85
    best = max(out["history"], key=lambda h: h["val_macro_f1"])
    assert out["best_val_macro_f1"] == best["val_macro_f1"] and out["best_epoch"] == best["epoch"]
    model, meta = load_checkpoint(tmp_path / "ft" / "best.pt")
    assert meta["labels"] == labels and meta["vocab_sha256"] == init["vocab_sha256"]
    assert meta["metrics"]["val_macro_f1"] == pytest.approx(best["val_macro_f1"])
    assert meta["step"] == best["step"] and meta["confusion"] == best["confusion"]
    assert model.cfg.n_classes == 3 and model.cfg.n_layer == tiny().n_layer
    settings_ = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert settings_["train"]["balance"] == "weights" and settings_["train"]["pretrained"]
    assert settings_["train"]["class_counts"] == np.bincount(train_y, minlength=3).tolist()


def test_outlier_exposure_flattens_foreign_flows_and_keeps_the_classes(tmp_path):
    """Foreign flows draw their phrases from a band no class uses; exposed to some of them, the
    classifier gives other foreign flows a much flatter softmax, and still learns the classes."""
    from flagd.infer import predict_logits

    train_x, train_y = labelled_flows(240, seed=11)
    val_x, val_y = labelled_flows(90, seed=12)
    foreign = random_flows(160, seed=13)
    real = foreign >= NUM_SPECIAL
    foreign[real] = np.random.default_rng(13).integers(NUM_SPECIAL + 60, V, real.sum())
    seen, unseen = foreign[:80], foreign[80:]
    top = {}
    for weight in (0.0, 1.0):
        out = finetune(train_x, train_y, val_x, val_y, init=None, cfg=tiny(), labels=["a", "b", "c"],
                       run_dir=tmp_path / str(weight), epochs=6, batch_size=32, lr=3e-3,
                       balance="weights", progress=False, outlier_ids=seen if weight else None,
                       outlier_weight=weight)
        assert out["best_val_macro_f1"] > 0.85
        model, _ = load_checkpoint(tmp_path / str(weight) / "best.pt")
        probs = predict_logits(model.eval(), torch.from_numpy(unseen)).softmax(-1)
        top[weight] = probs.max(-1).values.mean().item()
    settings_ = json.loads((tmp_path / "1.0" / "config.json").read_text())["train"]
    assert settings_["n_outliers"] == 80 and settings_["outlier_weight"] == 1.0
    # measured 0.77 without, 0.49 with (1/3 would be flat over three classes)
    assert top[1.0] < top[0.0] - 0.15, top


def test_class_balance_helps_the_rare_class(tmp_path):
    # 70/20/10: unweighted, the rare class is never predicted in this short run
    train_x, train_y = labelled_flows(240, seed=11)
    val_x, val_y = labelled_flows(90, seed=12)
    f1 = {}
    for balance in ("none", "weights", "sampler"):
        out = finetune(
            train_x,
            train_y,
            val_x,
            val_y,
            init=None,
            cfg=tiny(),
            labels=["a", "b", "c"],
            run_dir=tmp_path / balance,
            epochs=6,
            batch_size=32,
            lr=3e-3,
            balance=balance,
            progress=False,
        )
        f1[balance] = out["best_val_macro_f1"]
    assert min(f1["weights"], f1["sampler"]) > f1["none"] + 0.2, f1
    with pytest.raises(ValueError, match="balance"):
        finetune(
            train_x,
            train_y,
            val_x,
            val_y,
            init=None,
            cfg=tiny(),
            labels=["a", "b", "c"],
            run_dir=tmp_path,
            balance="oversample",
            progress=False,
        )


def test_finetune_from_random_weights_needs_cfg(tmp_path):
    x, y = labelled_flows(64, seed=13)
    with pytest.raises(ValueError, match="needs a cfg"):
        finetune(x, y, x, y, init=None, labels=["a", "b", "c"], run_dir=tmp_path, progress=False)
    out = finetune(
        x,
        y,
        x[:32],
        y[:32],
        init=None,
        cfg=tiny(),
        labels=["a", "b", "c"],
        run_dir=tmp_path,
        epochs=3,
        batch_size=32,
        lr=3e-3,
        patience=1,
        progress=False,
    )
    assert 1 <= len(out["history"]) <= 3 and (tmp_path / "best.pt").exists()


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel: two CPU processes under torchrun, gloo backend

WORKER = """
import json, os, sys
from pathlib import Path
import torch
from flagd.train import finetune, pretrain
sys.path.insert(0, {tests!r})
from test_train import labelled_flows, tiny

out = Path({out!r})
torch.set_num_threads(1)
x, y = labelled_flows(120, seed=21)
pre = pretrain(x, x[:40], tiny(), out / "pre", steps=6, batch_size=16, seed=3, progress=False)
ft = finetune(x, y, x[:40], y[:40], init=None, cfg=tiny(), labels=["a", "b", "c"],
              run_dir=out / "ft", epochs=2, batch_size=16, progress=False)
keys = ("step", "val_loss", "weights_sha256")
result = {{"pre": {{k: pre[k] for k in keys}}, "ft": [ft["best_val_macro_f1"], ft["weights_sha256"]]}}
(out.parent / f"rank{{os.environ['RANK']}}.json").write_text(json.dumps(result))
"""


def test_ddp_two_processes_gloo(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
    ]
    # own session, so that a hang can be ended with its workers (torchrun's children)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("torchrun timed out:\n" + output[-3000:])
    assert proc.returncode == 0, output[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # gradients were averaged: both ranks end with the same weights (and, since validation is
    # summed over ranks, the same figures)
    assert r0 == r1
    assert r0["pre"]["step"] == 6
    for run in ("pre", "ft"):  # only rank 0 wrote, and only the run files
        assert sorted(p.name for p in (out / run).iterdir()) == sorted(
            ["best.pt", "config.json"] + (["last.pt"] if run == "pre" else [])
        )
    assert json.loads((out / "pre" / "config.json").read_text())["train"]["world_size"] == 2
    # 120 flows over 2 ranks x 16 per step = 4 steps per epoch
    assert torch.load(out / "ft" / "best.pt", weights_only=True)["step"] in (4, 8)
