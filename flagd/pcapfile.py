"""Capture files: pcap and pcapng read into `Frames` batches.

This is the only module that opens capture files. A file is mapped into memory once; a tight
loop walks the record (or block) headers with `struct.unpack_from` and only collects where each
record starts; the per-record fields are then gathered for the whole batch with numpy. Each
`Frames.data` is a zero-copy, read-only view of the mapped file, so reading costs one pass over the
headers and no copy of the packet bytes.

A capture that ends inside a record, or whose record headers turn corrupt, is not an exception:
the records before the problem are yielded and `CaptureFile.stats` says what happened. Only a
file that cannot be read as a capture at all raises `DecodeError`.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np

from flagd.frames import Frames
from flagd.packets import DecodeError

# A record claiming more than this is a corrupt header, not a big packet (libpcap's own limit).
MAX_CAPLEN = 262144

# pcap magic bytes as they appear in the file -> (byte order, timestamp divisor, record header size)
_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000, 16),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000, 16),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000, 16),
    # Kuznetzov's patched libpcap: 8 extra bytes (ifindex, protocol, pkt_type, pad) per record
    b"\x34\xcd\xb2\xa1": ("<", 1_000_000, 24),
    b"\xa1\xb2\xcd\x34": (">", 1_000_000, 24),
}

# pcapng block types
_SHB = 0x0A0D0D0A  # section header (a palindrome: reads the same in both byte orders)
_IDB = 0x00000001  # interface description
_PB = 0x00000002  # obsolete packet block
_SPB = 0x00000003  # simple packet block
_EPB = 0x00000006  # enhanced packet block
_BOM_LE = b"\x4d\x3c\x2b\x1a"
_BOM_BE = b"\x1a\x2b\x3c\x4d"

_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14


@dataclass(slots=True)
class ReadStats:
    """What reading one capture file produced, and why it stopped early if it did."""

    path: str
    format: str = ""  # "pcap" or "pcapng"
    records: int = 0  # records yielded
    bytes: int = 0  # captured bytes of those records
    skipped_blocks: int = 0  # pcapng blocks not needed (statistics, name resolution, custom...)
    truncated: bool = False  # reading stopped before the end of the file
    corrupt: bool = False  # ... because a record/block header was invalid (else: the file is cut)
    problem: str = ""  # one line saying what stopped the reading ("" when the file was complete)
    linktypes: set[int] = field(default_factory=set)  # link types seen in yielded records


@dataclass(slots=True)
class _Interface:
    """A pcapng interface: its link type and how to turn its timestamps into seconds."""

    linktype: int
    snaplen: int
    ts_decimal: bool = True  # resolution 10**-ts_exp (else 2**-ts_exp)
    ts_exp: int = 6
    ts_offset: int = 0  # seconds added to every timestamp (if_tsoffset)


class CaptureFile:
    """An open pcap or pcapng file; iterating yields `Frames` batches of at most `batch_size`.

    Opening validates the file header and raises `DecodeError` when the file is missing,
    unreadable, empty or not a capture. Problems further in end the iteration and are recorded in
    `stats` (`truncated`, `corrupt`, `problem`).
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 65536) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.path = str(path)
        self.batch_size = batch_size
        self.stats = ReadStats(self.path)
        self._buf = _load(self.path)
        self._released = 0  # mapped bytes before this offset were handed back (_release)
        head = bytes(self._buf[:4])
        if head in _PCAP_MAGIC:
            self.stats.format = "pcap"
            self._batches = self._pcap(head)
        elif head == b"\x0a\x0d\x0d\x0a":
            self.stats.format = "pcapng"
            self._batches = self._pcapng()
        else:
            magic = int.from_bytes(head.ljust(4, b"\0"), "big")
            raise DecodeError(f"{self.path}: not a pcap or pcapng file (magic 0x{magic:08x})")
        # Generators run nothing until the first next(): prime the header checks now so that a
        # bad file header raises here, not in the middle of the caller's loop.
        self._first: Frames | None = next(self._batches, None)

    def __iter__(self) -> CaptureFile:
        return self

    def __enter__(self) -> CaptureFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading. The mapping itself goes when the last Frames viewing it is gone."""
        self._batches.close()
        self._first = None

    def __next__(self) -> Frames:
        if self._first is not None:
            frames, self._first = self._first, None
        else:
            frames = next(self._batches)
        self._release(frames)
        return frames

    def _release(self, frames: Frames) -> None:
        """Unmap the pages before this batch from our resident set (MADV_DONTNEED).

        Without it every page of the file stays resident once read, so replaying a 10 GB
        capture shows 10 GB RSS. A caller still holding an older batch loses nothing: its pages
        are read back from the page cache on the next touch.
        """
        mm = getattr(self._buf.base, "obj", None)
        if not isinstance(mm, mmap.mmap) or not len(frames):
            return
        start = frames.data.ctypes.data - self._buf.ctypes.data
        upto = start - start % mmap.PAGESIZE
        if upto > self._released:
            try:
                mm.madvise(mmap.MADV_DONTNEED, self._released, upto - self._released)
            except (OSError, ValueError):  # advice only: never a reason to stop reading
                return
            self._released = upto

    # -- problems -------------------------------------------------------------------------

    def _stop(self, corrupt: bool, why: str, pos: int) -> None:
        self.stats.truncated = True
        self.stats.corrupt = corrupt
        self.stats.problem = f"{self.path}: {why} at byte {pos}"

    def _emit(self, frames: Frames) -> Frames:
        self.stats.records += len(frames)
        self.stats.bytes += int(frames.caplen.sum())
        self.stats.linktypes.update(np.unique(frames.linktype).tolist())
        return frames

    # -- pcap -----------------------------------------------------------------------------

    def _pcap(self, head: bytes) -> Generator[Frames, None, None]:
        buf = self._buf
        end = len(buf)
        order, divisor, hdr = _PCAP_MAGIC[head]
        if end < 24:
            raise DecodeError(f"{self.path}: pcap file header cut short ({end} of 24 bytes)")
        # The top 6 bits of the link type field carry FCS information, not the link type.
        linktype = struct.unpack_from(order + "I", buf, 20)[0] & 0x03FFFFFF
        u32 = struct.Struct(order + "I").unpack_from
        mv = memoryview(buf)  # unpack_from is fastest on a buffer object, not on ndarray items
        pos = 24
        while pos < end:
            starts: list[int] = []
            append = starts.append
            for _ in range(self.batch_size):
                if pos + hdr > end:
                    self._stop(False, f"file ends inside a record header ({end - pos} bytes)", pos)
                    break
                caplen = u32(mv, pos + 8)[0]
                if caplen > MAX_CAPLEN:
                    self._stop(True, f"corrupt record header (caplen {caplen})", pos)
                    break
                nxt = pos + hdr + caplen
                if nxt > end:
                    self._stop(False, f"file ends inside a record (caplen {caplen})", pos)
                    break
                append(pos)
                pos = nxt
                if pos == end:
                    break
            if starts:
                p = np.array(starts, np.int64)
                fields = _gather(buf, p, 16).view(order + "u4")  # (n, 4): sec, frac, caplen, len
                caplen = fields[:, 2].astype(np.int32)
                wirelen = fields[:, 3]
                # A negative (>= 2**31) wire length is a corrupt header; keep what came before.
                bad = np.flatnonzero(wirelen > 0x7FFFFFFF)
                if len(bad):
                    k = int(bad[0])
                    self._stop(True, f"corrupt record header (len {int(wirelen[k])})", starts[k])
                    p, fields, caplen, wirelen = p[:k], fields[:k], caplen[:k], wirelen[:k]
                if len(p):
                    ts = fields[:, 0].astype(np.float64) + fields[:, 1].astype(np.float64) / divisor
                    yield self._emit(
                        _frames(
                            buf, p + hdr, caplen, wirelen, ts, np.full(len(p), linktype, np.int32)
                        )
                    )
            if self.stats.truncated:
                return

    # -- pcapng ---------------------------------------------------------------------------

    def _pcapng(self) -> Generator[Frames, None, None]:
        buf = self._buf
        end = len(buf)
        mv = memoryview(buf)
        if end < 28:
            raise DecodeError(f"{self.path}: pcapng section header cut short ({end} bytes)")
        order = self._section_order(mv, 0)
        if order is None:
            bom = bytes(buf[8:12]).hex()
            raise DecodeError(
                f"{self.path}: pcapng section header has a bad byte-order magic 0x{bom}"
            )
        interfaces: list[_Interface] = []
        last_ts = 0.0  # simple packet blocks carry no timestamp: they inherit the previous one
        pos = 0
        two = struct.Struct(order + "II").unpack_from
        one = struct.Struct(order + "I").unpack_from
        while pos < end and not self.stats.truncated:
            starts: list[int] = []
            append = starts.append
            while len(starts) < self.batch_size:
                if pos + 12 > end:
                    if pos < end:
                        self._stop(
                            False, f"file ends inside a block header ({end - pos} bytes)", pos
                        )
                    break
                btype, blen = two(mv, pos)
                if btype == _SHB:
                    # A new section may switch byte order and always forgets the interfaces,
                    # so records collected so far go out first as their own batch.
                    if starts:
                        break
                    new = self._section_order(mv, pos)
                    if new is None:
                        self._stop(True, "corrupt section header (bad byte-order magic)", pos)
                        break
                    order = new
                    two = struct.Struct(order + "II").unpack_from
                    one = struct.Struct(order + "I").unpack_from
                    btype, blen = two(mv, pos)
                    if blen < 28:
                        self._stop(True, f"corrupt section header (block length {blen})", pos)
                        break
                if blen < 12 or blen & 3:
                    self._stop(True, f"corrupt block header (type 0x{btype:x}, length {blen})", pos)
                    break
                nxt = pos + blen
                if nxt > end:
                    self._stop(
                        False, f"file ends inside a block (type 0x{btype:x}, length {blen})", pos
                    )
                    break
                if one(mv, nxt - 4)[0] != blen:
                    self._stop(
                        True, f"corrupt block (type 0x{btype:x}, trailing length differs)", pos
                    )
                    break
                if btype == _EPB or btype == _SPB or btype == _PB:
                    append(pos)
                elif btype == _SHB:
                    interfaces = []
                elif btype == _IDB:
                    if starts:
                        break  # the interface table changes: close this batch first
                    iface = self._interface(mv, pos, blen, order)
                    if iface is None:
                        self._stop(True, f"corrupt interface description (length {blen})", pos)
                        break
                    interfaces.append(iface)
                else:
                    self.stats.skipped_blocks += 1
                pos = nxt
            if starts:
                frames = self._packet_blocks(np.array(starts, np.int64), order, interfaces, last_ts)
                if len(frames):
                    last_ts = float(frames.ts[-1])
                    yield self._emit(frames)
                if self.stats.truncated:
                    # _packet_blocks found a bad record: the blocks after it are not trusted.
                    return

    @staticmethod
    def _section_order(mv: memoryview, pos: int) -> str | None:
        if pos + 12 > len(mv):
            return None
        bom = bytes(mv[pos + 8 : pos + 12])
        return "<" if bom == _BOM_LE else ">" if bom == _BOM_BE else None

    @staticmethod
    def _interface(mv: memoryview, pos: int, blen: int, order: str) -> _Interface | None:
        if blen < 20:
            return None
        linktype, _, snaplen = struct.unpack_from(order + "HHI", mv, pos + 8)
        iface = _Interface(linktype, snaplen)
        opt, opt_end = pos + 16, pos + blen - 4
        # Options: code, length, value padded to 4 bytes; an option that runs past the block
        # ends the option list (wireshark does the same) rather than the whole file.
        while opt + 4 <= opt_end:
            code, olen = struct.unpack_from(order + "HH", mv, opt)
            if code == 0 or opt + 4 + olen > opt_end:
                break
            if code == _OPT_IF_TSRESOL and olen >= 1:
                res = mv[opt + 4]
                iface.ts_decimal = not res & 0x80
                iface.ts_exp = res & 0x7F
            elif code == _OPT_IF_TSOFFSET and olen >= 8:
                iface.ts_offset = struct.unpack_from(order + "q", mv, opt + 4)[0]
            opt += 4 + ((olen + 3) & ~3)
        return iface

    def _packet_blocks(
        self, p: np.ndarray, order: str, interfaces: list[_Interface], last_ts: float
    ) -> Frames:
        """Frames from the EPB/SPB/PB blocks starting at `p` (all in one section, one byte order)."""
        buf = self._buf
        u4 = order + "u4"
        head = _gather(buf, p, 28).view(u4)  # (n, 7): type, blen, then block-specific words
        btype, blen = head[:, 0], head[:, 1].astype(np.int64)
        spb = btype == _SPB
        pb = btype == _PB
        # EPB: if_id, ts_hi, ts_lo, caplen, len. PB: the same with a 16-bit if_id + drop count.
        ifid = head[:, 2].astype(np.int64)
        if pb.any():
            ifid[pb] = _gather(buf, p[pb] + 8, 2).view(order + "u2")[:, 0]
        ifid[spb] = 0
        caplen = head[:, 5].astype(np.int64)
        wirelen = head[:, 6].astype(np.int64)
        data_off = p + 28
        if spb.any():
            # SPB: only the wire length; the captured part is what fits in the block and the
            # snaplen of interface 0.
            wirelen[spb] = head[spb, 2]
            room = blen[spb] - 16
            snap = interfaces[0].snaplen if interfaces and interfaces[0].snaplen else MAX_CAPLEN
            caplen[spb] = np.minimum(np.minimum(wirelen[spb], room), snap)
            data_off[spb] = p[spb] + 12
        # Each check names the first bad block; records before it are kept.
        checks = (
            (ifid >= len(interfaces), "packet block for an undeclared interface"),
            (blen < np.where(spb, 16, 32), "packet block too short"),
            (caplen > MAX_CAPLEN, "corrupt packet block (caplen above 256 KiB)"),
            (~spb & (caplen > blen - 32), "corrupt packet block (caplen beyond the block)"),
            (wirelen > 0x7FFFFFFF, "corrupt packet block (negative len)"),
        )
        n = len(p)
        for bad, why in checks:
            hit = np.flatnonzero(bad[:n])
            if len(hit):
                k = int(hit[0])
                self._stop(True, why, int(p[k]))
                n = k
        if n < len(p):
            p, spb, ifid, caplen, wirelen, data_off, head = (
                a[:n] for a in (p, spb, ifid, caplen, wirelen, data_off, head)
            )
        if n == 0:
            return Frames.empty()
        ts = np.empty(n, np.float64)
        ts64 = (head[:, 3].astype(np.uint64) << np.uint64(32)) | head[:, 4].astype(np.uint64)
        for i in np.unique(ifid[~spb]).tolist():
            sel = (ifid == i) & ~spb
            ts[sel] = _seconds(ts64[sel], interfaces[i])
        if spb.any():
            # forward-fill the previous timestamp into simple packet blocks
            idx = np.where(spb, -1, np.arange(n))
            np.maximum.accumulate(idx, out=idx)
            ts = np.where(idx >= 0, ts[np.maximum(idx, 0)], last_ts)
        linktypes = np.array([f.linktype for f in interfaces], np.int32)[ifid]
        return _frames(buf, data_off, caplen, wirelen, ts, linktypes)


def read_capture(path: str | os.PathLike[str], batch_size: int = 65536) -> CaptureFile:
    """Open a pcap/pcapng file and return an iterator of `Frames` batches (see `CaptureFile`).

    Raises `DecodeError` (one line, naming the file) when the file cannot be read as a capture.
    """
    return CaptureFile(path, batch_size)


def _load(path: str) -> np.ndarray:
    """The whole file as a read-only uint8 array (memory-mapped when it is a regular file)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode):
                if st.st_size == 0:
                    raise DecodeError(f"{path}: empty file")
                return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
            raw = f.read()  # a pipe or a device: no mapping, read it all
    except DecodeError:
        raise
    except IsADirectoryError:
        raise DecodeError(f"{path}: is a directory, not a capture file") from None
    except FileNotFoundError:
        raise DecodeError(f"{path}: no such file") from None
    except PermissionError:
        raise DecodeError(f"{path}: permission denied") from None
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise DecodeError(f"{path}: cannot read ({why})") from None
    if not raw:
        raise DecodeError(f"{path}: empty file")
    return np.frombuffer(raw, np.uint8)


