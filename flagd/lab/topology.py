"""The lab's network: client, router and server namespaces joined by veth pairs, and their teardown.

Layout (every address from two RFC 5737 documentation ranges, which are never routed anywhere):

    client k  "out" 203.0.113.(128+4k+2)/30  <->  "c<k>" 203.0.113.(128+4k+1)/30  router
    router    "srv" 203.0.113.1/25           <->  "in"  203.0.113.2/25            server
    tunnels (VPN modes)                             198.51.100.0/24

Clients route the server's 203.0.113.0/25 via the router, the server routes each client's /30
(and the tunnel range) via the router, and the router forwards. There is no default route and no
NAT anywhere, and nothing is created in the caller's own namespace (veth pairs are made inside
the router's namespace with the peer put straight into its neighbour's), so no lab packet can
reach a real interface. The capture point is each client's "out" link: what a sensor upstream of
that host would see.

Segmentation offloads are turned off on every lab interface (otherwise a capture holds 64 KiB
GSO super-frames instead of wire-sized segments) and IPv6 is disabled (no ND/MLD chatter).

Teardown kills every process whose network namespace is one of the lab's (daemons that fork into
the background included), removes the namespaces (which destroys their veths) and the run's state
directory. `reap_stale()` does the same for labs whose owning process has died (a `kill -9`ed
run), recognised by the pid in their names: `flagdlab-<pid>-<role>`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "flagdlab"
NETNS_DIR = Path("/run/netns")
CLIENT_NET = ipaddress.ip_network("203.0.113.128/25")  # TEST-NET-3's upper half: client links, a /30 each
TUNNEL_NET = ipaddress.ip_network("198.51.100.0/24")  # TEST-NET-2: VPN tunnel addresses
SERVER_NET = ipaddress.ip_network("203.0.113.0/25")  # TEST-NET-3's lower half: the server link
LAB_NETS = (CLIENT_NET, TUNNEL_NET, SERVER_NET)
ROUTER_SERVER_ADDR = "203.0.113.1"
SERVER_ADDR = "203.0.113.2"
MAX_CLIENTS = CLIENT_NET.num_addresses // 4
# Offload features that make the kernel hand captures 64 KiB super-frames instead of segments.
OFFLOADS = (
    "tx-tcp-segmentation",
    "tx-tcp6-segmentation",
    "tx-tcp-ecn-segmentation",
    "tx-tcp-mangleid-segmentation",
    "tx-generic-segmentation",
    "tx-udp-segmentation",
    "rx-gro",
    "rx-gro-list",
    "rx-udp-gro-forwarding",
)
_CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """The lab could not be built or a lab process failed; the message says what and why."""


def is_lab_address(addr: str) -> bool:
    """True for IPv4 addresses inside the three documentation ranges the lab uses."""
    ip = ipaddress.ip_address(addr)
    return any(ip in net for net in LAB_NETS)


@dataclass(frozen=True)
class Client:
    """One client namespace and its link to the router."""

    index: int
    ns: str
    addr: str  # the client's address on "out"
    gateway: str  # the router's end of the same /30
    ifname: str = "out"  # capture here (inside `ns`)

    @property
    def subnet(self) -> str:
        """The client link's /30."""
        return str(ipaddress.ip_network(f"{self.addr}/30", strict=False))


