"""nDPI's expected per-flow output as an oracle for flagd's flow meter.

For each TCP/UDP flow line in nDPI's `result/<capture>.out` we look for a flagd flow with the
same (unordered) 5-tuple and the same packet count in each direction. Run as a script to print
the match rate and a breakdown of the mismatches:

    python tests/ndpi_oracle.py [NDPI_DIR]
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from flagd.dataset import capture_flows
from flagd.events import ip_text
from flagd.flows import FlowSettings
from flagd.packets import DecodeError

LINE = re.compile(
    r"^\s*\d+\s+(TCP|UDP)\s+(\S+?):(\d+)\s+<?->\s+(\S+?):(\d+)\s.*?"
    r"\[(\d+) pkts/\d+ bytes <?-> (\d+) pkts/\d+ bytes\]"
)


def ndpi_dir() -> Path:
    root = os.environ.get("FLAGD_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / "ndpi"


def expected_flows(out_file: Path) -> list[tuple[tuple, tuple[int, int]]]:
    """(unordered 5-tuple key, (packets a->b, packets b->a) in the key's order)."""
    flows = []
    for line in out_file.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if not m:
            continue
        proto, a, pa, b, pb, n_ab, n_ba = m.groups()
        flows.append(
            _key(proto, a.strip("[]"), int(pa), b.strip("[]"), int(pb), int(n_ab), int(n_ba))
        )
    return flows


def _key(proto, a, pa, b, pb, n_ab, n_ba):
    if (a, pa) <= (b, pb):
        return (proto, a, pa, b, pb), (n_ab, n_ba)
    return (proto, b, pb, a, pa), (n_ba, n_ab)


def flagd_flows(pcap: Path, settings: FlowSettings) -> dict[tuple, list[tuple[int, int]]]:
    found: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for f in capture_flows(pcap, settings):
        proto = {6: "TCP", 17: "UDP"}[f.proto]
        c, s = ip_text(f.client, f.version), ip_text(f.server, f.version)
        key, counts = _key(
            proto, c, f.client_port, s, f.server_port, f.pkts_toserver, f.pkts_toclient
        )
        found[key].append(counts)
    return found


def compare(pcap: Path, out_file: Path, settings: FlowSettings | None = None) -> Counter:
    """Outcome counts for one capture: matched, wrong-counts, missing (5-tuple not found)."""
    outcome: Counter = Counter()
    expected = expected_flows(out_file)
    if not expected:
        return outcome
    try:
        found = flagd_flows(pcap, settings or FlowSettings())
    except DecodeError:
        outcome["unreadable"] += len(expected)
        return outcome
    unmatched = []
    for key, counts in expected:
        candidates = found.get(key)
        if not candidates:
            outcome["missing"] += 1
        elif counts in candidates:
            candidates.remove(counts)
            outcome["matched"] += 1
        else:
            unmatched.append((key, counts))
    for key, counts in unmatched:
        # Several flagd flows adding up to nDPI's one: flagd ended the flow (timeout, port
        # reuse) where nDPI kept it open. Anything else is a count mismatch.
        candidates = found[key]
        total = tuple(map(sum, zip(*candidates, strict=True)))
        split = len(candidates) > 1 and total == counts
        outcome["split" if split else "wrong-counts"] += 1
        if split:
            candidates.clear()
    return outcome


def run_all(base: Path, settings: FlowSettings | None = None) -> tuple[Counter, dict[str, Counter]]:
    total: Counter = Counter()
    per_file: dict[str, Counter] = {}
    for out_file in sorted((base / "result").glob("*.out")):
        pcap = base / "pcap" / out_file.name.removesuffix(".out")
        if not pcap.exists():  # nDPI's results list a few captures the corpus does not ship
            continue
        c = compare(pcap, out_file, settings)
        per_file[pcap.name] = c
        total += c
    return total, per_file


if __name__ == "__main__":
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else ndpi_dir()
    total, per_file = run_all(base)
    n = sum(total.values())
    print(
        f"nDPI flows (TCP/UDP): {n}; "
        + ", ".join(f"{k} {v} ({v / n:.2%})" for k, v in total.most_common())
    )
    worst = sorted(per_file.items(), key=lambda kv: -(sum(kv[1].values()) - kv[1]["matched"]))
    for name, c in worst[:40]:
        bad = sum(c.values()) - c["matched"]
        if bad:
            print(f"  {name}: {dict(c)}")
