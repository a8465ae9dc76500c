"""VPN tunnel flows seen from inside: only the packets the tunnel carried, at their inner size.

A flow through WireGuard, OpenVPN or IPsec shows the tunnel's framing (handshake packets, message
headers, a fixed per-packet overhead) around encrypted bytes. A model reading it as it comes learns
"this tunnel's framing + this application" and names nothing right through a tunnel kind it was
never trained on (the lab12 card's leave-one-implementation-out split). What does carry the
application across tunnel kinds is the sequence of inner packets: their direction, size and
timing. `unwrap` rewrites a recognised tunnel flow to that: control packets (handshakes,
keepalives) removed, and each data packet shown as a UDP packet of its estimated inner length with
its encrypted bytes zeroed, the same for every tunnel kind. Other flows pass unchanged.

Works on model bytes (`preprocess.model_bytes`: IP header on, UDP header padded to 20 bytes, at
least 40 bytes kept; ports may be masked, so recognition reads payloads only) and their sides
(direction, wire length, gap). Recognised:

    wireguard  every packet a WireGuard message (type 1-3 at its fixed length, or 4 = data;
               three zero bytes after the type), so also a flow caught mid-tunnel
    openvpn    UDP, first packet a P_CONTROL_HARD_RESET_CLIENT (v2 or v3), the server's reset
               after it, every packet an OpenVPN opcode
    ipsec      UDP-encapsulated ESP (RFC 3948), first packet IKE behind the non-ESP marker

Inner sizes assume AEAD ciphers (16-byte tags; WireGuard's own framing, OpenVPN's and ESP's
AES-GCM/ChaCha20 defaults); a few bytes off for other ciphers, well inside the model's 32-byte
size buckets. Not recognised: OpenVPN over TCP, an OpenVPN or IKE flow whose handshake was not
captured (a meter started mid-tunnel). Raw ESP (IP protocol 50) is not TCP or UDP, so the flow
meter makes no flow of it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

UDP = 17
UDP_MODEL_HEADER = 20  # UDP header as the model sees it: 8 bytes + 12 zero pad

# payload bytes of a tunnel data packet that are not the inner packet
WG_DATA_OVERHEAD = 32  # type/reserved 4, receiver 4, counter 8, tag 16 (inner padded to 16)
OVPN_DATA_OVERHEAD = {6: 1 + 4 + 16, 9: 4 + 4 + 16}  # P_DATA_V1 / _V2: opcode(+peer id), packet id, tag
# SPI, sequence, IV, padding (2 when the inner length is a multiple of 4, as IP packets mostly
# are: pad length + next header + padding end on a 4-byte boundary), pad length, next header, ICV
ESP_OVERHEAD = 4 + 4 + 8 + 2 + 1 + 1 + 16
WG_LENGTHS = {1: 148, 2: 92, 3: 64}  # handshake initiation, response, cookie reply
OVPN_SERVER_RESET = 8  # P_CONTROL_HARD_RESET_SERVER_V2


def _layout(pkt: bytes) -> tuple[int, int, int] | None:
    """(IP header length, UDP payload offset in the model bytes, UDP payload length on the
    wire), or None when pkt is not UDP."""
    if len(pkt) >= 20 and pkt[0] >> 4 == 4:
        ihl, total, proto = (pkt[0] & 15) * 4, struct.unpack_from("!H", pkt, 2)[0], pkt[9]
    elif len(pkt) >= 40 and pkt[0] >> 4 == 6:  # (extension headers: not a tunnel we know)
        ihl, total, proto = 40, 40 + struct.unpack_from("!H", pkt, 4)[0], pkt[6]
    else:
        return None
    return (ihl, ihl + UDP_MODEL_HEADER, total - ihl - 8) if proto == UDP else None


def _payloads(packets: Sequence[bytes]) -> list[tuple[int, int, bytes, int]] | None:
    """Per packet (IP header length, payload offset, visible UDP payload, payload length), or
    None unless every packet is UDP."""
    out = []
    for pkt in packets:
        layout = _layout(pkt)
        if layout is None:  # most flows: TCP, known at the first packet
            return None
        ihl, offset, length = layout
        out.append((ihl, offset, pkt[offset:], length))
    return out


def _is_wireguard(head: bytes, length: int) -> bool:
    if len(head) < 4 or head[1:4] != b"\0\0\0":
        return False
    if head[0] == 4:  # inner padded to 16 bytes, but never past the link MTU: no length rule
        return length >= WG_DATA_OVERHEAD
    return WG_LENGTHS.get(head[0]) == length


def kind(packets: Sequence[bytes]) -> str | None:
    """The tunnel a flow's packets (model bytes, first packet first) belong to, or None."""
    p = _payloads(packets) if packets else None
    return _kind(p) if p else None


