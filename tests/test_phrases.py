"""Tests for flagd.phrases: fitting the N-phrase dictionary, greedy encoding, flows, files."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flagd.phrases as phrases_mod
from flagd.phrases import CLS, EOS, MASK, NUM_SPECIAL, PAD, SEP, PhraseDict, PhraseDictError

DATA = Path(
    os.environ.get("FLAGD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def b(c: str) -> int:
    """Id of a single byte given as a one-character string."""
    return NUM_SPECIAL + ord(c)


def pid(d: PhraseDict, phrase: bytes) -> int:
    """Id of a 2/3-phrase of `d`."""
    return NUM_SPECIAL + 256 + d.phrases.index(phrase)


def corpus(seed: int, n: int = 400) -> list[bytes]:
    """Packets with structure (a shared header, a small alphabet) so a fit finds real phrases."""
    rng = random.Random(seed)
    head = bytes([0x45, 0, 0, 0x3C, 0, 0, 0x40, 0, 0x40, 6])
    out = []
    for _ in range(n):
        body = bytes(rng.choice(b"abcdeXYZ\x00\x01\xff") for _ in range(rng.randrange(0, 60)))
        out.append(head[: rng.randrange(0, len(head) + 1)] + body)
    return out


@pytest.fixture(scope="module")
def fitted() -> PhraseDict:
    return PhraseDict.fit(corpus(0), 700)


# ---- ids and the bytes-only dictionary ------------------------------------------------------


def test_special_ids_are_fixed():
    assert (PAD, CLS, EOS, MASK, SEP, NUM_SPECIAL) == (0, 1, 2, 3, 4, 8)
    d = PhraseDict.bytes_only()
    assert d.size == 256 and d.vocab_size == 264 and d.phrases == ()


def test_bytes_only_maps_each_byte_to_8_plus_value():
    d = PhraseDict.bytes_only()
    data = bytes(range(256))
    assert d.encode(data).tolist() == list(range(8, 264))
    assert d.decode(d.encode(data)) == data


def test_phrase_ids_follow_the_single_bytes_in_dictionary_order():
    d = PhraseDict([b"ab", b"xyz"])
    assert d.vocab_size == 8 + 256 + 2
    assert d.encode(b"abxyz").tolist() == [264, 265]


# ---- greedy longest-first encoding ----------------------------------------------------------


@pytest.mark.parametrize(
    ("phrases", "data", "expected"),
    [
        # a 3-phrase beats the 2-phrase that starts at the same byte
        ([b"ab", b"abc"], b"abcd", [b"abc", "d"]),
        # the 3-gram is not in the dictionary: fall back to the 2-phrase
        ([b"ab", b"bcd"], b"abd", [b"ab", "d"]),
        # greedy, no look-ahead: "ab" is taken although "a" + "bcd" would be shorter
        ([b"ab", b"bcd"], b"abcd", [b"ab", "c", "d"]),
        # no 2- or 3-phrase here: single bytes
        ([b"ab"], b"ba", ["b", "a"]),
        # the last two bytes are covered too (the paper's pseudo-code stops early)
        ([b"abc", b"ab"], b"abcab", [b"abc", b"ab"]),
        ([b"abc"], b"abcab", [b"abc", "a", "b"]),
        ([b"ab"], b"zab", ["z", b"ab"]),
        ([b"abc"], b"", []),
    ],
)
def test_greedy_priority(phrases, data, expected):
    d = PhraseDict(phrases)
    want = [b(x) if isinstance(x, str) else pid(d, x) for x in expected]
    assert d.encode(data).tolist() == want
    assert d.encode_reference(data).tolist() == want
    assert d.decode(want) == data


def test_ngrams_never_span_packets():
    d = PhraseDict([b"abc", b"bc"])
    assert [e.tolist() for e in d.encode_packets([b"a", b"bc", b"ab", b"c"])] == [
        [b("a")],
        [pid(d, b"bc")],
        [b("a"), b("b")],
        [b("c")],
    ]
    assert d.encode_flow([b"a", b"bc"], 16).tolist() == [CLS, b("a"), SEP, pid(d, b"bc"), EOS]


def test_long_packets_and_small_blocks_match_the_reference(fitted, monkeypatch):
    # Packets past _LOCKSTEP bytes take the pointer-doubling path; a small _ENCODE_CHUNK
    # splits a batch into blocks; _FEW_WALKS decides when walks finish in Python.
    rng = random.Random(1)
    packets = corpus(2, 50) + [
        b"".join(corpus(3, 200)),
        bytes(rng.choice(b"ab") for _ in range(3000)),
    ]
    for lockstep, chunk, few in ((256, 1 << 18, 16), (4, 100, 1), (1, 1 << 18, 10**9)):
        monkeypatch.setattr(phrases_mod, "_LOCKSTEP", lockstep)
        monkeypatch.setattr(phrases_mod, "_ENCODE_CHUNK", chunk)
        monkeypatch.setattr(phrases_mod, "_FEW_WALKS", few)
        for p, ids in zip(packets, fitted.encode_packets(packets), strict=True):
            assert ids.tolist() == fitted.encode_reference(p).tolist()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_round_trip_arbitrary_bytes(fitted, data):
    for d in (fitted, PhraseDict.bytes_only()):
        ids = d.encode(data)
        assert ids.dtype == np.int32
        assert d.decode(ids) == data
        assert ids.tolist() == d.encode_reference(data).tolist()


@settings(max_examples=100, deadline=None)
@given(packets=st.lists(st.binary(max_size=80) | st.sampled_from(corpus(4, 30)), max_size=20))
def test_batch_encoder_equals_reference(fitted, packets):
    out = fitted.encode_packets(packets)
    assert [e.tolist() for e in out] == [fitted.encode_reference(p).tolist() for p in packets]


# ---- flows ----------------------------------------------------------------------------------


def split_row(row: list[int]) -> list[list[int]]:
    assert row[0] == CLS and row[-1] == EOS
    segments: list[list[int]] = [[]]
    for t in row[1:-1]:
        assert t not in (PAD, CLS, EOS, MASK)
        if t == SEP:
            segments.append([])
        else:
            segments[-1].append(t)
    return segments


@settings(max_examples=200, deadline=None)
@given(
    flow=st.lists(st.binary(max_size=90) | st.sampled_from(corpus(5, 30)), max_size=12),
    max_len=st.integers(2, 80),
)
def test_flow_layout_and_fair_truncation(fitted, flow, max_len):
    row = fitted.encode_flow(flow, max_len).tolist()
    assert 2 <= len(row) <= max_len
    kept = min(len(flow), (max_len - 2) // 2)
    if kept == 0:
        assert row == [CLS, EOS]
        return
    segments = split_row(row)
    assert len(segments) == kept
    full = [fitted.encode(p).tolist() for p in flow[:kept]]
    for seg, enc in zip(segments, full, strict=True):
        assert seg == enc[: len(seg)]  # truncation cuts a packet's phrase list at the end
    cut = [len(s) < len(e) for s, e in zip(segments, full, strict=True)]
    if any(cut):
        assert len(row) == max_len  # nothing is wasted while a packet is cut
        # max-min fair: no packet holds more than one id over any cut packet's share
        share = [len(s) + (i < kept - 1) for i, s in enumerate(segments)]
        assert max(share) <= min(a for a, c in zip(share, cut, strict=True) if c) + 1
        # every kept packet is represented
        assert all(len(s) >= 1 for s, p in zip(segments, flow, strict=False) if p)
    else:
        assert fitted.decode(row) == b"".join(flow[:kept])
    padded = fitted.encode_flows([flow, flow], max_len)
    assert padded.shape == (2, max_len) and padded.dtype == np.int32
    assert padded[0, : len(row)].tolist() == row and not padded[:, len(row) :].any()


def test_fair_share_passes_unused_budget_to_other_packets():
    d = PhraseDict.bytes_only()
    long, short = b"x" * 100, b"ab"
    x = b("x")
    # budget 10 between CLS and EOS; a packet's SEP counts in its share
    # the short packet needs 2 of its share of 5; the long one gets the other 8 (7 + SEP)
    want = [CLS, *[x] * 7, SEP, b("a"), b("b"), EOS]
    assert d.encode_flow([long, short], 12).tolist() == want
    # unused share also goes forward: the short one uses 3 (with SEP), the long one 7
    want = [CLS, b("a"), b("b"), SEP, *[x] * 7, EOS]
    assert d.encode_flow([short, long], 12).tolist() == want
    # budget 9 over two long packets: 5 (4 + SEP) and 4, the odd id to the first
    assert d.encode_flow([long, long], 11).tolist() == [CLS, *[x] * 4, SEP, *[x] * 4, EOS]


def test_too_many_packets_keeps_the_first_ones():
    d = PhraseDict.bytes_only()
    row = d.encode_flow([b"a", b"b", b"c", b"d"], 6).tolist()  # budget 4: two packets
    assert row == [CLS, b("a"), SEP, b("b"), EOS]


def test_encode_flows_batch_edges(fitted):
    assert fitted.encode_flows([], 16).shape == (0, 16)
    out = fitted.encode_flows([[], [b""], [b"", b""]], 6)
    assert out.tolist() == [
        [CLS, EOS, PAD, PAD, PAD, PAD],
        [CLS, EOS, PAD, PAD, PAD, PAD],
        [CLS, SEP, EOS, PAD, PAD, PAD],
    ]
    assert fitted.encode_flow([b"abc"], 2).tolist() == [CLS, EOS]
    with pytest.raises(ValueError):
        fitted.encode_flows([[b"a"]], 1)


def test_decode_skips_special_ids_and_rejects_unknown_ones():
    d = PhraseDict([b"bc"])
    assert d.decode([CLS, b("a"), SEP, pid(d, b"bc"), MASK, PAD, EOS, 5, 7]) == b"abc"
    with pytest.raises(ValueError):
        d.decode([d.vocab_size])
    with pytest.raises(ValueError):
        d.decode([-1])


# ---- fitting ---------------------------------------------------------------------------------


def test_fit_counts_within_packets_only():
    # "qr" occurs 10 times, but only across packet boundaries; "xy" 5 times inside packets
    packets = [b"xy"] * 5 + [b"q", b"r"] * 10
    d = PhraseDict.fit(packets, 300)
    assert d.phrases == (b"xy",)
    assert d.size == 257  # fewer distinct phrases than asked for
    assert d.meta == {"requested_size": 300, "packets": 25, "bytes": 30}


def test_fit_orders_by_count_then_length_then_bytes():
    packets = [b"ab", b"ab", b"cd", b"cd", b"abc", b"ba"]
    # counts: ab 3, cd 2, then 1 each for bc, ba (2-phrases, byte order) and abc
    assert PhraseDict.fit(packets, 256 + 5).phrases == (b"ab", b"cd", b"ba", b"bc", b"abc")
    assert PhraseDict.fit(packets, 256 + 3).phrases == (b"ab", b"cd", b"ba")
    assert PhraseDict.fit(packets, 256).phrases == ()


def test_fit_is_deterministic_and_independent_of_order_and_chunking(monkeypatch):
    packets = corpus(6, 300)
    ref = PhraseDict.fit(packets, 600)
    assert len(ref.phrases) == 600 - 256
    assert PhraseDict.fit(list(packets), 600).sha256 == ref.sha256
    shuffled = packets[:]
    random.Random(7).shuffle(shuffled)
    assert PhraseDict.fit(iter(shuffled), 600).phrases == ref.phrases
    # many small chunks, counted both with unique() and with the 2^24-bin bincount
    monkeypatch.setattr(phrases_mod, "_FIT_CHUNK", 97)
    assert PhraseDict.fit(packets, 600).phrases == ref.phrases
    monkeypatch.setattr(phrases_mod, "_SMALL_COUNT", 0)
    assert PhraseDict.fit(packets, 600).phrases == ref.phrases


def test_fit_reports_progress(monkeypatch):
    monkeypatch.setattr(phrases_mod, "_PROGRESS_STEP", 100)
    packets = corpus(8, 100)
    seen: list[int] = []
    PhraseDict.fit(packets, 300, progress=seen.append)
    assert len(seen) > 5 and seen == sorted(seen)
    assert seen[-1] == sum(map(len, packets))


def test_fit_rejects_sizes_below_256():
    with pytest.raises(ValueError):
        PhraseDict.fit([b"abc"], 255)


def test_constructor_validates_phrases():
    for bad in ([b"a"], [b"abcd"], [b"ab", b"ab"]):
        with pytest.raises(PhraseDictError):
            PhraseDict(bad)


def test_coverage_counts_bytes_by_phrase_length():
    d = PhraseDict([b"ab", b"abc"])
    cov = d.coverage([b"abcab", b"x"])  # [abc, ab], [x]
    assert cov["bytes"] == 6 and cov["tokens"] == 3
    assert cov["tokens_per_byte"] == pytest.approx(0.5)
    assert (cov["share_1"], cov["share_2"], cov["share_3"]) == pytest.approx((1 / 6, 2 / 6, 3 / 6))


# ---- files and hashes -----------------------------------------------------------------------


def test_save_load_round_trip(fitted, tmp_path):
    path = tmp_path / "phrases.json"
    fitted.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "flagd-phrases" and doc["version"] == 1
    assert doc["size"] == fitted.size and doc["sha256"] == fitted.sha256
    loaded = PhraseDict.load(path)
    assert loaded.phrases == fitted.phrases and loaded.sha256 == fitted.sha256
    assert loaded.meta == fitted.meta
    data = b"".join(corpus(9, 20))
    assert loaded.encode(data).tolist() == fitted.encode(data).tolist()


def test_hash_depends_on_phrases_and_their_order():
    assert PhraseDict([b"ab", b"cd"]).sha256 != PhraseDict([b"cd", b"ab"]).sha256
    assert PhraseDict([b"ab"]).sha256 == PhraseDict([b"ab"], {"other": "meta"}).sha256
    assert PhraseDict.bytes_only().sha256 != PhraseDict([b"ab"]).sha256


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc["phrases"].__setitem__(0, "ffff"), "SHA-256 mismatch"),
        (lambda doc: doc["phrases"].reverse(), "SHA-256 mismatch"),
        (lambda doc: doc.__setitem__("version", 2), "unsupported version"),
        (lambda doc: doc.__setitem__("format", "other"), "not a flagd-phrases file"),
        (lambda doc: doc["phrases"].__setitem__(0, "zz"), "bad phrase"),
        (lambda doc: doc.__setitem__("size", 1), "size"),
    ],
)
def test_load_refuses_edited_files(fitted, tmp_path, edit, message):
    path = tmp_path / "phrases.json"
    fitted.save(path)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(PhraseDictError, match=message) as err:
        PhraseDict.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_refuses_damaged_or_missing_files(fitted, tmp_path):
    path = tmp_path / "phrases.json"
    fitted.save(path)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(PhraseDictError, match="phrases.json"):
        PhraseDict.load(path)
    with pytest.raises(PhraseDictError, match="missing.json"):
        PhraseDict.load(tmp_path / "missing.json")


def test_check_sha256_refuses_another_dictionary(fitted):
    fitted.check_sha256(fitted.sha256)
    with pytest.raises(PhraseDictError, match="trained"):
        PhraseDict.bytes_only().check_sha256(fitted.sha256, "model m1")


# ---- real flows -----------------------------------------------------------------------------


def real_packets(limit: int = 3000, cap: int = 128) -> list[bytes]:
    """IP packets from three ISCX classes: link layer stripped, addresses zeroed, capped."""
    from scapy.utils import RawPcapReader

    root = DATA / "iscx-vpn2016" / "train"
    files = [
        root / "chat" / "ethernet.pcap",
        root / "vpn-voip" / "raw.pcap",
        root / "streaming" / "ethernet.pcap",
    ]
    if not all(f.exists() for f in files):
        pytest.skip(f"ISCX VPN-nonVPN pcaps not found under {root} (set FLAGD_SHARED_DATA)")
    out = []
    for f in files:
        reader = RawPcapReader(str(f))
        for i, (frame, _) in enumerate(reader):
            if i == limit:
                break
            if reader.linktype == 1:
                if len(frame) < 14 or struct.unpack_from("!H", frame, 12)[0] != 0x0800:
                    continue
                frame = frame[14:]
            ip = bytearray(frame[:cap])
            if len(ip) >= 20 and ip[0] >> 4 == 4:
                ip[12:20] = bytes(8)
                out.append(bytes(ip))
        reader.close()
    return out


def test_real_flows_match_reference_and_round_trip():
    packets = real_packets()
    d = PhraseDict.fit(packets[::2], 4096)
    assert d.size == 4096
    held = packets[1::2]
    for p, ids in zip(held, d.encode_packets(held), strict=True):
        assert ids.tolist() == d.encode_reference(p).tolist()
        assert d.decode(ids) == p
    cov = d.coverage(held)
    assert cov["bytes"] == sum(map(len, held))
    assert cov["share_2"] + cov["share_3"] > 0.5  # phrases do cover real headers
    assert cov["share_1"] + cov["share_2"] + cov["share_3"] == pytest.approx(1)
    flows = [held[i : i + 5] for i in range(0, len(held), 5)]
    rows = d.encode_flows(flows, 128)
    for flow, row in zip(flows[:200], rows[:200], strict=True):
        assert row.tolist()[: len(d.encode_flow(flow, 128))] == d.encode_flow(flow, 128).tolist()
