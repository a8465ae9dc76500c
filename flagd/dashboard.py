"""The terminal dashboard: a pure `render(snapshot)` that rich's Live refreshes.

It never touches pipeline state; the main loop takes a snapshot (the stats dict plus the
recent-events buffer) and hands it here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

UNKNOWN = "unknown"  # flagd.openset.UNKNOWN, the label of a refused flow (no torch import here)


@dataclass(frozen=True, slots=True)
class Snapshot:
    source: str
    model: str
    stats: dict
    classes: dict[str, int] = field(default_factory=dict)
    recent: list[dict] = field(default_factory=list)  # classification events, oldest first
    notices: list[str] = field(default_factory=list)


def _throughput(s: dict) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(justify="right")
    lat = s["latency_ms"]
    rows = [
        ("packets/s", f"{s['packets_per_s']:,.0f}"),
        ("flows/s", f"{s['flows_per_s']:,.1f}"),
        ("packets", f"{s['packets']:,}"),
        ("flows", f"{s['flows']:,} ({s.get('flows_open', 0):,} open)"),
        ("classified", f"{s['classified']:,}"),
        ("latency p50/p99", "-" if lat["p50"] is None else f"{lat['p50']:.1f} / {lat['p99']:.1f} ms"),
        ("device", s["device"]),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _drops(s: dict) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(justify="right")
    for k, v in s["drops"].items():
        t.add_row(k.replace("_", " "), Text(f"{v:,}", style="red" if v else "green"))
    for k, v in sorted(s.get("skipped", {}).items()):
        t.add_row(f"skipped {k.replace('_', ' ')}", f"{v:,}")
    t.add_row("queues", " ".join(f"{k}={v}" for k, v in s["queues"].items()))
    return t


def _classes(counts: dict[str, int]) -> Table:
    """Flows per class, most first, then the flows the model refused ("unknown": open-set
    rejection or min_confidence) in a row of their own, so they never pass for a class."""
    t = Table("class", "flows", "", box=None, pad_edge=False)
    total = sum(counts.values()) or 1
    known = {k: v for k, v in counts.items() if k != UNKNOWN}
    for name, n in sorted(known.items(), key=lambda kv: -kv[1]):
        t.add_row(name, f"{n:,}", "█" * max(1, round(20 * n / total)))
    if counts:
        n = counts.get(UNKNOWN, 0)
        t.add_section()
        t.add_row(Text(UNKNOWN, style="yellow"), f"{n:,}",
                  Text("█" * round(20 * n / total), style="yellow"))
    return t


def _recent(events: list[dict]) -> Table:
    t = Table("time", "flow", "label", "conf", box=None, pad_edge=False)
    for ev in reversed(events):
        flow = f"{ev['proto']} {ev['src_ip']}:{ev['src_port']} → {ev['dest_ip']}:{ev['dest_port']}"
        flag = ev["flag"]
        label: str | Text = flag["label"]
        if label == UNKNOWN and flag.get("top_k"):  # what the model would have said
            label = Text(f"{UNKNOWN} ({flag['top_k'][0]['label']}?)", style="yellow")
        t.add_row(ev["timestamp"][11:19], flow, label, f"{flag['confidence']:.2f}")
    return t


def render(snap: Snapshot) -> Group:
    head = Text.assemble(("flagd ", "bold cyan"), f"{snap.source}  ", ("model ", "bold"), snap.model,
                         f"  up {snap.stats['uptime']:.0f}s")
    top = Table.grid(expand=True)
    top.add_column(ratio=1)
    top.add_column(ratio=1)
    top.add_column(ratio=1)
    top.add_row(Panel(_throughput(snap.stats), title="throughput"),
                Panel(_drops(snap.stats), title="drops"),
                Panel(_classes(snap.classes), title="classes"))
    parts = [head, top, Panel(_recent(snap.recent), title="recent classifications")]
    if snap.notices:
        parts.append(Text("\n".join(snap.notices[-3:]), style="yellow"))
    return Group(*parts)
