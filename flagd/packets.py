"""Pure decoding of link, IP, TCP and UDP headers from raw frame buffers into columnar records.

`decode` works on a whole `Frames` batch at once: records are grouped by link type and header
layout, and every field is read with numpy fancy indexing on the shared byte buffer. Python loops
run only over header *depths* (stacked VLAN tags, IPv6 extension headers), never over packets.
Any bytes decode without raising; a frame that is not a usable TCP/UDP packet gets a `Skip` code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

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


class DecodeError(ValueError):
    """The one error type the capture readers and decoders raise for bad input."""


class Skip(enum.IntEnum):
    """Why a frame is not a TCP/UDP packet the flow meter can use (0 = usable)."""

    OK = 0
    TRUNCATED = 1  # too short for the headers it claims
    UNKNOWN_LINK = 2  # link type flagd does not decode
    NON_IP = 3  # ARP, LLDP, ... (after VLAN tags)
    BAD_IP = 4  # bad version, header length or total length
    FRAGMENT = 5  # IPv4/IPv6 fragment other than the first (no ports); see flagd/reassembly.py
    OTHER_PROTO = 6  # ICMP, IGMP, ESP, GRE, ... (not TCP/UDP)
    # Set by flagd/reassembly.py, never by decode: fragments of TCP/UDP datagrams it gave up on
    FRAG_OVERLAP = 7  # overlapping (or repeated) fragments: the datagram is discarded
    FRAG_TIMEOUT = 8  # the datagram was still incomplete after the reassembly timeout
    FRAG_LIMIT = 9  # too many fragments or pending datagrams, or a datagram over 64 KiB


@dataclass(slots=True)
class Packets:
    """Decoded packets, one entry per input frame (same order, same length as the Frames).

    Addresses are 16 bytes for both families (IPv4 in the first 4 bytes, rest zero) so
    that keys have one shape; `version` tells them apart.
    """

    frames: Frames  # the batch these were decoded from (data buffer is shared, not copied)
    skip: np.ndarray  # uint8 Skip reason; 0 for TCP/UDP packets
    ts: np.ndarray  # float64 (same as frames.ts)
    version: np.ndarray  # uint8 4 or 6 (0 when not IP)
    proto: np.ndarray  # uint8 IP protocol number of the transport (after IPv6 ext headers)
    src: np.ndarray  # uint8 (n, 16)
    dst: np.ndarray  # uint8 (n, 16)
    sport: np.ndarray  # uint16 (0 when not TCP/UDP)
    dport: np.ndarray  # uint16
    tcp_flags: np.ndarray  # uint8 (0 for UDP)
    ip_off: np.ndarray  # int64 absolute offset of the IP header in frames.data (-1: none found)
    ip_caplen: np.ndarray  # int32 captured bytes from the IP header to the end of the record
    # int64 absolute offset of the TCP/UDP header in frames.data; for other protocols and fragments
    # where the IP payload starts; -1 when no IP header was parsed
    l4_off: np.ndarray
    l4_hdr_len: np.ndarray  # uint8 TCP data offset * 4, or 8 for UDP
    payload_len: np.ndarray  # int32 transport payload bytes on the wire (from IP lengths)
    wirelen: np.ndarray  # int32 (same as frames.wirelen)
    # bool: an IPv4/IPv6 fragment (the first one too) whose IP header was read whole
    frag: np.ndarray
    # uint32 VLAN ids of the first two 802.1Q/ad tags, outer << 12 | inner (0: untagged): part of
    # the flow key, as in Suricata and NFStream (one 5-tuple on two VLANs is two flows)
    vlan: np.ndarray

    def __len__(self) -> int:
        return len(self.skip)


ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
VLAN_TAGS = (0x8100, 0x88A8, 0x9100)  # 802.1Q, 802.1ad (QinQ), and the pre-standard QinQ type
MPLS = (0x8847, 0x8848)  # unicast, multicast: 4-byte label entries, IP after the bottom one
MAX_VLAN_TAGS = 8  # deeper stacks (VLAN tags and MPLS labels together) are not real traffic: NON_IP
LINKTYPE_C_HDLC = 104  # Cisco HDLC: address, control, then an ethertype (router captures)
PROTO_TCP = 6
PROTO_UDP = 17
# IP-in-IP (RFC 2003) and IPv6-in-IP (6in4, RFC 4213; 6in6, RFC 2473): the inner packet is the
# flow, its outer header a link layer. Deeper nesting than this is left as OTHER_PROTO.
PROTO_IPIP, PROTO_IPV6 = 4, 41
MAX_IP_IN_IP = 3
# IPv6 extension headers walked to reach the transport (all but fragment and AH use (len+1)*8)
IPV6_HOPOPTS, IPV6_ROUTING, IPV6_FRAGMENT, IPV6_AH, IPV6_DSTOPTS = 0, 43, 44, 51, 60
IPV6_EXT = (IPV6_HOPOPTS, IPV6_ROUTING, IPV6_FRAGMENT, IPV6_AH, IPV6_DSTOPTS, 135, 139, 140)
MAX_IPV6_EXT = 16  # longer chains are abuse: reported as OTHER_PROTO with the header they stop at
# BSD loopback address families for IPv6 (NetBSD/OpenBSD 24, FreeBSD 28, Darwin 30); IPv4 is 2
AF_INET6_VALUES = (24, 28, 30)

# link types that carry an ethertype: (link type, header length, offset of the ethertype)
_ETHERTYPE_LINKS = (
    (LINKTYPE_ETHERNET, 14, 12),
    (LINKTYPE_LINUX_SLL, 16, 14),
    (LINKTYPE_LINUX_SLL2, 20, 0),
    (LINKTYPE_C_HDLC, 4, 2),
)


def decode(frames: Frames) -> Packets:
    """Decode every frame of a batch; never raises, whatever the bytes."""
    n = len(frames)
    data = frames.data
    # Every read below stays inside [start, end); clamping both to the buffer keeps that true even
    # for a hand-built batch whose offsets and lengths disagree with its buffer.
    start = np.clip(frames.offset.astype(np.int64), 0, len(data))
    end = np.clip(start + frames.caplen, start, len(data))
    out = Packets(
        frames=frames,
        skip=np.full(n, Skip.UNKNOWN_LINK, np.uint8),
        ts=frames.ts,
        version=np.zeros(n, np.uint8),
        proto=np.zeros(n, np.uint8),
        src=np.zeros((n, 16), np.uint8),
        dst=np.zeros((n, 16), np.uint8),
        sport=np.zeros(n, np.uint16),
        dport=np.zeros(n, np.uint16),
        tcp_flags=np.zeros(n, np.uint8),
        ip_off=np.full(n, -1, np.int64),
        ip_caplen=np.zeros(n, np.int32),
        l4_off=np.full(n, -1, np.int64),
        l4_hdr_len=np.zeros(n, np.uint8),
        payload_len=np.zeros(n, np.int32),
        wirelen=frames.wirelen,
        frag=np.zeros(n, bool),
        vlan=np.zeros(n, np.uint32),
    )
    if n == 0:
        return out
    net = _link(data, start, end, frames.linktype, out)
    ok = out.ip_off >= 0
    out.ip_caplen[ok] = (end[ok] - out.ip_off[ok]).astype(np.int32)
    # IP length on the wire as far as the capture knows; used when the header's own is unusable
    wire_ip = frames.wirelen.astype(np.int64) - (out.ip_off - start)
    ip_len = np.zeros(n, np.int64)
    _ipv4(data, end, wire_ip, np.flatnonzero(net == 4), out, ip_len)
    _ipv6(data, end, wire_ip, np.flatnonzero(net == 6), out, ip_len)
    for _ in range(MAX_IP_IN_IP):
        inner = np.flatnonzero((out.skip == Skip.OK) & ~out.frag
                               & ((out.proto == PROTO_IPIP) | (out.proto == PROTO_IPV6)))
        if not len(inner):
            break
        four = out.proto[inner] == PROTO_IPIP
        out.ip_off[inner] = out.l4_off[inner]
        out.ip_caplen[inner] = (end[inner] - out.ip_off[inner]).astype(np.int32)
        wire_ip[inner] = frames.wirelen[inner].astype(np.int64) - (out.ip_off[inner] - start[inner])
        out.src[inner] = 0
        out.dst[inner] = 0
        _ipv4(data, end, wire_ip, inner[four], out, ip_len)
        _ipv6(data, end, wire_ip, inner[~four], out, ip_len)
    # IP payload for every parsed header (fragments too); TCP/UDP then take their header off
    ok = out.l4_off >= 0
    out.payload_len[ok] = np.maximum(ip_len[ok] - (out.l4_off[ok] - out.ip_off[ok]), 0)
    _transport(data, end, np.flatnonzero((out.skip == Skip.OK) & ok), out)
    return out


def _u16(data: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Big-endian 16-bit fields at `pos` (as int64, to mix freely with offsets)."""
    return (data[pos].astype(np.int64) << 8) | data[pos + 1]