def _kind(p: list[tuple[int, int, bytes, int]]) -> str | None:
    """The tunnel of a flow's `_payloads`, or None."""
    _, _, head, length = p[0]
    if all(_is_wireguard(h, n) for _, _, h, n in p):
        return "wireguard"
    if _is_openvpn(p):
        return "openvpn"
    # non-ESP marker, then the IKE header: SPIs (16), next payload, version 2.0, IKE_SA_INIT (34)
    if len(head) >= 23 and head[:4] == b"\0\0\0\0" and head[21] == 0x20 and head[22] == 34:
        return "ipsec"
    return None


def _is_openvpn(p: list[tuple[int, int, bytes, int]]) -> bool:
    """A client's hard reset (key 0, v2 or v3), the server's answering one among the packets
    that follow, and every packet's first byte a known opcode: a first byte alone matches
    plain text (syslog's "<" is a v2 hard reset's 0x38 + 4)."""
    _, _, head, length = p[0]
    if not head or head[0] not in (0x38, 0x50) or length < 14:
        return False
    opcodes = [h[0] >> 3 for _, _, h, _ in p if h]
    return OVPN_SERVER_RESET in opcodes[1:] and all(1 <= op <= 10 for op in opcodes)


def _inner_length(tunnel: str, head: bytes, length: int) -> int:
    """Estimated length of the inner packet a data packet carries; 0 for a control packet."""
    if tunnel == "wireguard":
        return length - WG_DATA_OVERHEAD if head[:1] == b"\x04" and len(head) >= 4 else 0
    if tunnel == "openvpn":
        return length - OVPN_DATA_OVERHEAD.get(head[0] >> 3, length) if head else 0
    # ipsec: a zero marker is IKE, one 0xff byte a NAT keepalive, anything else ESP
    if len(head) >= 4 and head[:4] != b"\0\0\0\0":
        return max(length - ESP_OVERHEAD, 0)
    return 0


def unwrap(packets: Sequence[bytes], sides: Sequence[tuple[int, int, float]], max_packets: int = 0
           ) -> tuple[list[bytes], list[tuple[int, int, float]]]:
    """A recognised tunnel flow as the packets it carried (see the module docstring), the first
    max_packets of them if that is > 0; any other flow, or a tunnel flow with no data packet
    among these, unchanged.

    Why a cap: from the same K wire packets the tunnel kinds leave different numbers of data
    packets (a WireGuard handshake takes 2 packets, OpenVPN's control channel about 14), so a
    model reading every one can learn the count, that is the tunnel kind, instead of the class.
    """
    p = _payloads(packets) if packets else None
    tunnel = _kind(p) if p else None
    if tunnel is None:
        return list(packets), list(sides)
    out, out_sides, clock, last = [], [], 0.0, None
    for pkt, (ihl, offset, head, length), (direction, wire, gap) in zip(packets, p, sides,
                                                                        strict=True):
        clock += gap
        inner = _inner_length(tunnel, head, length)
        if inner <= 0:
            continue
        out.append(_inner_packet(pkt, ihl, offset, inner))
        # the same link-layer bytes (Ethernet's 14, ...) around the packet the tunnel carried
        out_sides.append((direction, wire - length + inner, 0.0 if last is None else clock - last))
        last = clock
        if len(out) == max_packets:
            break
    if not out:
        return list(packets), list(sides)
    return out, out_sides


def _inner_packet(pkt: bytes, ihl: int, offset: int, inner: int) -> bytes:
    """`pkt`'s IP and (padded) UDP headers with their lengths set for an `inner`-byte payload,
    the encrypted bytes zeroed, as long as `pkt`'s model bytes: one shape for every tunnel."""
    out = bytearray(pkt[:offset]) + bytes(len(pkt) - offset)
    if pkt[0] >> 4 == 4:
        struct.pack_into("!H", out, 2, min(ihl + 8 + inner, 0xFFFF))
    else:
        struct.pack_into("!H", out, 4, min(8 + inner, 0xFFFF))
    struct.pack_into("!H", out, ihl + 4, min(8 + inner, 0xFFFF))  # the UDP length
    return bytes(out)