def _gather(buf: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """The `width` bytes at each position, as a C-contiguous (n, width) uint8 array.

    Positions past the end of `buf` read its last byte; callers check lengths before trusting
    those bytes (a 16-byte simple packet block at the end of a file is shorter than the window).
    """
    return buf.take(pos[:, None] + np.arange(width), mode="clip")


def _seconds(ts64: np.ndarray, iface: _Interface) -> np.ndarray:
    """pcapng 64-bit timestamps of one interface in float seconds since the epoch."""
    if iface.ts_decimal and iface.ts_exp <= 19:
        # Integer split first: a float64 of nanoseconds since 1970 would lose the sub-microsecond part.
        unit = np.uint64(10**iface.ts_exp)
        sec = ts64 // unit
        frac = (ts64 - sec * unit).astype(np.float64) / float(unit)
        out = sec.astype(np.float64) + frac
    elif iface.ts_decimal:
        out = ts64.astype(np.float64) * 10.0**-iface.ts_exp
    else:
        out = np.ldexp(ts64.astype(np.float64), -iface.ts_exp)
    return out + iface.ts_offset if iface.ts_offset else out


def _frames(
    buf: np.ndarray,
    data_off: np.ndarray,
    caplen: np.ndarray,
    wirelen: np.ndarray,
    ts: np.ndarray,
    linktype: np.ndarray,
) -> Frames:
    """A Frames batch viewing `buf` from the first record to the end of the last one."""
    caplen = caplen.astype(np.int32)
    lo = int(data_off.min())
    hi = int((data_off + caplen).max())
    return Frames(
        data=buf[lo:hi],
        offset=(data_off - lo).astype(np.int64),
        caplen=caplen,
        # Some writers store len < caplen; the Frames contract says wirelen >= caplen.
        wirelen=np.maximum(wirelen.astype(np.int64), caplen).astype(np.int32),
        ts=ts,
        linktype=linktype.astype(np.int32),
    )
