"""read_capture(): pcap and pcapng variants, cut and corrupt files, files that are not captures,
and every nDPI test capture replayed through read_capture + decode."""

from __future__ import annotations

import collections
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagd.frames import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_RAW,
    Frames,
)
from flagd.packets import DecodeError, Skip, decode
from flagd.pcapfile import MAX_CAPLEN, CaptureFile, read_capture
from tests import crafted
from tests.crafted import Interface, Record

SHARED = Path(
    os.environ.get("FLAGD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
NDPI = SHARED / "ndpi" / "pcap"


def records(n: int = 7) -> list[Record]:
    """Different lengths, one record cut by a snaplen (wirelen > caplen), sub-microsecond times."""
    out = []
    for i, case in enumerate(crafted.cases()[:n]):
        wirelen = len(case.frame) + 100 if i == 2 else None
        out.append(Record(1_700_000_000 + i * 1.25 + 0.000123, case.frame, wirelen))
    return out


def read_all(path: Path, batch_size: int = 65536) -> tuple[list[tuple], CaptureFile]:
    """(ts, bytes, wirelen, linktype) of every record, and the reader (for its stats)."""
    cap = read_capture(path, batch_size)
    out = []
    for fr in cap:
        assert_consistent(fr)
        for i in range(len(fr)):
            o = int(fr.offset[i])
            data = bytes(fr.data[o : o + fr.caplen[i]])
            out.append((float(fr.ts[i]), data, int(fr.wirelen[i]), int(fr.linktype[i])))
    return out, cap


def assert_consistent(fr: Frames) -> None:
    n = len(fr)
    for name in ("offset", "caplen", "wirelen", "ts", "linktype"):
        assert len(getattr(fr, name)) == n
    assert fr.data.dtype == np.uint8 and fr.offset.dtype == np.int64
    assert fr.caplen.dtype == np.int32 and fr.wirelen.dtype == np.int32
    assert fr.ts.dtype == np.float64 and fr.linktype.dtype == np.int32
    assert (fr.offset >= 0).all() and (fr.offset + fr.caplen <= len(fr.data)).all()
    assert (fr.caplen >= 0).all() and (fr.caplen <= MAX_CAPLEN).all()
    assert (fr.wirelen >= fr.caplen).all()


def assert_same(got: list[tuple], want: list[Record], linktypes: list[int], tol: float) -> None:
    assert len(got) == len(want)
    for (ts, data, wirelen, lt), r, wlt in zip(got, want, linktypes, strict=True):
        assert data == r.data
        assert wirelen == (len(r.data) if r.wirelen is None else r.wirelen)
        assert lt == wlt
        assert ts == pytest.approx(r.ts, abs=tol)


# -- pcap -------------------------------------------------------------------------------------


@pytest.mark.parametrize("big_endian", [False, True], ids=["le", "be"])
@pytest.mark.parametrize("nanos", [False, True], ids=["us", "ns"])
def test_pcap_variants(tmp_path: Path, big_endian: bool, nanos: bool) -> None:
    recs = records()
    path = crafted.write_pcap(tmp_path / "x.pcap", recs, LINKTYPE_ETHERNET,
                              big_endian=big_endian, nanos=nanos)  # fmt: skip
    got, cap = read_all(path)
    # float64 seconds near 1.7e9 resolve ~0.24 us, so nanoseconds are checked to that
    assert_same(got, recs, [LINKTYPE_ETHERNET] * len(recs), tol=1e-6)
    assert cap.stats.format == "pcap" and not cap.stats.truncated and cap.stats.problem == ""
    assert cap.stats.records == len(recs)
    assert cap.stats.bytes == sum(len(r.data) for r in recs)
    assert cap.stats.linktypes == {LINKTYPE_ETHERNET}


def test_pcap_fcs_bits_in_the_link_type_are_ignored(tmp_path: Path) -> None:
    data = bytearray(crafted.pcap_bytes(records(2), LINKTYPE_ETHERNET))
    data[20:24] = struct.pack("<I", LINKTYPE_ETHERNET | 0x14000000)  # FCS of 4 bytes present
    (tmp_path / "f.pcap").write_bytes(data)
    got, _ = read_all(tmp_path / "f.pcap")
    assert {g[3] for g in got} == {LINKTYPE_ETHERNET}


def test_kuznetzov_pcap(tmp_path: Path) -> None:
    """The patched-libpcap format: 24-byte record headers."""
    frame = crafted.cases()[0].frame
    head = struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 1)
    rec = struct.pack("<IIII", 5, 6, len(frame), len(frame)) + bytes(8) + frame
    (tmp_path / "k.pcap").write_bytes(head + rec * 3)
    got, cap = read_all(tmp_path / "k.pcap")
    assert [g[1] for g in got] == [frame] * 3 and not cap.stats.truncated


@pytest.mark.parametrize("batch_size", [1, 2, 3, 100])
def test_batches_cover_every_record_once(tmp_path: Path, batch_size: int) -> None:
    recs = records()
    path = crafted.write_pcap(tmp_path / "b.pcap", recs, LINKTYPE_ETHERNET)
    sizes = [len(fr) for fr in read_capture(path, batch_size)]
    assert sum(sizes) == len(recs) and max(sizes) <= batch_size
    got, _ = read_all(path, batch_size)
    assert_same(got, recs, [LINKTYPE_ETHERNET] * len(recs), tol=1e-6)


def test_header_only_pcap_has_no_records(tmp_path: Path) -> None:
    path = crafted.write_pcap(tmp_path / "h.pcap", [], LINKTYPE_RAW)
    got, cap = read_all(path)
    assert got == [] and not cap.stats.truncated


def test_frames_are_read_only_views_of_the_file(tmp_path: Path) -> None:
    path = crafted.write_pcap(tmp_path / "v.pcap", records(), LINKTYPE_ETHERNET)
    fr = next(read_capture(path))
    assert not fr.data.flags.writeable


# -- pcapng -----------------------------------------------------------------------------------

IFACES = [
    Interface(LINKTYPE_ETHERNET),  # no if_tsresol: microseconds
    Interface(LINKTYPE_RAW, tsresol=9),  # nanoseconds
    Interface(LINKTYPE_LINUX_SLL, tsresol=0x80 | 20, tsoffset=1_000_000),  # 2**-20 s, offset
]


def ng_records() -> list[Record]:
    """Records over the three interfaces, with frames that suit each link type."""
    eth = [c for c in crafted.cases() if c.linktype == LINKTYPE_ETHERNET][:3]
    raw = [c for c in crafted.cases() if c.linktype == LINKTYPE_RAW][:2]
    sll = [c for c in crafted.cases() if c.linktype == LINKTYPE_LINUX_SLL][:2]
    out = []
    for i, (itf, case) in enumerate([(0, eth[0]), (1, raw[0]), (2, sll[0]), (0, eth[1]),
                                     (2, sll[1]), (1, raw[1]), (0, eth[2])]):  # fmt: skip
        out.append(Record(1_700_000_000 + i * 0.5 + 0.25, case.frame, None, itf))
    return out


@pytest.mark.parametrize("big_endian", [False, True], ids=["le", "be"])
@pytest.mark.parametrize("block", ["epb", "pb"])
def test_pcapng_interfaces_and_resolutions(tmp_path: Path, big_endian: bool, block: str) -> None:
    recs = ng_records()
    path = crafted.write_pcapng(tmp_path / "x.pcapng", IFACES, recs, big_endian=big_endian,
                                block=block, extra_blocks=True)  # fmt: skip
    got, cap = read_all(path)
    linktypes = [IFACES[r.interface].linktype for r in recs]
    assert_same(got, recs, linktypes, tol=2e-6)  # 2**-20 s resolution on interface 2
    assert cap.stats.format == "pcapng" and not cap.stats.truncated
    assert cap.stats.skipped_blocks == 3  # name resolution, custom, interface statistics
    assert cap.stats.linktypes == {LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL}
    p = [decode(fr) for fr in read_capture(path)]
    assert all((x.skip == Skip.OK).all() for x in p)


def test_pcapng_simple_packet_blocks(tmp_path: Path) -> None:
    frames = [r.data + b"x" * 40 for r in records(4)] + [b"short"]
    # an SPB's captured length is the smaller of the wire length and interface 0's snaplen
    recs = [Record(0.0, f[:60], len(f)) for f in frames]
    snap = Interface(LINKTYPE_ETHERNET, snaplen=60)
    path = crafted.write_pcapng(tmp_path / "s.pcapng", [snap], recs, block="spb")
    got, cap = read_all(path)
    assert [g[1] for g in got] == [f[:60] for f in frames]
    assert [g[2] for g in got] == [len(f) for f in frames]
    assert not cap.stats.truncated


def test_pcapng_simple_blocks_inherit_the_last_timestamp(tmp_path: Path) -> None:
    frame = crafted.cases()[0].frame
    itf = [Interface(LINKTYPE_ETHERNET)]
    data = (crafted.pcapng_section(itf, [Record(1000.5, frame)])
            + crafted.pcapng_block(3, struct.pack("<I", len(frame)) + frame))  # fmt: skip
    (tmp_path / "m.pcapng").write_bytes(data)
    got, _ = read_all(tmp_path / "m.pcapng")
    assert [g[0] for g in got] == [1000.5, 1000.5]


def test_pcapng_sections_switch_byte_order_and_interfaces(tmp_path: Path) -> None:
    a = [Record(10.0, crafted.cases()[0].frame)]
    raw = bytes(crafted.udp4())
    b = [Record(20.0, raw), Record(21.0, raw)]
    data = (crafted.pcapng_section([Interface(LINKTYPE_ETHERNET)], a)
            + crafted.pcapng_section([Interface(LINKTYPE_IPV4)], b, big_endian=True))  # fmt: skip
    (tmp_path / "two.pcapng").write_bytes(data)
    got, cap = read_all(tmp_path / "two.pcapng")
    assert [(g[0], g[3]) for g in got] == [(10.0, 1), (20.0, 228), (21.0, 228)]
    assert not cap.stats.truncated


# -- cut and corrupt files --------------------------------------------------------------------


def test_pcap_cut_inside_the_last_record(tmp_path: Path) -> None:
    recs = records()
    data = crafted.pcap_bytes(recs, LINKTYPE_ETHERNET)
    for cut, where in ((len(data) - 5, "inside a record"), (len(data) - len(recs[-1].data) - 6,
                                                             "inside a record header")):  # fmt: skip
        (tmp_path / "cut.pcap").write_bytes(data[:cut])
        got, cap = read_all(tmp_path / "cut.pcap")
        assert_same(got, recs[:-1], [1] * (len(recs) - 1), tol=1e-6)
        s = cap.stats
        assert s.truncated and not s.corrupt and where in s.problem and "cut.pcap" in s.problem
        assert s.records == len(recs) - 1


def test_pcapng_cut_inside_the_last_block(tmp_path: Path) -> None:
    recs = ng_records()
    data = crafted.pcapng_section(IFACES, recs)
    (tmp_path / "cut.pcapng").write_bytes(data[:-7])
    got, cap = read_all(tmp_path / "cut.pcapng")
    assert len(got) == len(recs) - 1
    assert (
        cap.stats.truncated and not cap.stats.corrupt and "ends inside a block" in cap.stats.problem
    )


def _pcap_with_bad_third_record(tmp_path: Path, caplen: int, wirelen: int) -> Path:
    recs = records(5)
    head = crafted.pcap_bytes(recs[:2], LINKTYPE_ETHERNET)
    bad = struct.pack("<IIII", 1, 0, caplen, wirelen) + bytes(64)
    tail = crafted.pcap_bytes(recs[2:], LINKTYPE_ETHERNET)[24:]
    path = tmp_path / "bad.pcap"
    path.write_bytes(head + bad + tail)
    return path


@pytest.mark.parametrize(("caplen", "wirelen"), [(MAX_CAPLEN + 1, 70000), (0xFFFFFFFF, 64),
                                                 (64, 0xFFFFFFF0)])  # fmt: skip
def test_pcap_corrupt_record_header_keeps_the_records_before(
    tmp_path: Path, caplen: int, wirelen: int
) -> None:
    got, cap = read_all(_pcap_with_bad_third_record(tmp_path, caplen, wirelen))
    assert len(got) == 2
    s = cap.stats
    assert s.truncated and s.corrupt and "corrupt record header" in s.problem and s.records == 2


def test_corrupt_header_in_a_later_batch(tmp_path: Path) -> None:
    path = _pcap_with_bad_third_record(tmp_path, MAX_CAPLEN + 1, 1)
    got, cap = read_all(path, batch_size=1)
    assert len(got) == 2 and cap.stats.corrupt


def _ng_with_bad_block(tmp_path: Path, block: bytes) -> Path:
    recs = ng_records()
    path = tmp_path / "bad.pcapng"
    path.write_bytes(crafted.pcapng_section(IFACES, recs[:3]) + block
                     + crafted.pcapng_section(IFACES, recs[3:])[28:])  # fmt: skip
    return path


def epb(
    ifid: int, caplen: int, body: bytes, blen: int | None = None, trail: int | None = None
) -> bytes:
    body = struct.pack("<IIIII", ifid, 0, 0, caplen, caplen) + body
    n = 12 + len(body) if blen is None else blen
    return struct.pack("<II", 6, n) + body + struct.pack("<I", n if trail is None else trail)


@pytest.mark.parametrize(
    ("block", "why"),
    [
        (epb(0, 8, bytes(8), blen=42), "corrupt block header"),  # not a multiple of 4
        (struct.pack("<II", 6, 8) + bytes(8), "corrupt block header"),  # shorter than 12
        (epb(0, 8, bytes(8), trail=999), "trailing length differs"),
        (epb(0, 400, bytes(8)), "caplen beyond the block"),
        (epb(0, MAX_CAPLEN + 4, bytes(8)), "caplen above 256 KiB"),
        (epb(7, 8, bytes(8)), "undeclared interface"),
        (crafted.pcapng_block(3, b""), "packet block too short"),  # SPB without its length
        (crafted.pcapng_block(6, bytes(8)), "packet block too short"),
        (crafted.pcapng_block(1, bytes(4)), "corrupt interface description"),
        (
            struct.pack("<I", 0x0A0D0D0A) + struct.pack("<I", 28) + b"XXXX" + bytes(16),
            "bad byte-order magic",
        ),  # fmt: skip
    ],
)
def test_pcapng_corrupt_block_keeps_the_records_before(
    tmp_path: Path, block: bytes, why: str
) -> None:
    got, cap = read_all(_ng_with_bad_block(tmp_path, block))
    assert len(got) == 3
    assert cap.stats.truncated and cap.stats.corrupt and why in cap.stats.problem


# -- not a capture ----------------------------------------------------------------------------


def test_not_a_capture(tmp_path: Path) -> None:
    path = tmp_path / "capture.pcap"
    path.write_bytes(b"\x12\x34\xab\xcdthis is not a capture")
    with pytest.raises(
        DecodeError, match=r"capture\.pcap: not a pcap or pcapng file \(magic 0x1234abcd\)"
    ):
        read_capture(path)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "is a directory"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: (p.write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(10)), p)[1], "pcap file header cut"),
        (lambda p: (p.write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(4)), p)[1], "section header cut"),
        (lambda p: (p.write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(30)), p)[1], "bad byte-order magic"),
        (lambda p: (p.write_bytes(b"ab"), p)[1], "not a pcap or pcapng file (magic 0x61620000)"),
    ],
)
def test_unreadable_files_raise_one_line(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path / "thing.pcap")
    with pytest.raises(DecodeError) as err:
        read_capture(path)
    msg = str(err.value)
    assert "thing.pcap" in msg and reason in msg and "\n" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path: Path) -> None:
    path = crafted.write_pcap(tmp_path / "secret.pcap", records(1), LINKTYPE_ETHERNET)
    path.chmod(0)
    with pytest.raises(DecodeError, match="secret.pcap: permission denied"):
        read_capture(path)