def _link(
    data: np.ndarray, start: np.ndarray, end: np.ndarray, linktype: np.ndarray, out: Packets
) -> np.ndarray:
    """Find the IP header after the link layer: sets out.ip_off and out.skip, returns 4/6/0."""
    n = len(start)
    net = np.zeros(n, np.uint8)
    skip = out.skip

    # Ethertype link layers: gather (record, ethertype, offset after the ethertype) for all of them
    # and peel VLAN tags together.
    rec, etype, nxt = [], [], []
    for lt, hdr, et_at in _ETHERTYPE_LINKS:
        idx = np.flatnonzero(linktype == lt)
        if not len(idx):
            continue
        short = end[idx] - start[idx] < hdr
        skip[idx[short]] = Skip.TRUNCATED
        idx = idx[~short]
        rec.append(idx)
        etype.append(_u16(data, start[idx] + et_at))
        nxt.append(start[idx] + hdr)
    if rec:
        idx, et, pos = np.concatenate(rec), np.concatenate(etype), np.concatenate(nxt)
        for depth in range(MAX_VLAN_TAGS):
            lab = np.flatnonzero(np.isin(et, MPLS))
            if len(lab):
                # one label entry per round; after the bottom of the stack (S bit) the version
                # nibble says what follows (a pseudowire's Ethernet is not decoded: NON_IP)
                cut = pos[lab] + 5 > end[idx[lab]]
                et[lab[cut]] = -1
                lab = lab[~cut]
                bottom = (data[pos[lab] + 2] & 1) == 1
                ver = data[pos[lab] + 4] >> 4
                after = np.where(ver == 4, ETH_IPV4, np.where(ver == 6, ETH_IPV6, 0))
                et[lab] = np.where(bottom, after, et[lab])
                pos[lab] += 4
            tag = np.flatnonzero(np.isin(et, VLAN_TAGS))
            if not len(tag) and not len(lab):
                break
            # a tag is TCI (2 bytes: the VLAN id in its low 12 bits) then the next ethertype
            cut = pos[tag] + 4 > end[idx[tag]]
            et[tag[cut]] = -1
            tag = tag[~cut]
            if depth < 2:
                vid = (_u16(data, pos[tag]) & 0x0FFF).astype(np.uint32)
                out.vlan[idx[tag]] = (out.vlan[idx[tag]] << 12) | vid
            et[tag] = _u16(data, pos[tag] + 2)
            pos[tag] += 4
        skip[idx] = np.where(et == -1, Skip.TRUNCATED, Skip.NON_IP)
        _found(idx[et == ETH_IPV4], pos[et == ETH_IPV4], 4, net, out)
        _found(idx[et == ETH_IPV6], pos[et == ETH_IPV6], 6, net, out)

    # Raw IP: the version nibble decides for LINKTYPE_RAW; 228/229 say it in the link type.
    idx = np.flatnonzero(linktype == LINKTYPE_RAW)
    if len(idx):
        empty = end[idx] <= start[idx]
        skip[idx[empty]] = Skip.TRUNCATED
        idx = idx[~empty]
        ver = data[start[idx]] >> 4
        skip[idx] = Skip.BAD_IP
        _found(idx[ver == 4], start[idx[ver == 4]], 4, net, out)
        _found(idx[ver == 6], start[idx[ver == 6]], 6, net, out)
    for lt, version in ((LINKTYPE_IPV4, 4), (LINKTYPE_IPV6, 6)):
        idx = np.flatnonzero(linktype == lt)
        _found(idx, start[idx], version, net, out)

    # Loopback: a 4-byte address family. NULL stores it in the capturing host's byte order, so
    # both orders are accepted; LOOP always uses network order.
    for lt in (LINKTYPE_NULL, LINKTYPE_LOOP):
        idx = np.flatnonzero(linktype == lt)
        if not len(idx):
            continue
        short = end[idx] - start[idx] < 4
        skip[idx[short]] = Skip.TRUNCATED
        idx = idx[~short]
        s = start[idx]
        b = [data[s + k].astype(np.int64) for k in range(4)]
        fams = [(b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]]
        if lt == LINKTYPE_NULL:
            fams.append((b[3] << 24) | (b[2] << 16) | (b[1] << 8) | b[0])
        v4 = np.zeros(len(idx), bool)
        v6 = np.zeros(len(idx), bool)
        for fam in fams:
            v4 |= fam == 2
            v6 |= np.isin(fam, AF_INET6_VALUES)
        skip[idx] = Skip.NON_IP
        _found(idx[v4], s[v4] + 4, 4, net, out)
        _found(idx[v6 & ~v4], s[v6 & ~v4] + 4, 6, net, out)
    return net


