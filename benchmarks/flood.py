"""Floods of millions of distinct flows against flagd with default limits: memory, drops, evictions.

Two kinds (tests/floodgen.py): a SYN flood (one SYN per spoofed source, all removed by the
tcp-no-payload rule) and a random-5-tuple flood (one TCP/UDP packet with payload per flow, so
every flow reaches the classifier when it is evicted). 100 real TCP conversations are mixed in.

- replay: a generated pcap through `flagd replay --model <tiny bundle>` (lossless: it waits).
- live: `flagd run` on a veth pair while a TX-ring sender in the peer namespace sends one frame
  per flow at a fixed rate, and 10 real TLS connections run during the flood.

Peak RSS is the daemon's VmHWM (sampled from /proc; not ru_maxrss, which counts the forking
parent). Baseline: the same command on a 1,000-flow capture, measured in the same run; the ratio
flood/baseline is printed. The bound from the issue: < 1 GiB.

    python benchmarks/flood.py [--flows 2000000] [--modes replay,live] [--kinds syn,random]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

from tests import floodgen  # noqa: E402

MiB = 1 << 20


def summarize(log: Path, real: set[tuple[str, int]]) -> dict:
    """Figures from the event log: final stats, queue maxima, real flows classified."""
    n_flow = n_cls = real_cls = 0
    reasons: Counter[str] = Counter()
    shed = 0
    max_q = {"flows": 0, "batches": 0, "events": 0}
    final = None
    with open(log, "rb") as fh:
        for line in fh:
            e = json.loads(line)
            t = e["event_type"]
            if t == "flow":
                n_flow += 1
                reasons[e["flow"]["reason"]] += 1
                shed += e["flag"].get("unclassified") == "shed"
            elif t == "classification":
                n_cls += 1
                real_cls += (e["src_ip"], e["src_port"]) in real
            elif t == "stats":
                for k in max_q:
                    max_q[k] = max(max_q[k], e["stats"]["queues"][k])
                final = e["stats"]
    return {"flow_events": n_flow, "classification_events": n_cls, "real_classified": real_cls,
            "reasons": dict(reasons), "shed_flow_events": shed, "max_queues": max_q,
            "final": final}


def run_daemon(argv: list[str]) -> tuple[int, int, float, str]:
    """(exit code, peak RSS bytes, seconds, stderr) of a flagd command run to its end."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rss = floodgen.PeakRss(proc.pid, every=0.1)
    err = proc.stderr.read()
    code = proc.wait()
    return code, rss.stop(), time.monotonic() - t0, err


def replay(kind: str, flows: int, work: Path, bundle: Path) -> dict:
    cap = floodgen.write_flood(work / f"{kind}.pcap", kind, flows, real_flows=100)
    log = work / f"{kind}-replay.jsonl"
    log.unlink(missing_ok=True)
    code, peak, secs, err = run_daemon(
        [sys.executable, "-m", "flagd", "replay", str(cap.path), "--model", str(bundle), "--log",
         str(log), "--no-dashboard", "--stats-interval", "5"])
    real = {floodgen.real_key(i)[:2] for i in range(100)}
    out = {"mode": "replay", "kind": kind, "flows": flows, "packets": cap.packets, "exit": code,
           "peak_rss_mib": peak / MiB, "seconds": secs, "stderr": err.strip()[-300:],
           **summarize(log, real)}
    log.unlink()
    cap.path.unlink()
    return out


def live(kind: str, flows: int, rate: float, work: Path, bundle: Path) -> dict:
    from tests.netns import veth_pair

    log = work / f"{kind}-live.jsonl"
    log.unlink(missing_ok=True)
    with veth_pair(root_end=True) as pair:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flagd", "run", "--iface", pair.a.ifname, "--model", str(bundle),
             "--log", str(log), "--no-dashboard", "--stats-interval", "5"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        rss = floodgen.PeakRss(proc.pid, every=0.1)
        while not log.exists():
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            time.sleep(0.05)
        time.sleep(1.0)
        t0 = time.monotonic()
        gen = pair.popen(pair.b, [sys.executable, floodgen.__file__, "send", pair.b.ifname, kind,
                                  str(flows), str(rate)], stdout=subprocess.PIPE, text=True)
        tls = []
        while gen.poll() is None and len(tls) < 10:  # real traffic during the flood
            tls += pair.run_tls(conns=1, msgs=3, size=300, port=8443 + len(tls))
        sent = json.loads(gen.communicate()[0])
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        code = proc.wait()
        peak = rss.stop()
        secs = time.monotonic() - t0
    out = {"mode": "live", "kind": kind, "flows": flows, "rate": rate, "sent": sent,
           "exit": code, "peak_rss_mib": peak / MiB, "seconds": secs, "tls_flows": len(tls),
           "stderr": err.strip()[-300:], **summarize(log, {(f.src, f.sport) for f in tls})}
    log.unlink()
    return out


def baseline(work: Path, bundle: Path) -> float:
    cap = floodgen.write_flood(work / "base.pcap", "random", 1000, real_flows=5)
    code, peak, _, err = run_daemon(
        [sys.executable, "-m", "flagd", "replay", str(cap.path), "--model", str(bundle), "--log",
         str(work / "base.jsonl"), "--no-dashboard"])
    assert code == 0, err
    return peak / MiB


def show(r: dict, base: float) -> None:
    f = r["final"] or {}
    d = f.get("drops", {})
    print(f"{r['mode']:6s} {r['kind']:6s} {r['flows']:>9,} flows  exit {r['exit']}  "
          f"peak RSS {r['peak_rss_mib']:7.1f} MiB ({r['peak_rss_mib'] / base:.2f}x baseline)  "
          f"{r['seconds']:.0f} s")
    print(f"       flows metered {f.get('flows', 0):,}  packets {f.get('packets', 0):,}  "
          f"evictions {d.get('flow_table_eviction', 0):,}  kernel drops {d.get('kernel', 0):,}  "
          f"capture-queue drops {d.get('capture_queue', 0):,}  batch-queue drops "
          f"{d.get('batch_queue', 0):,}")
    print(f"       flow events {r['flow_events']:,}  classified {f.get('classified', 0):,}  "
          f"real flows classified {r['real_classified']}/{r.get('tls_flows', 100)}  "
          f"max queues {r['max_queues']}  end reasons {r['reasons']}")
    if r["mode"] == "live":
        s = r["sent"]
        print(f"       sender: {s['sent']:,} frames in {s['seconds']:.1f} s "
              f"({s['sent'] / s['seconds']:,.0f}/s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flows", type=int, default=2_000_000)
    p.add_argument("--modes", default="replay,live")
    p.add_argument("--kinds", default="syn,random")
    p.add_argument("--rate", type=float, default=100_000, help="live sender frames/s")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="flagd-flood-") as tmp:
        work = Path(tmp)
        bundle = floodgen.tiny_bundle(work / "bundle")
        base = baseline(work, bundle)
        print(f"baseline: flagd replay of 1,000 flows with the tiny model: peak RSS {base:.1f} MiB")
        for mode in a.modes.split(","):
            for kind in a.kinds.split(","):
                r = (replay(kind, a.flows, work, bundle) if mode == "replay"
                     else live(kind, a.flows, a.rate, work, bundle))
                results.append(r)
                show(r, base)
                ok = r["peak_rss_mib"] < 1024
                print(f"       {'OK' if ok else 'OVER'}: peak RSS {'<' if ok else '>='} 1 GiB", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "baseline_mib": base,
                                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