# -- property tests ---------------------------------------------------------------------------

MAGICS = [b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\x0a\x0d\x0d\x0a",
          b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x4d\x3c\x2b\x1a", b""]  # fmt: skip


def replay(path: Path, batch_size: int = 4) -> None:
    """read + decode a whole file; only DecodeError may come out."""
    try:
        cap = read_capture(path, batch_size)
    except DecodeError as e:
        assert str(path) in str(e)
        return
    for fr in cap:
        assert_consistent(fr)
        decode(fr)
    assert cap.stats.truncated == bool(cap.stats.problem)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MAGICS), st.binary(max_size=300))
def test_arbitrary_files_only_raise_decode_error(
    tmp_path_factory, magic: bytes, tail: bytes
) -> None:
    path = tmp_path_factory.getbasetemp() / "arbitrary.cap"
    path.write_bytes(magic + tail)
    replay(path)


_VALID = {
    "pcap": crafted.pcap_bytes(records(), LINKTYPE_ETHERNET),
    "pcap_be_ns": crafted.pcap_bytes(records(), LINKTYPE_ETHERNET, big_endian=True, nanos=True),
    "pcapng": crafted.pcapng_section(IFACES, ng_records(), extra_blocks=True),
    "pcapng_be_pb": crafted.pcapng_section(IFACES, ng_records(), big_endian=True, block="pb"),
    "pcapng_spb": crafted.pcapng_section(IFACES[:1], records(), block="spb"),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_VALID)), st.data())