def _found(idx: np.ndarray, pos: np.ndarray, version: int, net: np.ndarray, out: Packets) -> None:
    """Records `idx` carry an IP header of `version` at absolute offset `pos`."""
    net[idx] = version
    out.ip_off[idx] = pos
    out.skip[idx] = Skip.OK


def _ipv4(
    data: np.ndarray,
    end: np.ndarray,
    wire_ip: np.ndarray,
    idx: np.ndarray,
    out: Packets,
    ip_len: np.ndarray,
) -> None:
    if not len(idx):
        return
    p = out.ip_off[idx]
    short = end[idx] - p < 20
    out.skip[idx[short]] = Skip.TRUNCATED
    idx, p = idx[~short], p[~short]
    b0 = data[p]
    ihl = (b0 & 0x0F).astype(np.int64) * 4
    bad = ((b0 >> 4) != 4) | (ihl < 20)
    out.skip[idx[bad]] = Skip.BAD_IP
    idx, p, ihl = idx[~bad], p[~bad], ihl[~bad]

    out.version[idx] = 4
    out.proto[idx] = data[p + 9]
    cols = np.arange(4)
    out.src[idx, :4] = data[p[:, None] + 12 + cols]
    out.dst[idx, :4] = data[p[:, None] + 16 + cols]
    # The header's total length, unless it is impossible (below the header length: TSO captures
    # write 0 there) or claims more than went on the wire; then the wire length it is.
    tot = _u16(data, p + 2)
    wire = wire_ip[idx]
    ip_len[idx] = np.where(tot >= ihl, np.minimum(tot, wire), wire)
    out.l4_off[idx] = p + ihl
    out.skip[idx[ihl > end[idx] - p]] = Skip.TRUNCATED  # options cut by the snaplen
    # Only the fragment at offset 0 carries the transport header; MF or an offset: a fragment.
    fo = _u16(data, p + 6)
    out.frag[idx[(fo & 0x3FFF) != 0]] = True
    out.skip[idx[(fo & 0x1FFF) != 0]] = Skip.FRAGMENT


