"""The paper's section 3.1: what the model sees of a packet, and which packets it never sees.

FLAG (following Deep Packet) strips the link layer, masks the IP addresses, pads the UDP header
with zeros to the 20 bytes of a TCP header so both line up, and removes packets that say nothing
about the application (name lookups, DHCP, time sync, LAN discovery, TCP segments without
payload). Extra masks, off by default, remove further shortcut features for honest evaluation.
Real addresses stay in the flow record: masking applies only to the model's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TCP, UDP = 6, 17
UDP_PAD = bytes(12)  # UDP header (8) + 12 zero bytes = a TCP header's 20

# Relevance rules: name -> (transport, ports). A packet matching a rule on either port is dropped.
# "tcp-no-payload" is not port based: handshakes, pure ACKs, FIN/RST without data.
PORT_RULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "dhcp": (UDP, (67, 68, 546, 547)),
    "dns": (0, (53,)),  # 0 = TCP and UDP
    "mdns": (UDP, (5353,)),
    "llmnr": (0, (5355,)),
    "nbns": (UDP, (137, 138)),
    "ntp": (UDP, (123,)),
    "ssdp": (UDP, (1900,)),
    # Off by default: LAN discovery chatter that survives Deep Packet's list in ISCX, where the
    # same broadcasts are labelled with whichever class was being recorded (Dropbox LAN sync,
    # WS-Discovery, SLP, Spotify, Plex GDM). Shipped models were trained without it.
    "lan-discovery": (UDP, (17500, 3702, 427, 57621, 32410, 32412, 32413, 32414)),
}
TCP_NO_PAYLOAD = "tcp-no-payload"
ALL_RULES = (*PORT_RULES, TCP_NO_PAYLOAD)
DEFAULT_RULES = ("dhcp", "dns", "mdns", "llmnr", "nbns", "ntp", "ssdp", TCP_NO_PAYLOAD)

EXTRA_MASKS = ("ports", "seq", "ipid", "ttl", "checksum", "tcp-timestamp")


@dataclass(frozen=True, slots=True)
class Preprocessing:
    """What the model sees: rules that drop packets, masks, and the per-packet byte cap."""

    rules: tuple[str, ...] = DEFAULT_RULES
    mask_addresses: bool = True
    extra_masks: tuple[str, ...] = ()  # any of EXTRA_MASKS
    packet_bytes: int = 128  # B: bytes kept per packet, from the IP header on

    def __post_init__(self) -> None:
        unknown = set(self.rules) - set(ALL_RULES)
        if unknown:
            raise ValueError(f"unknown relevance rule(s) {sorted(unknown)}; known: {', '.join(ALL_RULES)}")
        unknown = set(self.extra_masks) - set(EXTRA_MASKS)
        if unknown:
            raise ValueError(f"unknown mask(s) {sorted(unknown)}; known: {', '.join(EXTRA_MASKS)}")
        if self.packet_bytes < 40:
            raise ValueError("packet_bytes must be at least 40 (an IPv4 + TCP header)")

    @classmethod
    def honest(cls, **overrides) -> Preprocessing:
        """Every shortcut mask on: the setting for evaluations that should not reward shortcuts."""
        return cls(extra_masks=EXTRA_MASKS, **overrides)

    def to_dict(self) -> dict:
        return {
            "rules": list(self.rules),
            "mask_addresses": self.mask_addresses,
            "extra_masks": list(self.extra_masks),
            "packet_bytes": self.packet_bytes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            rules=tuple(d["rules"]),
            mask_addresses=d["mask_addresses"],
            extra_masks=tuple(d["extra_masks"]),
            packet_bytes=d["packet_bytes"],
        )


@dataclass(slots=True)
class RuleTable:
    """Port lookup tables compiled from a rule list, for vectorised relevance over a batch."""

    names: tuple[str, ...]  # code i (1-based) -> names[i - 1]
    tcp_ports: np.ndarray = field(repr=False)  # uint8[65536] rule code per port
    udp_ports: np.ndarray = field(repr=False)
    tcp_no_payload: int = 0  # code of that rule, 0 when not enabled

    @classmethod
    def compile(cls, rules: tuple[str, ...]) -> RuleTable:
        names = tuple(r for r in ALL_RULES if r in rules)  # fixed order, stable codes
        tcp = np.zeros(65536, np.uint8)
        udp = np.zeros(65536, np.uint8)
        for code, name in enumerate(names, 1):
            if name == TCP_NO_PAYLOAD:
                continue
            transport, ports = PORT_RULES[name]
            for table, proto in ((tcp, TCP), (udp, UDP)):
                if transport in (0, proto):
                    table[list(ports)] = code
        no_payload = names.index(TCP_NO_PAYLOAD) + 1 if TCP_NO_PAYLOAD in names else 0
        return cls(names, tcp, udp, no_payload)

    def codes(self, proto: np.ndarray, sport: np.ndarray, dport: np.ndarray,
              payload_len: np.ndarray) -> np.ndarray:
        """Rule code per packet: 0 = relevant, else 1 + index into `names`."""
        is_tcp = proto == TCP
        by_sport = np.where(is_tcp, self.tcp_ports[sport], self.udp_ports[sport])
        by_dport = np.where(is_tcp, self.tcp_ports[dport], self.udp_ports[dport])
        codes = np.where(by_sport != 0, by_sport, by_dport)
        if self.tcp_no_payload:
            codes[(codes == 0) & is_tcp & (payload_len == 0)] = self.tcp_no_payload
        return codes

    def name(self, code: int) -> str:
        return self.names[code - 1]


def model_bytes(data: np.ndarray, ip_off: int, ip_caplen: int, l4_off: int, l4_hdr_len: int,
                version: int, proto: int, pre: Preprocessing) -> bytes:
    """The bytes of one packet as the model sees them (IP header on, masked, UDP padded, capped)."""
    limit = pre.packet_bytes
    l4 = l4_off - ip_off  # IPv6 extension headers stay between the two
    end = ip_off + min(ip_caplen, limit + (0 if proto == TCP else 8))
    pkt = bytearray(data[ip_off:end].tobytes())
    n = len(pkt)

    def zero(start: int, stop: int) -> None:
        if start < n:
            pkt[start:min(stop, n)] = bytes(min(stop, n) - start)

    masks = pre.extra_masks
    if version == 4:
        if pre.mask_addresses:
            zero(12, 20)
        if masks:
            if "ipid" in masks:
                zero(4, 6)
            if "ttl" in masks:
                zero(8, 9)
            if "checksum" in masks:
                zero(10, 12)
    else:
        if pre.mask_addresses:
            zero(8, 40)
        if "ttl" in masks:
            zero(7, 8)
    if masks:
        if "ports" in masks:
            zero(l4, l4 + 4)
        if proto == TCP:
            if "seq" in masks:
                zero(l4 + 4, l4 + 12)
            if "checksum" in masks:
                zero(l4 + 16, l4 + 18)
            if "tcp-timestamp" in masks:
                _zero_tcp_timestamp(pkt, l4, l4_hdr_len)
        elif "checksum" in masks:
            zero(l4 + 6, l4 + 8)
    if proto == UDP and n >= l4 + 8:
        pkt[l4 + 8:l4 + 8] = UDP_PAD
    return bytes(pkt[:limit])


def _zero_tcp_timestamp(pkt: bytearray, l4: int, hdr_len: int) -> None:
    """Zero the TSval/TSecr of the TCP timestamp option (kind 8, length 10), if present."""
    i, end = l4 + 20, min(l4 + hdr_len, len(pkt))
    while i < end:
        kind = pkt[i]
        if kind == 0:  # end of options
            return
        if kind == 1:  # no-op
            i += 1
            continue
        if i + 1 >= end or pkt[i + 1] < 2:
            return
        if kind == 8 and pkt[i + 1] == 10:
            stop = min(i + 10, len(pkt))
            pkt[i + 2:stop] = bytes(stop - i - 2)
        i += pkt[i + 1]
