"""The lab's user-space delay line (kernels without sch_netem): what it costs a link.

    python benchmarks/delay_line.py [--seconds 5] [--rates 100,10000]

One lab client, a TCP bulk transfer from the client to a sink on the server for --seconds, per
rate: first the plain link (tbf at the rate: the baseline), then the same link with the delay
line holding every packet 1 ms each way (`conditions.apply(..., "nfqueue")`). Prints throughput,
the ratio to the baseline measured in this process, the delay line's CPU time per forwarded
packet and the packets per second one core would carry at that cost. 100 Mbit/s is the fastest
link the lab draws; 10000 is as good as unshaped and shows the ceiling. Needs root.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

from flagd.lab import conditions
from flagd.lab.conditions import Conditions
from flagd.lab.topology import build_lab

SINK = """
import socket, sys
srv = socket.create_server((sys.argv[1], 9100))
while True:
    conn, _ = srv.accept()
    while conn.recv(1 << 16):
        pass
    conn.close()
"""
SEND = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 9100))
buf, n, t0 = bytes(1 << 16), 0, time.monotonic()
while time.monotonic() - t0 < float(sys.argv[2]):
    s.sendall(buf)
    n += len(buf)
s.close()
print(n * 8 / (time.monotonic() - t0) / 1e6)
"""


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def forwarded(lab, client) -> int:
    """Packets the router has forwarded to and from `client` (its link's counters)."""
    out = lab.run(lab.router, ["cat", f"/sys/class/net/c{client.index}/statistics/rx_packets",
                               f"/sys/class/net/c{client.index}/statistics/tx_packets"]).stdout
    return sum(map(int, out.split()))


def transfer(lab, client, seconds: float) -> float:
    res = lab.run(client.ns, [sys.executable, "-c", SEND, lab.server_addr, str(seconds)],
                  timeout=seconds + 30)
    if res.returncode:
        raise SystemExit(f"transfer failed: {res.stderr.strip()}")
    return float(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rates", default="100,10000", help="link rates in Mbit/s, comma-separated")
    a = ap.parse_args()
    print(machine())
    with build_lab(1) as lab:
        if not conditions.nfqueue_available(lab):
            raise SystemExit(f"no {conditions.IPTABLES} or no NFQUEUE here: nothing to measure")
        (client,) = lab.clients
        lab.popen(lab.server, [sys.executable, "-c", SINK, lab.server_addr])
        time.sleep(0.5)
        print(f"{'link':>12} {'plain Mbit/s':>13} {'delay line':>11} {'ratio':>6} "
              f"{'CPU us/pkt':>11} {'pkts/s/core':>12}")  # fmt: skip
        for rate in map(float, a.rates.split(",")):
            cond = Conditions(1.0, 0.0, 0.0, rate, 1500, "cubic")
            conditions.apply(lab, client, cond, None)
            plain = transfer(lab, client, a.seconds)
            conditions.reset(lab, client, rate)
            conditions.apply(lab, client, cond, "nfqueue")
            (line,) = lab.delay_lines.values()
            cpu0, pkts0 = cpu_seconds(line.pid), forwarded(lab, client)
            delayed = transfer(lab, client, a.seconds)
            cpu = cpu_seconds(line.pid) - cpu0
            pkts = forwarded(lab, client) - pkts0
            conditions.reset(lab, client, rate)
            us = cpu / max(pkts, 1) * 1e6
            print(f"{rate:>7.0f} Mbit {plain:>13.1f} {delayed:>11.1f} {delayed / plain:>6.2f} "
                  f"{us:>11.1f} {1e6 / us if us else float('inf'):>12.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