@dataclass
class Lab:
    """A built lab: namespace names, addresses, the run's state directory and its processes."""

    tag: str  # flagdlab-<pid>-<n>: prefix of every namespace of this lab
    router: str
    server: str
    clients: list[Client]
    state: Path  # per-run directory for configs, certificates, keys, logs
    offloads_off: bool
    # client index -> TCP congestion control of the server's route to it (session conditions)
    congestion: dict[int, str] = field(default_factory=dict)
    # client index -> the user-space delay line on its link (`conditions`, kernels without netem)
    delay_lines: dict[int, subprocess.Popen] = field(default_factory=dict)
    _procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def namespaces(self) -> list[str]:
        return [self.router, self.server, *(c.ns for c in self.clients)]

    @property
    def server_addr(self) -> str:
        return SERVER_ADDR

    def command(self, ns: str, argv: Sequence[str], user: str | None = None) -> list[str]:
        """argv run inside namespace `ns` (as `user` when given, through setpriv)."""
        prefix = ["ip", "netns", "exec", ns]
        if user:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        return [*prefix, *argv]

    def run(
        self, ns: str, argv: Sequence[str], *, timeout: float = 60, user: str | None = None, **kw
    ) -> subprocess.CompletedProcess:
        """Run argv to completion inside `ns`; never raises on a non-zero exit (callers check)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(ns, argv, user), timeout=timeout, **kw)

    def popen(
        self, ns: str, argv: Sequence[str], *, user: str | None = None, log: str | None = None,
        must_live: bool = True, **kw,
    ) -> subprocess.Popen:
        """Start a long-running process in `ns`, in its own process group, logging to the state
        directory; it is killed (with its whole group) at teardown. A server `must_live`: its
        exit fails the run (`check_processes`); a session's own process (a tunnel client) may
        end any time, and its session `reap`s it."""
        if log is not None:
            fh = open(self.state / f"{log}.log", "ab")  # noqa: SIM115 - owned by the child
            kw.setdefault("stdout", fh)
            kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.command(ns, argv, user), start_new_session=True, **kw)
        proc.must_live = must_live  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    def reap(self, proc: subprocess.Popen, timeout: float) -> None:
        """Wait up to `timeout` seconds for a session's process to end, kill it if it has not,
        and forget it."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._procs.remove(proc)

    def check_processes(self) -> None:
        """LabError naming the first long-running process that has exited (a crashed server)."""
        for proc in list(self._procs):  # session threads add and remove their own
            if proc.must_live and proc.poll() is not None:
                argv = proc.args if isinstance(proc.args, list) else [str(proc.args)]
                name = next((a for a in argv[4:] if not a.startswith("-")), argv[-1])
                raise LabError(f"lab process {name} exited with status {proc.returncode}")

    def shape(self, client: Client, rate_mbit: float) -> None:
        """Limit both directions of `client`'s link to `rate_mbit` with tbf: the router's end
        shapes downloads, the client's end uploads (`conditions` does more, per session)."""
        for ns, ifname in ((self.router, f"c{client.index}"), (client.ns, client.ifname)):
            res = self.run(ns, tbf_argv(ifname, rate_mbit))
            if res.returncode:
                raise LabError(f"tc tbf on {ifname} failed: {res.stderr.strip()}")

    def route_to(self, client: Client) -> None:
        """(Re)make the server's route to `client`'s link, with the congestion control the
        client's session set (`conditions.apply`), if any."""
        argv = ["ip", "route", "replace", client.subnet, "via", ROUTER_SERVER_ADDR]
        cc = self.congestion.get(client.index)
        self.run(self.server, [*argv, "congctl", cc] if cc else argv)

    @contextlib.contextmanager
    def isolate(self, client: Client) -> Iterator[None]:
        """While the block runs the server has no route to `client`'s own address, so in a VPN
        session nothing can come back outside the tunnel, whatever an application puts in its
        signalling (a SIP peer's media address, say)."""
        self.run(self.server, ["ip", "route", "del", client.subnet])
        try:
            yield
        finally:
            self.route_to(client)

    def log(self, name: str) -> str:
        path = self.state / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def tbf_argv(ifname: str, rate_mbit: float) -> list[str]:
    """tc's command for a tbf at `rate_mbit` on `ifname` (the plain link's rate limit)."""
    # burst must hold at least one timer tick of traffic at the rate, and a full frame
    burst = max(16000, int(rate_mbit * 1e6 / 8 / 250))
    return ["tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", f"{rate_mbit}mbit",
            "burst", str(burst), "latency", "50ms"]  # fmt: skip


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Switch the calling thread into namespace `ns` for the duration of the block.

    Sockets opened inside stay bound to `ns` after the block, which is how the capture handle of a
    client's link is opened from this process. setns() changes only the calling thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / ns, os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise LabError(f"cannot enter namespace {ns}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover - would be a kernel bug
                raise LabError("cannot return to the original network namespace")
    finally:
        os.close(target)
        os.close(own)


