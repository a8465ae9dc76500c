"""Pure decoding of link, IP, TCP and UDP headers from raw frame buffers into columnar records.

(Stub: the dataclass below is the contract; `decode` is being written.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from flagd.frames import Frames


class DecodeError(ValueError):
    """The one error type the capture readers and decoders raise for bad input."""


class Skip(enum.IntEnum):
    """Why a frame is not a TCP/UDP packet the flow meter can use (0 = usable)."""

    OK = 0
    TRUNCATED = 1  # too short for the headers it claims
    UNKNOWN_LINK = 2  # link type flagd does not decode
    NON_IP = 3  # ARP, LLDP, ... (after VLAN tags)
    BAD_IP = 4  # bad version, header length or total length
    FRAGMENT = 5  # IPv4/IPv6 fragment other than the first (no ports)
    OTHER_PROTO = 6  # ICMP, IGMP, ESP, GRE, ... (not TCP/UDP)


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
    ip_off: np.ndarray  # int64 absolute offset of the IP header in frames.data
    ip_caplen: np.ndarray  # int32 captured bytes from the IP header to the end of the record
    l4_off: np.ndarray  # int64 absolute offset of the TCP/UDP header in frames.data
    l4_hdr_len: np.ndarray  # uint8 TCP data offset * 4, or 8 for UDP
    payload_len: np.ndarray  # int32 transport payload bytes on the wire (from IP lengths)
    wirelen: np.ndarray  # int32 (same as frames.wirelen)

    def __len__(self) -> int:
        return len(self.skip)


def decode(frames: Frames) -> Packets:
    raise NotImplementedError
