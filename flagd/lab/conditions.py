"""Network conditions per lab session: delay, jitter, loss, rate, MTU and TCP congestion control.

With `--conditions random` every session gets its own conditions, drawn in `generate.plan` from
the run's seed by a generator of their own (`--conditions none` draws nothing, and so plans
exactly the runs made before conditions existed: a tbf at the app's rate and nothing else). They
apply to the one link the session uses, its client's link to the router, in both directions, and
are reset when the session ends:

- delay, jitter and loss: netem on both ends of the link (so the round trip grows by twice the
  delay), with netem's own `rate` as the rate limit. Kernels without sch_netem (this project's
  build VM has none) get the rate from tbf and the rest from `delayline`: the router queues the
  link's forwarded packets to a user-space process (iptables' NFQUEUE) that holds each for the
  delay in both directions and drops the loss. Where neither works (`impairment` is None) the
  session's record says delay, jitter and loss were 0: the manifest shows what the link did, not
  what was drawn.
- MTU (1280-1500) on both ends of the link; the server learns it by path-MTU discovery.
- TCP congestion control: `congctl` on the client's route to the server and on the server's
  route to the client (the server namespace is shared by every client, a route is not). Not the
  namespace's default: outside the initial namespace the kernel lets that be only one of
  `tcp_allowed_congestion_control`, where a route may name any algorithm the kernel has.

Applications that size their transfers to the link (file transfer, torrent, streaming) are told
`budget_mbit`: what one TCP connection can move under the conditions (the link rate, or the
Mathis et al. bound for the drawn loss and round trip, whichever is lower).
"""

from __future__ import annotations

import math
import random
import select
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flagd.lab.topology import ROUTER_SERVER_ADDR, SERVER_NET, Client, Lab, LabError, tbf_argv

MODES = ("none", "random")
DELAY_MS = (1.0, 150.0)  # one way, drawn log-uniform
LOSS_PCT = (0.0, 2.0)  # each direction; half the sessions have none
RATE_MBIT = (1.0, 100.0)  # drawn log-uniform
MTU = (1280, 1500)  # 1280: the IPv6 minimum, the smallest MTU a real path keeps
DEFAULT_MTU = 1500
CONGESTION = ("cubic", "bbr", "reno")  # the ones drawn, of those the kernel offers
AVAILABLE_CC = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")


@dataclass(frozen=True)
class Conditions:
    """The conditions of one session's link (both directions)."""

    delay_ms: float  # one way: netem on each end of the link, so the RTT grows by twice this
    jitter_ms: float  # netem's jitter around the delay (at most a quarter of it)
    loss_pct: float  # random loss, each direction
    rate_mbit: float  # rate limit, each direction
    mtu: int  # both ends of the client link
    congestion: str  # TCP congestion control of the client and of the server towards it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Conditions:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @property
    def budget_mbit(self) -> float:
        """What one TCP connection can move under these conditions: the rate, or the Mathis et
        al. bound MSS/RTT * 1.22/sqrt(p) when loss makes that lower (with 30% to spare)."""
        if self.loss_pct <= 0:
            return self.rate_mbit
        rtt = max(2 * self.delay_ms + self.jitter_ms, 1.0) / 1000
        mss_bits = (self.mtu - 52) * 8  # IPv4 + TCP with timestamps
        mathis = mss_bits / rtt * 1.22 / math.sqrt(self.loss_pct / 100) / 1e6
        return round(max(0.1, min(self.rate_mbit, 0.7 * mathis)), 2)

    def without_netem(self) -> Conditions:
        """What a link without netem or a delay line gets: no delay, jitter or loss."""
        return replace(self, delay_ms=0.0, jitter_ms=0.0, loss_pct=0.0)


