"""Event records as Suricata-EVE-shaped dicts: `flow`, `classification` and `stats`.

Every line starts with the EVE header (timestamp, event_type, flow_id, src_ip, src_port,
dest_ip, dest_port, proto, community_id) and then one object named after the event type.
Addresses here are the real ones: masking only ever applies to what the model sees.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

from flagd.flows import Flow

if TYPE_CHECKING:  # made in flagd.infer; importing it here would pull torch into events
    from flagd.infer import Prediction

PROTO_NAMES = {6: "TCP", 17: "UDP"}


def timestamp(ts: float) -> str:
    """EVE's timestamp format: microseconds and a numeric UTC offset."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+0000")


def ip_text(addr16: bytes, version: int) -> str:
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, addr16[:4])
    return socket.inet_ntop(socket.AF_INET6, addr16)


class Anonymizer:
    """Keyed-hash pseudonyms for addresses (HMAC-SHA256), stable for one key."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def __call__(self, ip: str) -> str:
        return "anon-" + hmac.new(self.key, ip.encode(), hashlib.sha256).hexdigest()[:16]


def community_id(saddr: bytes, daddr: bytes, proto: int, sport: int | None = None,
                 dport: int | None = None, seed: int = 0) -> str:
    """Community ID v1 of a flow (github.com/corelight/community-id-spec): the string Suricata
    and Zeek log for the same flow, so their records and ours join on it.

    saddr/daddr: packed addresses (4 or 16 bytes). sport/dport: TCP/UDP/SCTP ports, None for a
    protocol without ports. The endpoints are ordered (smaller address, then port, first), so
    both directions give the same ID. ICMP would need the spec's type/code mapping; flagd meters
    TCP and UDP only, so it is refused rather than hashed wrongly.
    """
    if proto in (1, 58):
        raise ValueError("community_id: ICMP/ICMPv6 need the type/code mapping, not implemented")
    if not 0 <= seed <= 0xFFFF:
        raise ValueError(f"community_id: seed {seed} is not a 16-bit value")
    ports = sport is not None and dport is not None
    if (daddr, dport if ports else 0) < (saddr, sport if ports else 0):
        saddr, daddr, sport, dport = daddr, saddr, dport, sport
    # seed, addresses, protocol and one pad byte, then the ports: all in network byte order
    data = struct.pack("!H", seed) + saddr + daddr + struct.pack("!BB", proto, 0)
    if ports:
        data += struct.pack("!HH", sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode()


@dataclass(frozen=True, slots=True)
class EventHeader:
    """Fields every event carries beyond the EVE header itself."""

    sensor: str | None = None
    anonymize: Anonymizer | None = None
    community_id_seed: int = 0  # flagd.toml's community_id_seed: must match Suricata's/Zeek's

    def __post_init__(self) -> None:
        seed = self.community_id_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 0xFFFF:
            raise ValueError(f"community_id_seed must be an integer 0-65535, not {seed!r}")


def _header(ts: float, event_type: str, f: Flow, h: EventHeader) -> dict:
    src, dst = ip_text(f.client, f.version), ip_text(f.server, f.version)
    if h.anonymize:
        src, dst = h.anonymize(src), h.anonymize(dst)
    ev = {
        "timestamp": timestamp(ts),
        "event_type": event_type,
        "flow_id": f.flow_id,
        "src_ip": src,
        "src_port": f.client_port,
        "dest_ip": dst,
        "dest_port": f.server_port,
        "proto": PROTO_NAMES.get(f.proto, str(f.proto)),
    }
    if not h.anonymize:
        # Left out of anonymized events: an unkeyed hash of the real addresses would let anyone
        # confirm a guessed address pair, which is what the pseudonyms are there to prevent.
        n = 4 if f.version == 4 else 16
        ev["community_id"] = community_id(f.client[:n], f.server[:n], f.proto, f.client_port,
                                          f.server_port, h.community_id_seed)
    if h.sensor:
        ev["sensor"] = h.sensor
    return ev


def flow_event(f: Flow, pred: Prediction | None, h: EventHeader = EventHeader(),
               unclassified: str | None = None) -> dict:
    """The flow-end record. `flag` repeats the label, or says why there is none."""
    ev = _header(f.last, "flow", f, h)
    ev["flow"] = {
        "pkts_toserver": f.pkts_toserver,
        "pkts_toclient": f.pkts_toclient,
        "bytes_toserver": f.bytes_toserver,
        "bytes_toclient": f.bytes_toclient,
        "start": timestamp(f.start),
        "end": timestamp(f.last),
        "age": int(f.last - f.start),
        "state": f.state,
        "reason": str(f.expiry),
    }
    flag: dict = {"relevant_packets": f.relevant}
    if pred is not None:
        flag["label"] = pred.label
        flag["confidence"] = round(pred.confidence, 4)
    elif f.relevant == 0:
        # Every packet fell to a relevance rule: say which one removed the flow.
        flag["dropped_by"] = f.drop_rule or "no-relevant-packet"
    elif unclassified:
        flag["unclassified"] = unclassified
    ev["flag"] = flag
    return ev


def classification_event(f: Flow, pred: Prediction, ts: float, h: EventHeader = EventHeader()) -> dict:
    ev = _header(ts, "classification", f, h)
    ev["flag"] = pred.to_dict()
    return ev


def stats_event(ts: float, stats: dict, sensor: str | None = None) -> dict:
    ev: dict = {"timestamp": timestamp(ts), "event_type": "stats"}
    if sensor:
        ev["sensor"] = sensor
    ev["stats"] = stats
    return ev


@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema (draft 2020-12) of every event type flagd writes."""
    return json.loads(resources.files("flagd").joinpath("schema/events.json").read_text())