def _ipv6(
    data: np.ndarray,
    end: np.ndarray,
    wire_ip: np.ndarray,
    idx: np.ndarray,
    out: Packets,
    ip_len: np.ndarray,
) -> None:
    if not len(idx):
        return
    p = out.ip_off[idx]
    short = end[idx] - p < 40
    out.skip[idx[short]] = Skip.TRUNCATED
    idx, p = idx[~short], p[~short]
    bad = (data[p] >> 4) != 6
    out.skip[idx[bad]] = Skip.BAD_IP
    idx, p = idx[~bad], p[~bad]

    out.version[idx] = 6
    cols = np.arange(16)
    out.src[idx] = data[p[:, None] + 8 + cols]
    out.dst[idx] = data[p[:, None] + 24 + cols]
    plen = _u16(data, p + 4)
    wire = wire_ip[idx]
    # payload length 0 is a jumbogram (or a TSO capture): fall back to the wire length
    ip_len[idx] = np.where(plen > 0, np.minimum(40 + plen, wire), wire)

    nh = data[p + 6].astype(np.int64)
    pos = p + 40
    # Walk extension headers for the records still inside a chain; each round peels one header.
    act = np.arange(len(idx))
    for _ in range(MAX_IPV6_EXT):
        act = act[np.isin(nh[act], IPV6_EXT)]
        if not len(act):
            break
        h, q = nh[act], pos[act]
        is_frag = h == IPV6_FRAGMENT
        cut = q + np.where(is_frag, 8, 2) > end[idx[act]]
        out.skip[idx[act[cut]]] = Skip.TRUNCATED
        out.proto[idx[act[cut]]] = h[cut]
        act, h, q, is_frag = act[~cut], h[~cut], q[~cut], is_frag[~cut]
        out.frag[idx[act[is_frag]]] = True
        later = np.zeros(len(act), bool)
        later[is_frag] = (_u16(data, q[is_frag] + 2) & 0xFFF8) != 0
        out.skip[idx[act[later]]] = Skip.FRAGMENT
        size = np.where(
            h == IPV6_AH,
            (data[q + 1].astype(np.int64) + 2) * 4,
            (data[q + 1].astype(np.int64) + 1) * 8,
        )
        size[is_frag] = 8
        nh[act] = data[q]
        pos[act] = q + size
        act = act[~later]
    # proto is the header after the chain (for a fragment: the one it announces)
    done = out.skip[idx] != Skip.TRUNCATED
    out.proto[idx[done]] = nh[done]
    out.l4_off[idx[done]] = pos[done]
    # still inside an extension chain after MAX_IPV6_EXT headers: not a transport we read
    deep = (out.skip[idx] == Skip.OK) & np.isin(nh, IPV6_EXT)
    out.skip[idx[deep]] = Skip.OTHER_PROTO


