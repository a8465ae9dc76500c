"""N-phrase extraction (FLAG paper, section 3.2): the phrase dictionary and greedy phrase encoding.

This is FLAG's tokenizer. A `PhraseDict` holds all 256 single bytes plus the most frequent byte
2- and 3-grams ("phrases") of unlabeled flows. Encoding follows Algorithm 1: left to right, take
the 3-phrase starting here if the dictionary has it, else the 2-phrase, else the single byte.
Unlike the paper's pseudo-code, which stops two bytes early, every byte is covered, so
`decode(encode(b)) == b` for any bytes. N-grams never span a packet boundary.

Token ids: the special tokens below, then the 256 single bytes (id = NUM_SPECIAL + byte value),
then the 2-/3-phrases in dictionary order (descending frequency; ties: 2-phrases first, then
byte order). A flow is `[CLS] enc(p1) [SEP] enc(p2) [SEP] ... enc(pk) [EOS]`.

The encoder is vectorised over a whole batch of packets: lookup tables give the longest phrase
at every byte position, then the greedy walks (next = pos + len) of all packets advance together,
one numpy step per phrase, with pointer doubling for long packets. Tables stay small (about
4 MB at m = 8192): see `PhraseDict.__init__`. `encode_reference` is Algorithm 1 in plain
Python, the specification the fast path is tested against.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Special token ids (fixed; part of format version 1).
PAD = 0
CLS = 1
EOS = 2
MASK = 3
SEP = 4  # packet separator inside a flow
NUM_SPECIAL = 8  # ids 5..7 are reserved; phrase ids start here
SPECIAL_NAMES = ("[PAD]", "[CLS]", "[EOS]", "[MASK]", "[SEP]")

FORMAT = "flagd-phrases"
VERSION = 1

_FIT_CHUNK = 8 << 20  # bytes per counting pass: ~20 temporary bytes each, and one 2^24-bin pass
_ENCODE_CHUNK = 1 << 18  # bytes encoded in one pass (~25 bytes of temporaries each: cache-sized)
_PROGRESS_STEP = 1 << 20  # report progress every MiB consumed
_LOCKSTEP = 256  # longest walk (in phrases) done one step at a time before doubling pays
_FEW_WALKS = 16  # fewer walks than this go faster in Python than one numpy call per step
_SMALL_COUNT = 1 << 18  # below this many 3-grams, count with unique() instead of a 2^24 bincount


class PhraseDictError(ValueError):
    """A phrase dictionary file is unreadable, tampered with, or not the one a model expects."""


def _chunks(
    packets: Iterable[bytes], chunk_bytes: int, progress: Callable[[int], None] | None
) -> Iterator[list[bytes]]:
    """Packets in lists of about `chunk_bytes` bytes; `progress(bytes consumed)` every MiB."""
    chunk: list[bytes] = []
    size = done = reported = 0
    for p in packets:
        chunk.append(p)
        size += len(p)
        if progress is not None and done + size - reported >= _PROGRESS_STEP:
            reported = done + size
            progress(reported)
        if size >= chunk_bytes:
            yield chunk
            chunk, done, size = [], done + size, 0
    if chunk:
        yield chunk
    if progress is not None:
        progress(done + size)


def _flatten(packets: Sequence[bytes], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Packets back to back in one uint8 buffer (plus `pad` zero bytes), and the P+1 packet
    boundaries in it."""
    bounds = np.zeros(len(packets) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, packets), np.int64, len(packets)), out=bounds[1:])
    return np.frombuffer(b"".join(packets) + bytes(pad), np.uint8), bounds


def _canonical(phrases: Sequence[bytes]) -> bytes:
    """What the dictionary hash covers: the format, version and 2/3-phrases in id order."""
    return f"{FORMAT}/{VERSION}\n".encode() + b"".join(p.hex().encode() + b"\n" for p in phrases)