def link_packets(ns: str, ifname: str) -> int:
    """Packets `ifname` in namespace `ns` has received and sent so far."""
    with in_netns(ns), open("/proc/thread-self/net/dev") as f:  # this thread: now in ns
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == ifname:
                fields = counters.split()
                return int(fields[1]) + int(fields[9])
    raise LabError(f"no interface {ifname} in {ns}")


def wait_quiet(ns: str, ifname: str, quiet: float, limit: float) -> float:
    """Return once `ifname` has carried no packet for `quiet` seconds, or after `limit`; the
    seconds waited."""
    start = last = time.monotonic()
    count = link_packets(ns, ifname)
    while True:
        time.sleep(min(0.05, quiet))
        now = time.monotonic()
        seen = link_packets(ns, ifname)
        if seen != count:
            count, last = seen, now
        if now - last >= quiet or now - start >= limit:
            return now - start


_counter = 0


@contextlib.contextmanager
def build_lab(clients: int = 1, *, state_root: Path | None = None) -> Iterator[Lab]:
    """Create the namespaces, links, addresses and routes; tear everything down on exit.

    Stale labs of dead runs are reaped first. Teardown runs on normal exit, on exceptions
    (KeyboardInterrupt included) and is idempotent.
    """
    global _counter
    if not 1 <= clients <= MAX_CLIENTS:
        raise LabError(f"clients must be between 1 and {MAX_CLIENTS}, not {clients}")
    unavailable = netns_unavailable()
    if unavailable:
        raise LabError(unavailable)
    reap_stale()
    _counter += 1
    tag = f"{PREFIX}-{os.getpid()}-{_counter}"
    state = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=state_root))
    state.chmod(0o755)  # daemons running as their own users read their configs from here
    lab = Lab(
        tag=tag,
        router=f"{tag}-rtr",
        server=f"{tag}-srv",
        clients=[
            Client(k, f"{tag}-c{k}", str(CLIENT_NET[4 * k + 2]), str(CLIENT_NET[4 * k + 1]))
            for k in range(clients)
        ],
        state=state,
        offloads_off=True,
    )
    try:
        _create(lab)
        yield lab
    finally:
        teardown(lab)


def _create(lab: Lab) -> None:
    from pyroute2 import IPRoute, netns

    for ns in lab.namespaces:
        netns.create(ns)
        _sysctls(ns)
    with in_netns(lab.router), IPRoute() as ipr:
        ipr.link("add", ifname="srv", kind="veth", peer={"ifname": "in", "net_ns_fd": lab.server})
        for c in lab.clients:
            ipr.link(
                "add", ifname=f"c{c.index}", kind="veth", peer={"ifname": "out", "net_ns_fd": c.ns}
            )
    _address(lab.router, "srv", ROUTER_SERVER_ADDR, SERVER_NET.prefixlen)
    _address(lab.server, "in", SERVER_ADDR, SERVER_NET.prefixlen)
    _route(lab.server, str(TUNNEL_NET), ROUTER_SERVER_ADDR)
    for c in lab.clients:
        _address(lab.router, f"c{c.index}", c.gateway, 30)
        _address(c.ns, "out", c.addr, 30)
        _route(c.ns, str(SERVER_NET), c.gateway)
        # one route per client link, so a VPN session can take its client's away (see
        # Lab.isolate): the server then has no way back except through the tunnel
        _route(lab.server, c.subnet, ROUTER_SERVER_ADDR)
    names = {lab.router: ["srv", *(f"c{c.index}" for c in lab.clients)], lab.server: ["in"]}
    names.update({c.ns: ["out"] for c in lab.clients})
    lab.offloads_off = all(offloads_off(ns, ifs) for ns, ifs in names.items())


def _sysctls(ns: str) -> None:
    # IPv6 off before any device arrives (devices pick up the defaults); forwarding for the router
    # only matters there, but is harmless off elsewhere (it is per namespace).
    keys = [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
        "net.ipv4.ip_forward=" + ("1" if ns.endswith("-rtr") else "0"),
    ]
    subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *keys], capture_output=True, check=True
    )


def _address(ns: str, ifname: str, addr: str, prefixlen: int) -> None:
    from pyroute2 import IPRoute

    with in_netns(ns), IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=addr, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _route(ns: str, dst: str, gateway: str) -> None:
    from pyroute2 import IPRoute

    with in_netns(ns), IPRoute() as ipr:
        ipr.route("add", dst=dst, gateway=gateway)