def _transport(data: np.ndarray, end: np.ndarray, idx: np.ndarray, out: Packets) -> None:
    """Ports, flags and header length for TCP/UDP; OTHER_PROTO for the rest."""
    proto = out.proto[idx]
    q = out.l4_off[idx]
    hdr = np.zeros(len(idx), np.int64)

    tcp = proto == PROTO_TCP
    udp = proto == PROTO_UDP
    out.skip[idx[~(tcp | udp)]] = Skip.OTHER_PROTO
    # TCP needs ports and flags (14 bytes); the data offset may point past the capture (snaplen).
    # UDP needs its ports (4 bytes).
    room = end[idx] - q
    cut = (tcp & (room < 14)) | (udp & (room < 4))
    out.skip[idx[cut]] = Skip.TRUNCATED
    tcp &= ~cut
    udp &= ~cut
    both = tcp | udp
    i, qb = idx[both], q[both]
    out.sport[i] = _u16(data, qb)
    out.dport[i] = _u16(data, qb + 2)
    qt = q[tcp]
    out.tcp_flags[idx[tcp]] = data[qt + 13]
    hdr[tcp] = (data[qt + 12] >> 4).astype(np.int64) * 4
    hdr[udp] = 8
    out.l4_hdr_len[idx] = hdr
    out.payload_len[idx] = np.maximum(out.payload_len[idx] - hdr, 0)
