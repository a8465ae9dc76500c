"""Floods of millions of distinct flows against flagd with default limits: memory, drops, evictions.

Two kinds (tests/floodgen.py): a SYN flood (one SYN per spoofed source, all removed by the
tcp-no-payload rule) and a random-5-tuple flood (one TCP/UDP packet with payload per flow, so
every flow reaches the classifier when it is evicted). 100 real TCP conversations are mixed in.

- replay: a generated pcap through `flagd replay --model <tiny bundle>` (lossless: it waits).
- live: `flagd run` on a veth pair while a TX-ring sender in the peer namespace sends one frame
  per flow at a fixed rate, and 10 real TLS connections run during the flood.
- wide (replay): a SYN flood wider than the table: 2,000 real 8-packet UDP flows with 270,000
  new flows between two of their packets (the default table holds 262,144), replayed with the
  shipped model. Each real flow must come out whole and be classified once from its first K.
- loss (live): the same mix live, at rising flood rates against a small table, each real flow
  sending a packet a second: the first rate at which a real flow is split or missed.

`--flagd-root DIR` runs the daemon from another checkout (a `git worktree` of an older commit),
so "before" and "after" are measured by the same script in the same run.
Peak RSS is the daemon's VmHWM (sampled from /proc; not ru_maxrss, which counts the forking
parent). Baseline: the same command on a 1,000-flow capture, measured in the same run; the ratio
flood/baseline is printed. The bound from the issue: < 1 GiB.

    python benchmarks/flood.py [--flows 2000000] [--modes replay,live,wide,loss] [--kinds syn,random]
"""

from __future__ import annotations

import argparse
import json
import os
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
FLAGD_ROOT = ROOT  # the checkout whose flagd the daemon runs (--flagd-root)


def flagd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "flagd", *argv]


def daemon_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(FLAGD_ROOT)}


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
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=daemon_env(), cwd=FLAGD_ROOT)
    rss = floodgen.PeakRss(proc.pid, every=0.1)
    err = proc.stderr.read()
    code = proc.wait()
    return code, rss.stop(), time.monotonic() - t0, err


def replay(kind: str, flows: int, work: Path, bundle: Path) -> dict:
    cap = floodgen.write_flood(work / f"{kind}.pcap", kind, flows, real_flows=100)
    log = work / f"{kind}-replay.jsonl"
    log.unlink(missing_ok=True)
    code, peak, secs, err = run_daemon(
        flagd("replay", str(cap.path), "--model", str(bundle), "--log",
              str(log), "--no-dashboard", "--stats-interval", "5"))
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
            flagd("run", "--iface", pair.a.ifname, "--model", str(bundle),
                  "--log", str(log), "--no-dashboard", "--stats-interval", "5"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=daemon_env(),
            cwd=FLAGD_ROOT)
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


def real_outcome(log: Path, keys: set[tuple], packets: int) -> dict:
    """How the real flows came out: whole (one flow event with all its packets, classified once),
    and the classification packet counts."""
    flows: Counter = Counter()
    whole: Counter = Counter()
    cls: Counter = Counter()
    used: Counter = Counter()
    final = None
    with open(log, "rb") as fh:
        for line in fh:
            e = json.loads(line)
            t = e["event_type"]
            if t == "stats":
                final = e["stats"]
                continue
            k = (e["src_ip"], e["src_port"], e["dest_ip"], e["dest_port"])
            if k not in keys:
                continue
            if t == "flow":
                flows[k] += 1
                whole[k] += e["flow"]["pkts_toserver"] + e["flow"]["pkts_toclient"] == packets
            elif t == "classification":
                cls[k] += 1
                used[e["flag"]["packets_used"]] += 1
    ok = [k for k in keys if flows[k] == 1 and whole[k] == 1 and cls[k] == 1]
    return {"real": len(keys), "whole_and_classified_once": len(ok),
            "flow_events": sum(flows.values()), "classifications": sum(cls.values()),
            "packets_used": dict(used), "final": final}


def wide(flows: int, real: int, gap: int, work: Path, max_flows: int | None) -> dict:
    """A SYN flood `gap` new flows wide between real-flow packets, shipped model, `flagd replay`."""
    cap = floodgen.write_flood(work / "wide.pcap", "syn", flows, real_flows=real, real_packets=8,
                               real_proto=17, real_gap=gap)
    log = work / "wide.jsonl"
    log.unlink(missing_ok=True)
    extra = []
    if max_flows:
        cfg = work / "wide.toml"
        cfg.write_text(f"max_flows = {max_flows}\n")
        extra = ["--config", str(cfg)]
    code, peak, secs, err = run_daemon(flagd("replay", str(cap.path), "--log", str(log),
                                             "--no-dashboard", "--stats-interval", "5", *extra))
    keys = {floodgen.real_key(i) for i in range(real)}
    out = {"mode": "wide", "flows": flows, "real": real, "gap": gap, "max_flows": max_flows,
           "exit": code, "peak_rss_mib": peak / MiB, "seconds": secs,
           "stderr": err.strip()[-300:], **real_outcome(log, keys, 8)}
    log.unlink()
    cap.path.unlink()
    return out


_REAL_SENDER = """
import socket, sys, time
dst, n, packets, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", 20000 + i))
    socks.append(s)
for k in range(packets):
    for i, s in enumerate(socks):
        s.sendto(bytes([0x17, 3, 3, i % 256]) + bytes(60), (dst, 443))
    time.sleep(every)
"""