def offloads_off(ns: str | None, ifnames: list[str]) -> bool:
    """ethtool -K tso/gso/gro off inside `ns` (None: this process's namespace); False where
    refused (captures then hold bigger frames; the manifest records it). pyroute2's Ethtool
    leaves TSO on for veths, so the ethtool program is preferred and pyroute2 is the fallback."""
    if shutil.which("ethtool"):
        argv = [*(["ip", "netns", "exec", ns] if ns else []), "ethtool", "-K"]
        return all(
            subprocess.run(
                [*argv, name, "tso", "off", "gso", "off", "gro", "off"], capture_output=True
            ).returncode
            == 0
            for name in ifnames
        )
    try:
        from pyroute2 import Ethtool

        with in_netns(ns) if ns else contextlib.nullcontext(), Ethtool() as eth:
            for name in ifnames:
                feats = eth.get_features(name)
                for key in OFFLOADS:
                    if key in feats.features:
                        feats.features[key].enable = False
                eth.set_features(name, feats)
    except Exception:  # noqa: BLE001 - best effort by design
        return False
    return False  # pyroute2 cannot turn TSO off on a veth: report it as not done


def routes(ns: str) -> list[tuple[str, str | None]]:
    """(destination/prefix, gateway) of every IPv4 route in `ns`'s main table."""
    import socket

    from pyroute2 import IPRoute

    out = []
    with in_netns(ns), IPRoute() as ipr:
        for r in ipr.get_routes(family=socket.AF_INET, table=254):
            dst = r.get_attr("RTA_DST") or "0.0.0.0"
            out.append((f"{dst}/{r['dst_len']}", r.get_attr("RTA_GATEWAY")))
    return out


def addresses(ns: str) -> list[str]:
    """Every IPv4 address configured in `ns`, loopback excluded."""
    import socket

    from pyroute2 import IPRoute

    with in_netns(ns), IPRoute() as ipr:
        found = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)]
    return [a for a in found if not a.startswith("127.")]


# -- teardown ------------------------------------------------------------------------------------


def namespace_pids(ns: str) -> list[int]:
    """Processes whose network namespace is `ns` (what `ip netns pids` prints)."""
    try:
        want = os.stat(NETNS_DIR / ns).st_ino
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino == want:
                    pids.append(int(entry))
    return pids


def _kill_namespace(ns: str, grace: float = 2.0) -> None:
    """SIGTERM every process in `ns`, then SIGKILL whatever is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        pids = [p for p in namespace_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.05)


def teardown(lab: Lab) -> None:
    """Kill the lab's processes, remove its namespaces and state; keep going past failures."""
    for proc in lab._procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in lab._procs:
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lab._procs.clear()
    _remove_namespaces(lab.namespaces)
    shutil.rmtree(lab.state, ignore_errors=True)


def _remove_namespaces(names: list[str]) -> None:
    from pyroute2 import netns

    present = set(netns.listnetns())
    for ns in names:
        if ns in present:
            _kill_namespace(ns)  # daemons that forked away from their process group
            with contextlib.suppress(Exception):
                netns.remove(ns)  # destroys the veth ends inside, and so their peers


def lab_namespaces() -> list[str]:
    """Names of every lab namespace on this machine, live or stale."""
    from pyroute2 import netns

    return sorted(ns for ns in netns.listnetns() if ns.startswith(PREFIX + "-"))


def reap_stale() -> list[str]:
    """Tear down labs whose creating process is gone; returns the namespaces removed."""

    def owner(name: str) -> int | None:
        parts = name.split("-")
        return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None

    stale = [ns for ns in lab_namespaces() if not _alive(owner(ns))]
    _remove_namespaces(stale)
    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{PREFIX}-*"):
        if path.is_dir() and not _alive(owner(path.name)):
            shutil.rmtree(path, ignore_errors=True)
    return stale


def _alive(pid: int | None) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists()


def netns_unavailable() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, veth pairs and packet sockets)"
    if shutil.which("ip") is None:
        return "the lab needs iproute2's `ip` (apt-get install iproute2)"
    if shutil.which("setpriv") is None:
        return "the lab needs setpriv (util-linux) to run daemons as their own users"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    return None
