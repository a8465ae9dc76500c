"""Malformed input: the capture readers, the decoder and the flow meter never fall over.

Property tests (hypothesis) and a seeded mutation sweep over valid captures: whatever the bytes,
reading raises only `DecodeError` (and only when the file cannot be read as a capture at all),
`decode` raises nothing, and the flow table stays within its bounds and accounts for every flow.
The 1,000,000-input run is benchmarks/fuzz.py; this is its scaled-down CI version (~25k inputs).
Every `fuzz-*` capture of the nDPI test suite replays through the CLI to a clean end.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagd.flows import FlowSettings, FlowTable
from flagd.frames import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    Frames,
)
from flagd.packets import DecodeError, Skip, decode
from flagd.pcapfile import read_capture
from tests import crafted
from tests.conftest import shared_data

LINKTYPES = [LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_NULL, LINKTYPE_LOOP, LINKTYPE_LINUX_SLL,
             LINKTYPE_LINUX_SLL2, LINKTYPE_IPV4, LINKTYPE_IPV6, 147]  # 147: a DLT nobody decodes
CASES = crafted.cases()
_TMP = Path(tempfile.mkdtemp(prefix="flagd-fuzz-"))


# -- invariants shared by every target ----------------------------------------------------------


def check_frames(fr: Frames) -> None:
    assert len(fr.caplen) == len(fr.wirelen) == len(fr.ts) == len(fr.linktype) == len(fr)
    assert (fr.caplen >= 0).all() and (fr.wirelen >= fr.caplen).all()
    assert (fr.offset >= 0).all() and (fr.offset + fr.caplen <= len(fr.data)).all()


def check_packets(fr: Frames) -> None:
    p = decode(fr)
    assert len(p) == len(fr)
    ok = p.skip == Skip.OK
    assert set(np.unique(p.proto[ok]).tolist()) <= {6, 17}
    end = fr.offset + fr.caplen
    need = np.where(p.proto == 6, 14, 4)
    assert (p.l4_off[ok] + need[ok] <= end[ok]).all(), "transport header read past the record"
    assert (p.payload_len >= 0).all()
    return p


def meter(batches: list[Frames], max_flows: int = 8, k: int = 3) -> FlowTable:
    """Feed batches to a small flow table; check its bounds and that every flow ends once."""
    table = FlowTable(FlowSettings(max_flows=max_flows, ready_packets=k, idle_timeout=5.0))
    ended = ready = 0
    for fr in batches:
        for kind, f in table.add(decode(fr)):
            ended += kind == "end"
            ready += kind == "ready"
            assert len(f.packets) <= k and all(len(b) <= 128 for b in f.packets)
        assert len(table) <= max_flows
    ended += sum(kind == "end" for kind, _ in table.flush())
    assert len(table) == 0
    assert ended == table.stats.flows == sum(table.stats.ended.values())
    assert ready == table.stats.ready
    return table


def read_all(data: bytes) -> list[Frames]:
    """Read a capture given as bytes; only DecodeError may come out (re-raised)."""
    path = _TMP / "in.cap"
    path.write_bytes(data)
    out = []
    with read_capture(path, batch_size=7) as cap:
        for fr in cap:
            check_frames(fr)
            out.append(fr)
        st_ = cap.stats
        assert st_.records == sum(len(f) for f in out)
        if st_.truncated:
            assert st_.problem and "\n" not in st_.problem
    return out


def valid_captures() -> list[bytes]:
    """Small valid pcap and pcapng files covering every reader path (the mutation seeds)."""
    recs = [crafted.Record(1_700_000_000 + i * 0.25, c.frame) for i, c in enumerate(CASES[:16])]
    eth = [r for r, c in zip(recs, CASES, strict=False) if c.linktype == LINKTYPE_ETHERNET]
    itf = [crafted.Interface(LINKTYPE_ETHERNET, tsresol=9), crafted.Interface(LINKTYPE_RAW)]
    two = [crafted.Record(1_700_000_000.5, CASES[0].frame, interface=0),
           crafted.Record(1_700_000_001.5, CASES[12].frame, interface=1)]
    return [
        crafted.pcap_bytes(eth, LINKTYPE_ETHERNET),
        crafted.pcap_bytes(eth, LINKTYPE_ETHERNET, big_endian=True, nanos=True),
        crafted.pcapng_section(itf, two, extra_blocks=True),
        crafted.pcapng_section(itf, two, big_endian=True, block="pb"),
        crafted.pcapng_section(itf[:1], eth, block="spb"),
    ]


SEEDS = valid_captures()


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Byte flips, overwrites with boundary values, cuts, duplicated and dropped spans."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if not b:
            break
        i = rng.randrange(len(b))
        if op < 0.35:
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.6:
            v = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01, 0x40))
            b[i:i + rng.randint(1, 4)] = bytes([v]) * rng.randint(1, 4)
        elif op < 0.7:
            del b[rng.randrange(len(b)):]
        elif op < 0.85:
            j = rng.randrange(len(b))
            b[j:j] = b[i:i + rng.randint(1, 64)]
        else:
            del b[i:i + rng.randint(1, 16)]
    return bytes(b)


# -- hypothesis ---------------------------------------------------------------------------------

fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(st.binary(max_size=600))
def test_reader_on_arbitrary_bytes(data):
    try:
        batches = read_all(data)
    except DecodeError as e:
        assert str(e) and "\n" not in str(e)
        return
    meter(batches)


@fast
@given(st.sampled_from(SEEDS), st.integers(0, 2**32 - 1))
def test_reader_decoder_and_meter_on_mutated_captures(seed_file, rnd):
    data = mutate(random.Random(rnd), seed_file)
    try:
        batches = read_all(data)
    except DecodeError:
        return
    for fr in batches:
        check_packets(fr)
    meter(batches)


frame_bytes = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda c, n, r: mutate(random.Random(r), c.frame)[:n],
              st.sampled_from(CASES), st.integers(0, 200), st.integers(0, 2**32 - 1)),
)


@fast
@given(st.lists(st.tuples(frame_bytes, st.sampled_from(LINKTYPES), st.integers(0, 3000)),
                max_size=64))
def test_decoder_and_meter_on_arbitrary_frames(records):
    fr = Frames.from_records([(1_700_000_000 + i * 0.01, b, max(len(b), w), lt)
                              for i, (b, lt, w) in enumerate(records)])
    check_packets(fr)
    meter([fr])


@fast
@given(st.binary(min_size=0, max_size=300), st.lists(st.tuples(st.integers(-50, 400),
                                                                st.integers(0, 400)), max_size=16))
def test_decoder_clamps_records_that_disagree_with_their_buffer(buf, spans):
    """A hand-built batch whose offsets/lengths point outside the buffer still decodes."""
    n = len(spans)
    fr = Frames(data=np.frombuffer(buf, np.uint8),
                offset=np.array([s for s, _ in spans], np.int64).clip(0),
                caplen=np.array([c for _, c in spans], np.int32),
                wirelen=np.array([c for _, c in spans], np.int32),
                ts=np.arange(n, dtype=np.float64), linktype=np.full(n, LINKTYPE_ETHERNET, np.int32))
    assert len(decode(fr)) == n


# -- a seeded bulk sweep: many more inputs per second than hypothesis ---------------------------


def test_mutation_sweep_20k_frames_and_2k_files():
    """20,480 mutated frames in big batches (decode is vectorised) and 2,000 mutated files."""
    rng = random.Random(8)
    frames = 0
    for _ in range(10):
        recs = []
        for i in range(2048):
            c = rng.choice(CASES)
            b = mutate(rng, c.frame)[: rng.randint(0, 160)]
            lt = c.linktype if rng.random() < 0.9 else rng.choice(LINKTYPES)
            recs.append((1_700_000_000 + i * 0.001, b, len(b) + rng.randint(0, 3), lt))
        fr = Frames.from_records(recs)
        check_packets(fr)
        meter([fr], max_flows=64, k=5)
        frames += len(fr)
    files = refused = 0
    for _ in range(2000):
        try:
            batches = read_all(mutate(rng, rng.choice(SEEDS)))
            for fr in batches:
                decode(fr)
        except DecodeError:
            refused += 1
        files += 1
    assert frames == 20480 and files == 2000
    assert refused < files  # most mutations keep a readable header


# -- the nDPI suite's deliberately malformed captures --------------------------------------------


def fuzz_captures() -> list[Path]:
    d = shared_data() / "ndpi" / "pcap"
    return sorted(d.glob("fuzz-*")) if d.is_dir() else []


@pytest.mark.parametrize("capture", fuzz_captures() or [None], ids=lambda p: p.name if p else "none")
def test_ndpi_fuzz_capture_replays_cleanly(capture, tmp_path, tiny_bundle):
    if capture is None:
        pytest.skip(f"nDPI captures not found under {shared_data() / 'ndpi'}")
    from typer.testing import CliRunner

    from flagd.cli import app

    log = tmp_path / "events.jsonl"
    r = CliRunner().invoke(app, ["replay", str(capture), "--model", str(tiny_bundle), "--log",
                                 str(log), "--no-dashboard"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    err = r.stderr if hasattr(r, "stderr") else r.output
    assert "Traceback" not in err
    if r.exit_code == 0:
        events = [json.loads(line) for line in log.read_text().splitlines()]
        assert events[-1]["event_type"] == "stats" and events[-1]["stats"]["final"]
        assert len(err.strip().splitlines()) <= 1  # at most one warning: where reading stopped
    else:
        assert r.exit_code == 1 and len(err.strip().splitlines()) == 1