def loss_point(rate: float, seconds: float, real: int, max_flows: int, work: Path,
               bundle: Path) -> dict:
    """One live run: a SYN flood at `rate` new flows/s for `seconds`, and `real` UDP flows of 8
    packets one second apart starting a second in."""
    from tests.netns import veth_pair

    log = work / "loss.jsonl"
    log.unlink(missing_ok=True)
    cfg = work / "loss.toml"
    cfg.write_text(f"max_flows = {max_flows}\n")
    with veth_pair(root_end=True) as pair:
        proc = subprocess.Popen(
            flagd("run", "--iface", pair.a.ifname, "--model", str(bundle), "--config", str(cfg),
                  "--log", str(log), "--no-dashboard", "--stats-interval", "1"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=daemon_env(),
            cwd=FLAGD_ROOT)
        while not log.exists():
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            time.sleep(0.05)
        time.sleep(1.0)
        n = int(rate * seconds)
        gen = pair.popen(pair.b, [sys.executable, floodgen.__file__, "send", pair.b.ifname, "syn",
                                  str(n), str(rate)], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        sender = pair.popen(pair.b, [sys.executable, "-c", _REAL_SENDER, pair.a.addr, str(real),
                                     "8", "1.0"])
        sender.wait(timeout=60)
        sent = json.loads(gen.communicate(timeout=120)[0])
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        code = proc.wait()
        keys = {(pair.b.addr, 20000 + i, pair.a.addr, 443) for i in range(real)}
    out = {"rate": rate, "flood_flows": n, "sent": sent, "exit": code,
           "stderr": err.strip()[-300:], **real_outcome(log, keys, 8)}
    log.unlink()
    return out


def loss(rates: list[float], seconds: float, real: int, max_flows: int, work: Path,
         bundle: Path) -> dict:
    points = []
    first_lost = None
    for rate in rates:
        r = loss_point(rate, seconds, real, max_flows, work, bundle)
        points.append(r)
        f = r["final"] or {}
        d = f.get("drops", {})
        print(f"       {rate:>9,.0f} new flows/s: real flows whole and classified once "
              f"{r['whole_and_classified_once']}/{real}  (flow events {r['flow_events']}, "
              f"kernel drops {d.get('kernel', 0):,}, evictions {d.get('flow_table_eviction', 0):,}"
              f", of them empty {d.get('flow_table_eviction_empty', '-')}), sender "
              f"{r['sent']['sent'] / r['sent']['seconds']:,.0f}/s", flush=True)
        if first_lost is None and r["whole_and_classified_once"] < real:
            first_lost = rate
    return {"mode": "loss", "max_flows": max_flows, "real": real, "points": points,
            "first_rate_losing_a_real_flow": first_lost}


def baseline(work: Path, bundle: Path) -> float:
    cap = floodgen.write_flood(work / "base.pcap", "random", 1000, real_flows=5)
    code, peak, _, err = run_daemon(
        flagd("replay", str(cap.path), "--model", str(bundle), "--log",
              str(work / "base.jsonl"), "--no-dashboard"))
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
    p.add_argument("--flagd-root", type=Path, default=ROOT,
                   help="checkout whose flagd the daemon runs (e.g. a git worktree of the old commit)")
    p.add_argument("--real", type=int, default=2000, help="wide: real UDP flows")
    p.add_argument("--gap", type=int, default=270_000, help="wide: new flows between real packets")
    p.add_argument("--max-flows", type=int, help="wide: table bound (default: flagd's 262,144)")
    p.add_argument("--loss-rates", default="2500,5000,10000,20000,40000",
                   help="loss: flood rates, new flows/s")
    p.add_argument("--loss-table", type=int, default=5000, help="loss: max_flows")
    p.add_argument("--loss-real", type=int, default=10, help="loss: real UDP flows")
    a = p.parse_args()
    global FLAGD_ROOT
    FLAGD_ROOT = a.flagd_root.resolve()
    print(f"machine: {machine()}; daemon from {FLAGD_ROOT}")
    results = []
    with tempfile.TemporaryDirectory(prefix="flagd-flood-") as tmp:
        work = Path(tmp)
        bundle = floodgen.tiny_bundle(work / "bundle")
        base = baseline(work, bundle)
        print(f"baseline: flagd replay of 1,000 flows with the tiny model: peak RSS {base:.1f} MiB")
        for mode in a.modes.split(","):
            if mode == "wide":
                r = wide(a.flows, a.real, a.gap, work, a.max_flows)
                results.append(r)
                ok = r["peak_rss_mib"] < 1024
                print(f"wide   syn    {r['flows']:>9,} flows, {r['real']:,} real UDP flows "
                      f"{r['gap']:,} new flows apart, max_flows {r['max_flows'] or 'default'}: "
                      f"exit {r['exit']}  {r['seconds']:.0f} s\n"
                      f"       real flows whole and classified once "
                      f"{r['whole_and_classified_once']}/{r['real']}  (flow events "
                      f"{r['flow_events']:,}, classifications {r['classifications']:,}, "
                      f"packets used {r['packets_used']})\n"
                      f"       peak RSS {r['peak_rss_mib']:.1f} MiB with the shipped model: "
                      f"{'OK <' if ok else 'OVER >='} 1 GiB", flush=True)
                continue
            if mode == "loss":
                print(f"loss   syn flood live, max_flows {a.loss_table:,}, {a.loss_real} real UDP "
                      f"flows of 8 packets one second apart", flush=True)
                r = loss([float(x) for x in a.loss_rates.split(",")], 10.0, a.loss_real,
                         a.loss_table, work, bundle)
                results.append(r)
                print(f"       first flood rate losing a real flow: "
                      f"{r['first_rate_losing_a_real_flow'] or 'none of these'}", flush=True)
                continue
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