def test_mutated_files_only_raise_decode_error(tmp_path_factory, name: str, data) -> None:
    blob = bytearray(_VALID[name])
    for _ in range(data.draw(st.integers(0, 6))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = tmp_path_factory.getbasetemp() / "mutated.cap"
    path.write_bytes(bytes(blob))
    replay(path)


# -- the nDPI captures ------------------------------------------------------------------------


@pytest.mark.skipif(not NDPI.is_dir(), reason=f"nDPI captures not found at {NDPI}")
def test_every_ndpi_capture_replays() -> None:
    """All 543 nDPI test captures (fuzzed ones included) read and decode; only DecodeError may
    be raised. The counts printed here are in the report (pytest -s)."""
    files = sorted(p for p in NDPI.iterdir() if p.is_file())
    assert len(files) >= 500
    errors: dict[str, str] = {}
    problems: dict[str, str] = {}
    skips: collections.Counter[str] = collections.Counter()
    n = 0
    for path in files:
        try:
            cap = read_capture(path)
            for fr in cap:
                assert_consistent(fr)
                p = decode(fr)
                n += len(p)
                skips.update(Skip(int(s)).name for s in p.skip)
        except DecodeError as e:
            errors[path.name] = str(e)
            continue
        if cap.stats.problem:
            problems[path.name] = cap.stats.problem
    print(f"\n{len(files)} files, {n} records, skips {dict(skips)}")
    print(f"{len(errors)} raised DecodeError: {errors}")
    print(f"{len(problems)} stopped early: {problems}")
    assert n > 100_000 and skips["OK"] > 0.9 * n
    # the fuzzed files with a corrupt first record open, yield nothing and say why
    for name in ("fuzz-2021-10-13.pcap", "fuzz-2021-06-07-c6c72a0a56.pcap"):
        if name in problems:
            assert "corrupt record header" in problems[name]


@pytest.mark.skipif(not NDPI.is_dir(), reason=f"nDPI captures not found at {NDPI}")
def test_ndpi_records_match_scapys_reader() -> None:
    """Record bytes, wire lengths and timestamps equal scapy's raw reader on a spread of files."""
    from scapy.utils import RawPcapNgReader, RawPcapReader

    files = sorted(p for p in NDPI.iterdir() if p.is_file() and not p.name.startswith("fuzz"))[::15]
    for path in files:
        got, _ = read_all(path)
        with RawPcapReader(str(path)) as reader:
            theirs = list(reader)
        assert len(got) == len(theirs), path.name
        for mine, (data, meta) in zip(got, theirs, strict=True):
            assert mine[1] == data
            if isinstance(reader, RawPcapNgReader):
                ts = ((meta.tshigh << 32) | meta.tslow) / meta.tsresol
            else:
                ts = meta.sec + meta.usec / (1e9 if reader.nano else 1e6)
                assert mine[2] == max(meta.wirelen, len(data))
            assert mine[0] == pytest.approx(ts, abs=1e-6), path.name
