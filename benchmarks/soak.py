"""Soak: `flagd run` on a veth pair at a steady rate for 10 minutes; does memory grow?

A TX-ring sender in the peer namespace (tests/floodgen.py) sends one packet per new flow at a
steady rate (random 5-tuples with payload, so every flow is classified when it goes idle), and
real TLS connections run every few seconds beside it. The daemon runs with default limits
(idle timeout 120 s), so its flow table fills for two minutes and then holds steady: the
warm-up. Resident memory (VmRSS) is sampled every 10 s; after the warm-up a least-squares line
through the samples gives the slope. Baseline for the ratio: the RSS at the end of the warm-up.

    python benchmarks/soak.py [--minutes 10] [--warmup 3] [--rate 1000]
    python benchmarks/soak.py --replay-hours 1 [--model]   (hours of churn on the capture clock)
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

from tests import floodgen  # noqa: E402

MiB = 1 << 20


def replay_soak(hours: float, rate: float, model: bool, every: float) -> None:
    """The same churn on the capture's own clock: `hours` of `rate` new flows/s replayed as
    fast as flagd goes, so hours of flow-table churn take minutes. RSS against flows metered."""
    with tempfile.TemporaryDirectory(prefix="flagd-soak-") as tmp:
        work = Path(tmp)
        n = int(hours * 3600 * rate)
        cap = floodgen.write_flood(work / "churn.pcap", "random", n, pps=rate)
        argv = [sys.executable, "-m", "flagd", "replay", str(cap.path), "--log", str(work / "ev.jsonl"),
                "--no-dashboard", "--stats-interval", "5"]
        argv += ["--model", str(floodgen.tiny_bundle(work / "bundle"))] if model else ["--no-model"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        rss = floodgen.PeakRss(proc.pid, every=every)
        t0 = time.monotonic()
        err = proc.stderr.read()
        code = proc.wait()
        rss.stop()
        stats = [json.loads(ln)["stats"] for ln in (work / "ev.jsonl").read_text().splitlines()
                 if '"event_type":"stats"' in ln]
    # flows metered at each sample time, from the stats events' uptime
    up = np.array([s_["uptime"] for s_ in stats])
    fl = np.array([s_["flows"] for s_ in stats])
    # only samples the stats events bracket: outside them np.interp would clamp the flow count
    samples = [(t - t0, r / MiB) for t, r in rss.samples if up[0] <= t - t0 <= up[-1]]
    flows_at = np.interp([t for t, _ in samples], up, fl)
    print(f"replay soak: {hours:g} h of {rate:,.0f} new flows/s on the capture clock = {n:,} flows, "
          f"{'tiny model' if model else 'no model'}; exit {code} {err.strip()[-200:]}")
    print("RSS samples (flows metered, MiB): " + ", ".join(
        f"{f / 1e6:.2f}M:{r:.0f}" for f, (_, r) in zip(flows_at, samples, strict=True)))
    half = [(f, r) for f, (_, r) in zip(flows_at, samples, strict=True) if n / 4 <= f < 0.999 * n]
    if len(half) >= 3:
        x = np.array([f for f, _ in half]) / 1e6
        y = np.array([r for _, r in half])
        print(f"after the first quarter: RSS {y[0]:.1f} -> {y[-1]:.1f} MiB (max {y.max():.1f}); "
              f"slope {np.polyfit(x, y, 1)[0]:+.2f} MiB per million flows "
              f"(= {np.polyfit(x, y, 1)[0] * rate * 3600 / 1e6:+.1f} MiB per hour at {rate:,.0f} flows/s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0, help="minutes left out of the slope")
    p.add_argument("--rate", type=float, default=1000.0, help="new flows (frames) per second")
    p.add_argument("--every", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--json", type=Path)
    p.add_argument("--replay-hours", type=float, default=0,
                   help="instead: replay this many hours of churn on the capture clock")
    p.add_argument("--model", action="store_true", help="with --replay-hours: classify too")
    a = p.parse_args()
    if a.replay_hours:
        print(f"machine: {machine()}")
        replay_soak(a.replay_hours, a.rate, a.model, every=2.0)
        return
    from tests.netns import netns_unavailable, veth_pair

    if why := netns_unavailable():
        sys.exit(f"soak: {why}")
    print(f"machine: {machine()}")
    seconds = a.minutes * 60
    with tempfile.TemporaryDirectory(prefix="flagd-soak-") as tmp, veth_pair(root_end=True) as pair:
        work = Path(tmp)
        bundle = floodgen.tiny_bundle(work / "bundle")
        log = work / "events.jsonl"
        proc = subprocess.Popen(
            [sys.executable, "-m", "flagd", "run", "--iface", pair.a.ifname, "--model", str(bundle),
             "--log", str(log), "--no-dashboard", "--stats-interval", "10"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not log.exists():
            if proc.poll() is not None:
                sys.exit(proc.stderr.read())
            time.sleep(0.05)
        rss = floodgen.PeakRss(proc.pid, every=a.every)
        t0 = time.monotonic()
        gen = pair.popen(pair.b, [sys.executable, floodgen.__file__, "send", pair.b.ifname,
                                  "random", str(int(a.rate * seconds)), str(a.rate)],
                         stdout=subprocess.PIPE, text=True)
        tls = 0
        while gen.poll() is None:
            pair.run_tls(conns=2, msgs=3, size=300, port=8443 + tls % 100)
            tls += 2
            time.sleep(5)
        sent = json.loads(gen.communicate()[0])
        sending_until = time.monotonic() - t0
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        code = proc.wait()
        peak = rss.stop()
        stats = [json.loads(ln)["stats"] for ln in log.read_text().splitlines()
                 if '"event_type":"stats"' in ln]
    samples = [(t - t0, r / MiB) for t, r in rss.samples if t >= t0]
    # The slope covers the steady state only: from the end of the warm-up until the sender
    # stops. After that, shutdown flushes every open flow at once (~120,000), a one-off spike.
    warm = [(t, r) for t, r in samples if a.warmup * 60 <= t <= sending_until]
    tt = np.array([t for t, _ in warm]) / 60
    rr = np.array([r for _, r in warm])
    slope = float(np.polyfit(tt, rr, 1)[0]) if len(warm) >= 3 else float("nan")
    final = stats[-1] if stats else {}
    print(f"daemon exit {code}{'; stderr: ' + err.strip()[-300:] if err.strip() else ''}")
    print(f"sender: {sent['sent']:,} frames (one new flow each) in {sent['seconds']:.0f} s "
          f"({sent['sent'] / sent['seconds']:,.0f}/s); {tls} TLS connections beside them")
    print("RSS samples (s, MiB): " + ", ".join(f"{t:.0f}:{r:.1f}" for t, r in samples))
    if warm:
        print(f"from the {a.warmup:g}-minute warm-up to the sender's end ({sending_until:.0f} s): "
              f"{len(warm)} samples, RSS {rr[0]:.1f} -> "
              f"{rr[-1]:.1f} MiB (min {rr.min():.1f}, max {rr.max():.1f}); ratio last/first "
              f"{rr[-1] / rr[0]:.3f}")
        print(f"slope: {slope:+.3f} MiB/min = {slope * 60:+.1f} MiB/hour; peak (VmHWM) {peak / MiB:.1f} MiB")
    d = final.get("drops", {})
    print(f"final stats: flows {final.get('flows', 0):,}  packets {final.get('packets', 0):,}  "
          f"classified {final.get('classified', 0):,}  drops {d}  "
          f"max queues {max((s['queues']['events'] for s in stats), default=0)} events, "
          f"{max((s['queues']['flows'] for s in stats), default=0)} flow chunks")
    # The daemon's uptime runs ahead of t0 (it starts first), so this stays before SIGTERM:
    # the shutdown flush that follows sheds open flows at the batch queue, counted apart above.
    running = [s_ for s_ in stats if not s_.get("final") and s_["uptime"] <= sending_until]
    if running:
        print(f"drops while sending (last stats before the sender's end, {running[-1]['uptime']:.0f} s): "
              f"{running[-1]['drops']}; classified {running[-1]['classified']:,}")
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "samples": samples, "slope_mib_per_min": slope,
                                      "peak_mib": peak / MiB, "final": final}, indent=1))


if __name__ == "__main__":
    main()
