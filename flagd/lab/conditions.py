"""Network conditions per lab session: delay, jitter, loss, rate, MTU and TCP congestion control.

With `--conditions random` every session gets its own conditions, drawn in `generate.plan` from
the run's seed by a generator of their own (`--conditions none` draws nothing, and so plans
exactly the runs made before conditions existed: a tbf at the app's rate and nothing else). They
apply to the one link the session uses, its client's link to the router, in both directions, and
are reset when the session ends:

- delay, jitter and loss: netem on both ends of the link (so the round trip grows by twice the
  delay), with netem's own `rate` as the rate limit. Kernels without sch_netem (this project's
  build VM has none: `netem_available`) get the rate from tbf alone, and the session's record says
  delay, jitter and loss were 0: the manifest shows what the link did, not what was drawn.
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
import subprocess
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
        """What a kernel without sch_netem applies: no delay, jitter or loss."""
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


def _ends(lab: Lab, client: Client) -> list[tuple[str, str]]:
    """(namespace, interface) of both ends of `client`'s link: the router's end shapes what goes
    to the client, the client's end what it sends."""
    return [(lab.router, f"c{client.index}"), (client.ns, client.ifname)]


def _must(lab: Lab, ns: str, argv: list[str]) -> None:
    res = lab.run(ns, argv)
    if res.returncode:
        raise LabError(f"{' '.join(argv[:4])} failed in {ns}: {res.stderr.strip()}")


def apply(lab: Lab, client: Client, c: Conditions, netem: bool) -> None:
    """Put `c` on `client`'s link (netem, or tbf where `netem` is False), its MTU, and the
    congestion control of the routes between the client and the server."""
    for ns, ifname in _ends(lab, client):
        _must(lab, ns, netem_argv(ifname, c) if netem else tbf_argv(ifname, c.rate_mbit))
        _must(lab, ns, ["ip", "link", "set", "dev", ifname, "mtu", str(c.mtu)])
    congestion(lab, client.ns, str(SERVER_NET), c.congestion)
    lab.congestion[client.index] = c.congestion
    lab.route_to(client)


def reset(lab: Lab, client: Client, rate_mbit: float) -> None:
    """Back to the plain link: tbf at `rate_mbit`, MTU 1500, no congctl on either route. Runs
    after every session with conditions."""
    for ns, ifname in _ends(lab, client):
        lab.run(ns, tbf_argv(ifname, rate_mbit))
        lab.run(ns, ["ip", "link", "set", "dev", ifname, "mtu", str(DEFAULT_MTU)])
    congestion(lab, client.ns, str(SERVER_NET), None)
    lab.congestion.pop(client.index, None)
    lab.route_to(client)


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
    _must(lab, ns, ["ip", "route", "replace", *words, *(["congctl", algorithm] if algorithm else [])])


def tunnel_route(addr: str, algorithm: str, add: bool) -> list[str]:
    """The server's /32 route to a VPN session's tunnel address, carrying the session's
    congestion control (the route to the whole tunnel range is shared by every client)."""
    if not add:
        return ["ip", "route", "del", f"{addr}/32"]
    return ["ip", "route", "replace", f"{addr}/32", "via", ROUTER_SERVER_ADDR, "congctl", algorithm]