class PhraseDict:
    """The 256 single bytes plus 2-/3-byte phrases, with fast greedy encoding and decoding.

    Immutable once built, so one instance can serve several threads.
    """

    def __init__(self, phrases: Sequence[bytes] = (), meta: dict[str, Any] | None = None) -> None:
        """`phrases`: the 2- and 3-byte phrases in id order (the single bytes are implicit)."""
        phrases = tuple(bytes(p) for p in phrases)
        if any(len(p) not in (2, 3) for p in phrases):
            raise PhraseDictError("phrases must be 2 or 3 bytes long (single bytes are implicit)")
        if len(set(phrases)) != len(phrases):
            raise PhraseDictError("duplicate phrases")
        self._phrases = phrases
        self.meta: dict[str, Any] = dict(meta or {})  # how it was fitted; informative, not hashed
        self._sha256 = hashlib.sha256(_canonical(phrases)).hexdigest()
        first = NUM_SPECIAL + 256
        ids = np.arange(first, first + len(phrases), dtype=np.int32)
        lens = np.fromiter(map(len, phrases), np.int8, len(phrases))
        keys = np.fromiter((int.from_bytes(p, "big") for p in phrases), np.int64, len(phrases))

        # Lookup tables (id 0 = absent). 2-phrases: a direct 2^16 table. 3-phrases: two
        # levels, so that memory grows with the dictionary, not with 2^24: the 2-byte prefix
        # selects a row of 256 ids (row 0 stays empty for prefixes no 3-phrase has), the third
        # byte the id in it; 1.25 KB per distinct prefix, about 3 MB in all at m = 8192 on
        # ISCX flows. The _len tables give the phrase length directly (1 or 2; 0 or 3), so
        # the encoder takes the longest phrase with one np.maximum. Index tables are intp:
        # numpy gathers with intp indices twice as fast as with narrower ones.
        k2, i2 = keys[lens == 2], ids[lens == 2]
        self._bigram_id = np.zeros(1 << 16, np.int32)
        self._bigram_id[k2] = i2
        self._len2 = np.ones(1 << 16, np.int8)
        self._len2[k2] = 2
        k3, i3 = keys[lens == 3], ids[lens == 3]
        prefixes, row = np.unique(k3 >> 8, return_inverse=True)
        self._tri_row = np.zeros(1 << 16, np.intp)  # prefix -> row * 256
        self._tri_row[prefixes] = (np.arange(prefixes.size) + 1) * 256
        self._tri_id = np.zeros((prefixes.size + 1) * 256, np.int32)
        self._tri_id[(row + 1) * 256 + (k3 & 255)] = i3
        self._len3 = np.where(self._tri_id != 0, np.int8(3), np.int8(0))

        # Decoding: every id's bytes, padded to 3, and its length (0 for special ids).
        self._dec_len = np.zeros(self.vocab_size, np.int64)
        self._dec_bytes = np.zeros((self.vocab_size, 3), np.uint8)
        self._dec_len[NUM_SPECIAL:first] = 1
        self._dec_bytes[NUM_SPECIAL:first, 0] = np.arange(256)
        self._dec_len[first:] = lens
        padded = b"".join(p.ljust(3, b"\0") for p in phrases)
        self._dec_bytes[first:] = np.frombuffer(padded, np.uint8).reshape(-1, 3)

        # The plain-Python reference encoder's table (Algorithm 1 as written).
        self._ref_ids = {bytes([v]): NUM_SPECIAL + v for v in range(256)}
        self._ref_ids.update(zip(phrases, ids.tolist(), strict=True))

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def bytes_only(cls) -> PhraseDict:
        """The 256 single bytes and nothing else (the paper's bytes-only ablation, Fig. 2)."""
        return cls((), {"bytes_only": True})

    @classmethod
    def fit(
        cls,
        packets_iter: Iterable[bytes],
        size: int,
        progress: Callable[[int], None] | None = None,
    ) -> PhraseDict:
        """Count every 2- and 3-gram within each packet and keep the `size` most frequent phrases.

        `size` (m) counts the 256 single bytes, which are always kept; the dictionary is smaller
        when the data holds fewer distinct 2/3-grams. Ties in count go to 2-phrases first, then
        to byte order, so the same multiset of packets always gives the same dictionary.
        `progress` is called with the number of bytes consumed so far, every MiB and at the end.
        """
        if size < 256:
            raise ValueError(f"size must be at least 256 (the single bytes), got {size}")
        # Single bytes are always kept, so only 2- and 3-grams need counting. The 3-gram counts
        # are 2^24 int64 (128 MB): chunks are large so that each dense pass over them pays off.
        c2 = np.zeros(1 << 16, np.int64)
        c3: np.ndarray | None = None
        n_packets = n_bytes = 0
        for chunk in _chunks(packets_iter, _FIT_CHUNK, progress):
            buf, bounds = _flatten(chunk)
            n_packets, n_bytes = n_packets + len(chunk), n_bytes + buf.size
            # A gram starting at i is inside its packet when no packet starts at i+1 (or i+2).
            inner = np.ones(buf.size + 1, bool)
            inner[bounds] = False
            b = buf.astype(np.int32)
            k2 = (b[:-1] << 8) | b[1:]
            c2 += np.bincount(k2[inner[1:-1]], minlength=1 << 16)
            k3 = ((k2[:-1] << 8) | b[2:])[inner[1:-2] & inner[2:-1]]
            if k3.size < _SMALL_COUNT:  # cheaper than a pass over 2^24 bins
                keys, counts = np.unique(k3, return_counts=True)
                c3 = np.zeros(1 << 24, np.int64) if c3 is None else c3
                c3[keys] += counts
            elif c3 is None:
                c3 = np.bincount(k3, minlength=1 << 24)
            else:
                c3 += np.bincount(k3, minlength=1 << 24)
        if c3 is None:
            c3 = np.zeros(1 << 24, np.int64)

        phrases = _most_frequent(c2, c3, size - 256)
        meta = {"requested_size": size, "packets": n_packets, "bytes": n_bytes}
        return cls(phrases, meta)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """m: the number of phrases, the 256 single bytes included."""
        return 256 + len(self._phrases)

    def __len__(self) -> int:
        return self.size

    @property
    def vocab_size(self) -> int:
        """Number of token ids: the special ids plus every phrase."""
        return NUM_SPECIAL + self.size

    @property
    def phrases(self) -> tuple[bytes, ...]:
        """The 2-/3-phrases in id order (ids NUM_SPECIAL + 256 onwards)."""
        return self._phrases

    @property
    def sha256(self) -> str:
        """SHA-256 (hex) of the canonical phrase list: equal hashes mean identical encodings."""
        return self._sha256

    def __repr__(self) -> str:
        return f"PhraseDict(size={self.size}, sha256={self._sha256[:12]})"

    def check_sha256(self, expected: str, what: str = "the model") -> None:
        """Refuse to be used with `what` if it was trained with a different dictionary."""
        if expected != self._sha256:
            raise PhraseDictError(
                f"phrase dictionary {self._sha256[:12]} differs from the one {what} was trained "
                f"with ({expected[:12]}); use the dictionary saved with {what}"
            )

    # ---- encoding -----------------------------------------------------------------------------

    def encode(self, data: bytes) -> np.ndarray:
        """Phrase ids (int32) of one packet's bytes, no special tokens."""
        return self._encode_concat([data])[0]

    def encode_reference(self, data: bytes) -> np.ndarray:
        """Algorithm 1 in plain Python (slow): the specification the fast encoder is tested against."""
        data, ids, out, i = bytes(data), self._ref_ids, [], 0
        while i < len(data):
            for n in (3, 2, 1):  # longest first; single bytes are always there
                pid = ids.get(data[i : i + n]) if i + n <= len(data) else None
                if pid is not None:
                    break
            out.append(pid)
            i += n
        return np.array(out, np.int32)

    def encode_flow(self, packets: Sequence[bytes], max_len: int) -> np.ndarray:
        """`[CLS] enc(p1) [SEP] ... enc(pk) [EOS]` (int32), at most `max_len` ids, not padded."""
        rows, lengths = self._encode_flows([packets], max_len)
        return rows[0, : lengths[0]].copy()

    def encode_flows(self, flows: Sequence[Sequence[bytes]], max_len: int) -> np.ndarray:
        """A batch of flows as an (N, max_len) int32 array, each row `encode_flow` padded with PAD."""
        return self._encode_flows(flows, max_len)[0]

    def encode_flows_with_packets(
        self, flows: Sequence[Sequence[bytes]], max_len: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """`encode_flows`, and beside it (N, max_len) int16: the 1-based index of the packet
        each id came from (a packet's SEP counts as its own), 0 for CLS, EOS and PAD."""
        ids, _, packet_of = self._encode_flows(flows, max_len, with_packets=True)
        return ids, packet_of

    def _encode_flows(
        self, flows: Sequence[Sequence[bytes]], max_len: int, with_packets: bool = False
    ) -> tuple[np.ndarray, ...]:
        """Rows padded with PAD, the length of each row before padding and, with_packets, the
        packet index of every id (see encode_flows_with_packets).

        The max_len - 2 ids between CLS and EOS are shared fairly between a flow's packets
        (max-min fair, "water-filling"): every packet gets an equal share, and what a short
        packet leaves unused goes to the packets that need more. A packet over its share loses
        the end of its phrase list and keeps its SEP. Each kept packet gets at least one phrase,
        so a flow keeps at most (max_len - 2) // 2 packets.
        """
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 ([CLS] [EOS]), got {max_len}")
        budget = max_len - 2
        max_packets = budget // 2  # one phrase + one SEP each: keeps every share >= 2
        byte_cap = 3 * budget  # the first `budget` phrases never read further than this
        n_flows = len(flows)
        n_kept = np.fromiter(map(len, flows), np.int64, n_flows)
        if n_kept.max(initial=0) > max_packets:
            np.minimum(n_kept, max_packets, out=n_kept)
            kept = [p for packets in flows for p in packets[:max_packets]]
        else:
            kept = list(itertools.chain.from_iterable(flows))
        sizes = np.fromiter(map(len, kept), np.int64, len(kept))
        if sizes.max(initial=0) > byte_cap:
            kept = [p[:byte_cap] for p in kept]
            np.minimum(sizes, byte_cap, out=sizes)

        ids, tok_bounds = self._encode_concat(kept, sizes)
        n_tok = np.diff(tok_bounds)
        flow_of = np.repeat(np.arange(n_flows), n_kept)
        flow_first = np.zeros(n_flows + 1, np.int64)
        np.cumsum(n_kept, out=flow_first[1:])
        sep = np.ones(len(kept), np.int64)  # every packet but a flow's last is followed by SEP
        sep[flow_first[1:][n_kept > 0] - 1] = 0
        alloc = _fair_shares(n_tok + sep, flow_of, n_flows, budget)
        keep = alloc - sep  # phrases kept per packet

        # Where each packet starts in its row: after CLS and the earlier packets' allocations.
        ends = np.cumsum(alloc)
        row_base = np.concatenate(([0], ends))[flow_first[:-1]]
        start = 1 + ends - alloc - row_base[flow_of]
        lengths = 2 + np.concatenate(([0], ends))[flow_first[1:]] - row_base

        out = np.zeros((n_flows, max_len), np.int32)  # PAD == 0
        out[:, 0] = CLS
        flat = out.reshape(-1)
        row_off = flow_of * max_len + start  # where each packet's first phrase goes in `flat`
        tok = np.arange(ids.size)
        dest = tok + np.repeat(row_off - tok_bounds[:-1], n_tok)
        if (keep < n_tok).any():  # drop the phrases cut off the end of packets
            kept_tok = tok < np.repeat(tok_bounds[:-1] + keep, n_tok)
            dest, ids = dest[kept_tok], ids[kept_tok]
        flat[dest] = ids
        has_sep = sep.astype(bool)
        flat[row_off[has_sep] + keep[has_sep]] = SEP
        out[np.arange(n_flows), lengths - 1] = EOS
        if not with_packets:
            return out, lengths
        # A packet's ids (its kept phrases, then its SEP) fill alloc[j] positions from row_off[j].
        packet_of = np.zeros((n_flows, max_len), np.int16)
        local = np.arange(len(kept)) - flow_first[:-1][flow_of]  # index within its flow
        pos = np.repeat(row_off - (ends - alloc), alloc) + np.arange(int(alloc.sum()))
        packet_of.reshape(-1)[pos] = np.repeat(local + 1, alloc)
        return out, lengths, packet_of

    def encode_packets(self, packets: Sequence[bytes]) -> list[np.ndarray]:
        """`encode` of many packets at once (one vectorised pass, much faster than a loop)."""
        ids, tok_bounds = self._encode_concat(packets)
        cuts = tok_bounds.tolist()
        return [ids[i:j] for i, j in itertools.pairwise(cuts)]

    def _encode_concat(
        self, packets: Sequence[bytes], sizes: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """All packets' phrase ids back to back (int32), and the P+1 token boundaries."""
        if sizes is None:
            sizes = np.fromiter(map(len, packets), np.int64, len(packets))
        if sizes.sum() <= _ENCODE_CHUNK:
            return self._encode_block(packets, sizes)
        # Blocks of about _ENCODE_CHUNK bytes keep the temporaries in cache (~1.5x faster).
        cuts = np.searchsorted(
            np.cumsum(sizes), np.arange(_ENCODE_CHUNK, sizes.sum(), _ENCODE_CHUNK)
        )
        cuts = np.unique(np.concatenate(([0], cuts + 1, [len(packets)]))).tolist()
        ids, bounds, done = [], [np.zeros(1, np.int64)], 0
        for i, j in itertools.pairwise(cuts):
            block_ids, block_bounds = self._encode_block(packets[i:j], sizes[i:j])
            ids.append(block_ids)
            bounds.append(block_bounds[1:] + done)
            done += block_ids.size
        return np.concatenate(ids), np.concatenate(bounds)

    def _encode_block(
        self, packets: Sequence[bytes], sizes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`_encode_concat` in one vectorised pass."""
        bounds = np.zeros(len(packets) + 1, np.int64)
        np.cumsum(sizes, out=bounds[1:])
        n = int(bounds[-1])
        # Two zero bytes after the last packet let every position read a full 3-gram; what
        # they add is clipped away with the other packet ends.
        buf = np.frombuffer(b"".join(packets) + b"\0\0", np.uint8)
        k2 = (buf[:n].astype(np.intp) << 8) | buf[1 : n + 1]  # the 2-gram at each position
        k3 = self._tri_row[k2] | buf[2:]  # where the 3-gram's id is in _tri_id
        plen = np.maximum(self._len2[k2], self._len3[k3])
        # Clip at packet ends, touching O(packets) positions: the last byte is a 1-phrase, the
        # one before it at most a 2-phrase.
        plen[bounds[1:][sizes >= 1] - 1] = 1
        second = bounds[1:][sizes >= 2] - 2
        plen[second] = self._len2[k2[second]]

        pos = _greedy_starts(plen, bounds, sizes)
        lens = plen[pos]
        single = buf[pos].astype(np.int32) + NUM_SPECIAL
        ids = np.where(
            lens == 3,
            self._tri_id[k3[pos]],
            np.where(lens == 2, self._bigram_id[k2[pos]], single),
        )
        return ids, np.searchsorted(pos, bounds)

    # ---- decoding and statistics --------------------------------------------------------------

    def decode(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """Bytes of a phrase id sequence; special ids (PAD, CLS, SEP, ...) are skipped."""
        ids = np.asarray(ids, np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"phrase ids must be in [0, {self.vocab_size})")
        n = self._dec_len[ids]
        return self._dec_bytes[ids][np.arange(3) < n[:, None]].tobytes()

    def phrase_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Bytes covered by each id (0 for special ids), same shape as `ids`."""
        return self._dec_len[np.asarray(ids)]

    def coverage(
        self, packets_iter: Iterable[bytes], progress: Callable[[int], None] | None = None
    ) -> dict[str, float]:
        """How encoding covers the bytes: shares of bytes in 1-, 2-, 3-phrases, tokens per byte."""
        by_len = np.zeros(4, np.int64)  # bytes covered by phrases of length 0..3
        n_tokens = 0
        for chunk in _chunks(packets_iter, _FIT_CHUNK, progress):
            ids, _ = self._encode_concat(chunk)
            n = self._dec_len[ids]
            by_len += np.bincount(n, weights=n, minlength=4).astype(np.int64)
            n_tokens += ids.size
        n_bytes = int(by_len.sum())
        total = max(n_bytes, 1)
        return {
            "bytes": n_bytes,
            "tokens": n_tokens,
            "tokens_per_byte": n_tokens / total,
            "share_1": float(by_len[1] / total),
            "share_2": float(by_len[2] / total),
            "share_3": float(by_len[3] / total),
        }

    # ---- files --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the dictionary as readable JSON, one phrase per line, with its SHA-256."""
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "size": self.size,
            "num_special": NUM_SPECIAL,
            "sha256": self._sha256,
            "fit": self.meta,
            "phrases": [p.hex() for p in self._phrases],
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)  # readers never see half a file

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PhraseDict:
        """Read a saved dictionary; any damage or edit raises PhraseDictError naming the file."""
        path = Path(path)

        def bad(why: str) -> PhraseDictError:
            return PhraseDictError(f"{path}: {why}")

        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"not a readable phrase dictionary ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad(f"not a {FORMAT} file")
        if doc.get("version") != VERSION or doc.get("num_special") != NUM_SPECIAL:
            raise bad(
                f"unsupported version {doc.get('version')!r} (this flagd reads version {VERSION})"
            )
        hexes = doc.get("phrases")
        if not isinstance(hexes, list) or not all(isinstance(h, str) for h in hexes):
            raise bad("'phrases' must be a list of hex strings")
        try:
            phrases = [bytes.fromhex(h) for h in hexes]
        except ValueError as e:
            raise bad(f"bad phrase ({e})") from e
        digest = hashlib.sha256(_canonical(phrases)).hexdigest()
        if digest != doc.get("sha256"):
            raise bad(
                f"SHA-256 mismatch (recorded {str(doc.get('sha256'))[:12]}, content {digest[:12]}):"
                " the file is corrupted or was edited"
            )
        if doc.get("size") != 256 + len(phrases):
            raise bad(f"size {doc.get('size')!r} does not match {len(phrases)} phrases + 256 bytes")
        try:
            return cls(phrases, doc.get("fit") if isinstance(doc.get("fit"), dict) else None)
        except PhraseDictError as e:
            raise bad(str(e)) from e


def _greedy_starts(plen: np.ndarray, bounds: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sorted start positions of the greedy phrases: the nodes on each packet's path
    start -> start + plen[start] -> ... until the packet's end.

    The walks of all packets advance together, one numpy gather per step (finished walks stay
    at n, and are dropped every few steps); the last few walks finish in Python, which beats
    a numpy call per step for them. Packets longer than
    _LOCKSTEP bytes would need too many steps, so the jump table is first doubled k times
    (jump_k = 2^k phrases ahead), the walk collects every 2^k-th node, and the nodes in
    between are filled in level by level (if S holds every 2^(k+1)-th node of every path,
    S + jump_k(S) holds every 2^k-th).
    """
    n = plen.size
    jump = np.arange(n + 1)
    jump[:n] += plen
    starts, ends = bounds[:-1][sizes > 0], bounds[1:][sizes > 0]
    # A packet's last phrase starts in its last 3 bytes and jumps to its end: send it to n,
    # where every walk stops (jump[n] = n).
    last = ends[:, None] - np.arange(1, 4)
    done = (last >= starts[:, None]) & (jump[last] == ends[:, None])
    jump[last[done]] = n
    jumps = [jump]
    while _LOCKSTEP << (len(jumps) - 1) < sizes.max(initial=0):
        jumps.append(jumps[-1][jumps[-1]])

    jump = jumps[-1]
    walk = [cur := starts]
    while cur.size >= _FEW_WALKS:
        for _ in range(8):
            cur = jump[cur]
            walk.append(cur)
        cur = cur[cur < n]
    rest = []
    for i in cur.tolist():
        while (i := int(jump[i])) < n:
            rest.append(i)
    walk.append(np.array(rest, np.intp))
    nodes = np.concatenate(walk)
    for jump in reversed(jumps[:-1]):
        nodes = np.concatenate((nodes, jump[nodes]))
    on_path = np.zeros(n + 1, bool)
    on_path[nodes] = True
    return np.flatnonzero(on_path[:n])


def _most_frequent(c2: np.ndarray, c3: np.ndarray, n: int) -> list[bytes]:
    """The n most frequent 2/3-grams with a nonzero count: count desc, then 2 before 3, then bytes."""
    if n <= 0:
        return []
    k2, k3 = np.flatnonzero(c2), np.flatnonzero(c3)
    keys = np.concatenate((k2, k3))
    lens = np.concatenate((np.full(k2.size, 2), np.full(k3.size, 3)))
    counts = np.concatenate((c2[k2], c3[k3]))
    if counts.size > n:  # only candidates at or above the n-th largest count need sorting
        threshold = np.partition(counts, counts.size - n)[counts.size - n]
        sel = counts >= threshold
        keys, lens, counts = keys[sel], lens[sel], counts[sel]
    order = np.lexsort((keys, lens, -counts))[:n]
    return [int(k).to_bytes(int(m), "big") for k, m in zip(keys[order], lens[order], strict=True)]


def _fair_shares(need: np.ndarray, flow_of: np.ndarray, n_flows: int, budget: int) -> np.ndarray:
    """Max-min fair split of each flow's `budget` over its packets' `need` (packets in flow order).

    Repeatedly: every unsatisfied packet is offered budget_left // unsatisfied; those needing no
    more get what they need. When nobody more fits, the rest get the common share, and the
    remainder goes one id each to the earliest of them. Vectorised across flows; the loop runs
    at most (packets per flow) times.
    """
    if (np.bincount(flow_of, weights=need, minlength=n_flows) <= budget).all():
        return need.copy()  # the common case: every flow fits whole
    alloc = np.zeros_like(need)
    left = np.full(n_flows, budget, np.int64)
    active = need > 0
    while True:
        cnt = np.bincount(flow_of[active], minlength=n_flows)
        share = left // np.maximum(cnt, 1)
        fits = active & (need <= share[flow_of])
        if not fits.any():
            break
        alloc[fits] = need[fits]
        left -= np.bincount(flow_of[fits], weights=need[fits], minlength=n_flows).astype(np.int64)
        active &= ~fits
    cut = np.flatnonzero(active)
    if cut.size:
        f = flow_of[cut]
        rank = np.arange(cut.size) - np.searchsorted(f, f)  # position among the flow's cut ones
        alloc[cut] = share[f] + (rank < left[f] % cnt[f])
    return alloc
