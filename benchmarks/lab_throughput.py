"""Traffic-lab throughput: labelled flows per minute per class, and the run that gives 500 per class.

    python benchmarks/lab_throughput.py [--classes chat,email,...] [--tunnels none,wireguard]
                                        [--sessions 3] [--seconds 8] [--clients 1,4] [--keep DIR]
                                        [--conditions none|random]

Runs `flagd lab generate` once per --clients value (the first is the baseline, normally one
client namespace), each on the same classes, seed and session plan, and prints per class:
sessions kept/rejected, flows (all, and those of >= 10 packets), flows per minute of session
wall time, and the sessions and hours a run needs for 500 flows of every class. The ratio is the
throughput of each client count against the baseline's, measured in this process. Needs root and
the lab's Debian packages (`flagd lab doctor`); classes whose programs are missing are left out.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

from flagd.lab.apps import APPS, CLASSES
from flagd.lab.doctor import missing
from flagd.lab.generate import Settings, generate

BIG = 10  # packets: a flow this long carries more than a handshake or a tracker announce


def measure(settings: Settings) -> tuple[dict, float]:
    """Per-class figures of one run, and its wall time from first session start to last end."""
    t0 = time.time()
    starts: list[float] = []
    ends: list[float] = []

    def progress(rec: dict) -> None:
        ends.append(time.time())
        starts.append(ends[-1] - rec["seconds"])
        print(
            f"  {'ok  ' if rec['valid'] else 'SKIP'} {rec['id']:<46} {rec['seconds']:5.1f} s"
            + ("" if rec["valid"] else f"  ({rec['reason']})"),
            flush=True,
        )

    doc = generate(settings, progress)
    wall = (max(ends) - min(starts)) if ends else time.time() - t0
    total_session_seconds = sum(s["seconds"] for s in doc["sessions"]) or 1.0
    out: dict[str, dict] = {}
    for label, c in doc["summary"].items():
        kept = [s for s in doc["sessions"] if s["class"] == label and s["valid"]]
        big = sum(1 for s in kept for f in s["flows"] if f["packets"] >= BIG)
        # wall time attributed to the class in proportion to its share of session time
        share = c["seconds"] / total_session_seconds
        minutes = wall * share / 60
        per_session = c["flows"] / len(kept) if kept else 0.0
        tried = c["sessions"] + c["rejected"]
        keep_rate = c["sessions"] / tried if tried else 0.0
        need = math.ceil(500 / (per_session * keep_rate)) if per_session and keep_rate else None
        out[label] = {
            **c,
            "big_flows": big,
            "fpm": c["flows"] / minutes if minutes else 0.0,
            "big_fpm": big / minutes if minutes else 0.0,
            "sessions_needed": need,
            "seconds_per_session": c["seconds"] / tried if tried else 0.0,
        }
    return out, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--classes", default=",".join(CLASSES))
    p.add_argument("--apps", default="")
    p.add_argument("--tunnels", default="none")
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--clients", default="1", help="comma-separated; the first is the baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--conditions", default="random", choices=["none", "random"],
        help="network conditions per session (as flagd lab generate --conditions)",
    )  # fmt: skip
    p.add_argument("--keep", type=Path, help="keep the captures here (default: a temp dir)")
    a = p.parse_args()
    classes = []
    for label in a.classes.split(","):
        gone = {r.package for n in CLASSES.get(label, []) for r in missing(APPS[n].programs)}
        if label not in CLASSES or gone:
            print(
                f"leaving out {label}: "
                + (f"missing {' '.join(sorted(gone))}" if gone else "unknown")
            )
        else:
            classes.append(label)
    print(machine())
    counts = [int(x) for x in a.clients.split(",")]
    results = []
    root = a.keep or Path(tempfile.mkdtemp(prefix="flagd-lab-bench-"))
    try:
        for clients in counts:
            settings = Settings(
                out=root / f"clients{clients}",
                classes=tuple(classes),
                apps=tuple(x for x in a.apps.split(",") if x),
                tunnels=tuple(a.tunnels.split(",")),
                sessions=a.sessions,
                seconds=a.seconds,
                clients=clients,
                seed=a.seed,
                conditions=a.conditions,
            )
            print(
                f"\n{clients} client namespace(s), {a.sessions} sessions per class, ~{a.seconds:g} s each:"
            )
            t = time.time()
            per_class, wall = measure(settings)
            results.append((clients, per_class, wall, time.time() - t))
    finally:
        if a.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    base_clients, base, base_wall, _ = results[0]
    for clients, per_class, wall, total in results:
        print(
            f"\n== {clients} client(s): sessions {wall:.0f} s wall, {total:.0f} s with server start-up"
        )
        print(
            f"{'class':<20}{'kept':>5}{'rej':>5}{'flows':>7}{'>=10p':>7}{'flows/min':>11}"
            f"{'>=10p/min':>11}{'sess/500':>10}{'ratio':>7}"
        )
        hours = 0.0  # each class run just until it has 500 flows
        for label, c in per_class.items():
            ratio = (
                c["fpm"] / base[label]["fpm"] if base.get(label, {}).get("fpm") else float("nan")
            )
            need = c["sessions_needed"]
            print(
                f"{label:<20}{c['sessions']:>5}{c['rejected']:>5}{c['flows']:>7}{c['big_flows']:>7}"
                f"{c['fpm']:>11.1f}{c['big_fpm']:>11.1f}{need if need else '-':>10}{ratio:>7.2f}"
            )
            if need:
                hours += need * c["seconds_per_session"] / clients / 3600
        worst = max((c["sessions_needed"] or 0) for c in per_class.values())
        uniform = worst * sum(c["seconds_per_session"] for c in per_class.values()) / clients / 3600
        print(
            f"500 flows in every class: --sessions {worst} (the same count for every class) takes "
            f"about {uniform:.1f} h of sessions with {clients} client(s); {hours:.1f} h if each "
            "class ran only the sessions it needs"
        )
    print(f"\nratio: flows/min against the {base_clients}-client baseline of this run")


if __name__ == "__main__":
    main()
