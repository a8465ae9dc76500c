"""Event records as Suricata-EVE-shaped dicts: `flow`, `classification` and `stats`.

Every line starts with the EVE header (timestamp, event_type, flow_id, src_ip, src_port,
dest_ip, dest_port, proto) and then one object named after the event type. Addresses here are
the real ones: masking only ever applies to what the model sees.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources

from flagd.flows import Flow

PROTO_NAMES = {6: "TCP", 17: "UDP"}


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    confidence: float
    top_k: tuple[tuple[str, float], ...]
    packets_used: int
    model: str

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "confidence": round(self.confidence, 4),
            "top_k": [{"label": lab, "confidence": round(p, 4)} for lab, p in self.top_k],
            "packets_used": self.packets_used,
            "model": self.model,
        }


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


@dataclass(frozen=True, slots=True)
class EventHeader:
    """Fields every event carries beyond the EVE header itself."""

    sensor: str | None = None
    anonymize: Anonymizer | None = None


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