def available_congestion(probe: bool = True) -> tuple[str, ...]:
    """The congestion controls of CONGESTION this kernel offers (cubic and reno always are).
    bbr is often a module: one quiet `modprobe tcp_bbr` (root only) before giving up on it."""

    def offered() -> set[str]:
        try:
            return set(AVAILABLE_CC.read_text().split())
        except OSError:
            return {"cubic", "reno"}

    have = offered()
    if probe and "bbr" not in have:
        try:
            subprocess.run(["modprobe", "tcp_bbr"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        have = offered()
    return tuple(c for c in CONGESTION if c in have) or ("cubic",)


def draw(rng: random.Random, congestion: Sequence[str]) -> Conditions:
    """One session's conditions. Always the same number of draws, whatever `congestion` holds."""
    delay = round(math.exp(rng.uniform(math.log(DELAY_MS[0]), math.log(DELAY_MS[1]))), 1)
    jitter = math.floor(rng.uniform(0, delay / 4) * 10) / 10  # down: never above a quarter
    loss = rng.uniform(*LOSS_PCT) if rng.random() < 0.5 else 0.0
    rate = math.exp(rng.uniform(math.log(RATE_MBIT[0]), math.log(RATE_MBIT[1])))
    mtu = rng.randint(*MTU)
    pick = rng.random()
    cc = congestion[min(int(pick * len(congestion)), len(congestion) - 1)]
    return Conditions(delay, jitter, round(loss, 2), round(rate, 1), mtu, cc)


# -- applying them ---------------------------------------------------------------------------------


def netem_argv(ifname: str, c: Conditions) -> list[str]:
    """One netem qdisc with delay, jitter, loss and its own rate limit on `ifname`."""
    # netem holds a bandwidth-delay product of packets (its default limit, 1000, is less than
    # 150 ms at 100 Mbit/s): twice that, in packets of the link's MTU
    bdp = c.rate_mbit * 1e6 / 8 * (c.delay_ms + c.jitter_ms) / 1000 / c.mtu
    argv = ["tc", "qdisc", "replace", "dev", ifname, "root", "netem",
            "limit", str(max(1000, int(2 * bdp))), "delay", f"{c.delay_ms}ms"]  # fmt: skip
    if c.jitter_ms > 0:
        argv += [f"{c.jitter_ms}ms"]
    if c.loss_pct > 0:
        argv += ["loss", "random", f"{c.loss_pct}%"]
    return [*argv, "rate", f"{c.rate_mbit}mbit"]


def netem_available(lab: Lab) -> bool:
    """Whether this kernel has sch_netem (tried on the router's loopback, then removed)."""
    res = lab.run(lab.router, ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
    if res.returncode:
        return False
    lab.run(lab.router, ["tc", "qdisc", "del", "dev", "lo", "root"])
    return True


IPTABLES = "iptables-legacy"  # xt's NFQUEUE target: kernels without nft's queue expression have it


def _queue_rules(ifname: str, queues: tuple[int, int], add: bool) -> list[list[str]]:
    """The router's rules sending what it forwards from and to `ifname` to two queues."""
    op = "-A" if add else "-D"
    return [[IPTABLES, "-w", op, "FORWARD", flag, ifname, "-j", "NFQUEUE", "--queue-num", str(q)]
            for flag, q in (("-i", queues[0]), ("-o", queues[1]))]  # fmt: skip


def nfqueue_available(lab: Lab) -> bool:
    """Whether the router can queue forwarded packets to user space: the rule goes in (on
    loopback, which forwards nothing) and a delay line binds a queue."""
    if shutil.which(IPTABLES) is None:
        return False
    rules = _queue_rules("lo", (0, 1), add=True)
    if any(lab.run(lab.router, r).returncode for r in rules):
        return False
    for r in _queue_rules("lo", (0, 1), add=False):
        lab.run(lab.router, r)
    probe = [sys.executable, "-m", "flagd.lab.delayline", "--queues", "0,1", "--probe"]
    return lab.run(lab.router, probe).returncode == 0


def impairment(lab: Lab) -> str | None:
    """What puts delay, jitter and loss on a link here: "netem", "nfqueue" (`delayline`) or
    None (nothing can: sessions get rate, MTU and congestion control only)."""
    if netem_available(lab):
        return "netem"
    return "nfqueue" if nfqueue_available(lab) else None


def _ends(lab: Lab, client: Client) -> list[tuple[str, str]]:
    """(namespace, interface) of both ends of `client`'s link: the router's end shapes what goes
    to the client, the client's end what it sends."""
    return [(lab.router, f"c{client.index}"), (client.ns, client.ifname)]


def _must(lab: Lab, ns: str, argv: list[str]) -> None:
    res = lab.run(ns, argv)
    if res.returncode:
        raise LabError(f"{' '.join(argv[:4])} failed in {ns}: {res.stderr.strip()}")


def apply(lab: Lab, client: Client, c: Conditions, how: str | None, seed: int = 0) -> None:
    """Put `c` on `client`'s link: its delay, jitter and loss `how` `impairment` says (netem
    shapes the rate too, otherwise tbf does), its MTU, and the congestion control of the routes
    between the client and the server. `seed`: the delay line's loss and jitter draws."""
    for ns, ifname in _ends(lab, client):
        _must(lab, ns, netem_argv(ifname, c) if how == "netem" else tbf_argv(ifname, c.rate_mbit))
        _must(lab, ns, ["ip", "link", "set", "dev", ifname, "mtu", str(c.mtu)])
    if how == "nfqueue" and (c.delay_ms or c.jitter_ms or c.loss_pct):
        _start_delay_line(lab, client, c, seed)
    congestion(lab, client.ns, str(SERVER_NET), c.congestion)
    lab.congestion[client.index] = c.congestion
    lab.route_to(client)


def reset(lab: Lab, client: Client, rate_mbit: float) -> None:
    """Back to the plain link: tbf at `rate_mbit`, MTU 1500, no congctl on either route. Runs
    after every session with conditions."""
    died = _stop_delay_line(lab, client)
    for ns, ifname in _ends(lab, client):
        lab.run(ns, tbf_argv(ifname, rate_mbit))
        lab.run(ns, ["ip", "link", "set", "dev", ifname, "mtu", str(DEFAULT_MTU)])
    congestion(lab, client.ns, str(SERVER_NET), None)
    lab.congestion.pop(client.index, None)
    lab.route_to(client)
    if died is not None:  # its queues dropped every packet since: the session's link was cut
        log = lab.state / f"delayline-c{client.index}.log"
        raise LabError(f"the delay line of {client.ns} exited with status {died} during the "
                       f"session (its log: {log})")  # fmt: skip


def _queues(client: Client) -> tuple[int, int]:
    return 2 * client.index, 2 * client.index + 1  # from the client, to the client


def _start_delay_line(lab: Lab, client: Client, c: Conditions, seed: int) -> None:
    """A delay line for `client`'s link in the router, then the rules that feed it (in that
    order: a queue nobody reads drops what reaches it)."""
    argv = [sys.executable, "-m", "flagd.lab.delayline",
            "--queues", ",".join(map(str, _queues(client))), "--delay-ms", str(c.delay_ms),
            "--jitter-ms", str(c.jitter_ms), "--loss-pct", str(c.loss_pct), "--seed", str(seed)]  # fmt: skip
    with open(lab.state / f"delayline-c{client.index}.log", "ab") as log:  # its counts, errors
        proc = lab.popen(lab.router, argv, must_live=False, stdout=subprocess.PIPE, stderr=log,
                         text=True)  # fmt: skip
    lab.delay_lines[client.index] = proc
    started = select.select([proc.stdout], [], [], 10)[0]  # it binds its queues in milliseconds
    if not started or proc.stdout.readline().strip() != "ready":
        _stop_delay_line(lab, client)
        raise LabError(f"the delay line for {client.ns} did not start")
    for rule in _queue_rules(f"c{client.index}", _queues(client), add=True):
        _must(lab, lab.router, rule)


def _stop_delay_line(lab: Lab, client: Client) -> int | None:
    """Rules out first (packets forward directly again), then the line lets what it holds go.
    Returns the line's exit status if it had ended before it was told to (else None)."""
    proc = lab.delay_lines.pop(client.index, None)
    if proc is None:
        return None
    for rule in _queue_rules(f"c{client.index}", _queues(client), add=False):
        lab.run(lab.router, rule)
    died = proc.poll()
    proc.terminate()
    lab.reap(proc, timeout=5)
    return died


def congestion(lab: Lab, ns: str, dst: str, algorithm: str | None) -> None:
    """Set (or with None remove) the congestion control of `ns`'s route to `dst`, whatever
    that route is now (direct, or through a VPN session's tunnel)."""
    res = lab.run(ns, ["ip", "-o", "-4", "route", "show", "exact", dst])
    words = res.stdout.split()
    if res.returncode or not words:
        raise LabError(f"no route to {dst} in {ns}")
    if "congctl" in words:  # "congctl [lock] NAME"
        k = words.index("congctl")
        del words[k : k + (3 if words[k + 1] == "lock" else 2)]
    _must(
        lab, ns, ["ip", "route", "replace", *words, *(["congctl", algorithm] if algorithm else [])]
    )


def tunnel_route(addr: str, algorithm: str, add: bool) -> list[str]:
    """The server's /32 route to a VPN session's tunnel address, carrying the session's
    congestion control (the route to the whole tunnel range is shared by every client)."""
    if not add:
        return ["ip", "route", "del", f"{addr}/32"]
    return ["ip", "route", "replace", f"{addr}/32", "via", ROUTER_SERVER_ADDR, "congctl", algorithm]
