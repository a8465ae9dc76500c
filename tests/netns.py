"""Network-namespace test harness: a veth pair between namespaces, with real TLS and UDP traffic.

Two layouts, both torn down on exit (also when the test fails):

- `veth_pair(root_end=True)`: end `a` stays in the test's own (root) namespace and end `b` lives
  in a fresh namespace. A capture (or `flagd run --iface <a.ifname>`) runs in the test process
  with no namespace switching; this is the layout the live capture and daemon tests use. Its
  addresses are a /30 out of 198.51.100.0/24 (TEST-NET-2) that no other root-namespace interface
  uses, taken under a file lock, so concurrent test runs on one machine do not collide.
- `veth_pair()`: both ends in fresh namespaces (198.51.100.1 and .2); nothing touches the root
  namespace. Capture code then has to run inside a namespace (`pair.popen(pair.a, argv)`).

Traffic always goes from a client on end `a` to a server on end `b`: `run_tls` (N connections of
Python `ssl` with a certificate made by openssl for the test, each echoing a few messages) and
`run_udp` (k datagrams, each echoed). Both return the client-to-server 5-tuples they used.
Offloads (TSO/GSO/GRO) are turned off on both ends so a capture sees wire-sized segments, and
IPv6 is off so no router solicitations or MLD reports show up in captures.

The same file is the traffic program (`python3 tests/netns.py tls-server ...`), so the harness
needs no other files; run it inside a namespace with `ip netns exec`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from flagd.lab.topology import offloads_off as _lab_offloads_off

TEST_NET = ipaddress.ip_network("198.51.100.0/24")  # RFC 5737 TEST-NET-2: never routed anywhere
_LOCK = Path(tempfile.gettempdir()) / "flagd-netns.lock"
_SCRIPT = Path(__file__).resolve()
_counter = itertools.count()
_cert_dir: Path | None = None


class Flow(NamedTuple):
    """A client-to-server 5-tuple as the traffic client saw it."""

    proto: int  # 6 TCP, 17 UDP
    src: str
    sport: int
    dst: str
    dport: int


@dataclass
class End:
    """One end of the veth pair."""

    ns: str | None  # namespace name; None = the test process's own namespace
    ifname: str
    addr: str


@dataclass
class VethPair:
    a: End  # client side
    b: End  # server side
    prefixlen: int
    offloads_off: bool  # False where the driver refused: captures may then see super-packets
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def command(self, end: End, argv: Sequence[str]) -> list[str]:
        """argv run inside `end`'s namespace."""
        return [*(["ip", "netns", "exec", end.ns] if end.ns else []), *argv]

    def run(
        self, end: End, argv: Sequence[str], timeout: float = 30, **kw
    ) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(end, argv), timeout=timeout, check=True, **kw)

    def popen(self, end: End, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a process in `end`'s namespace; it is killed when the pair is torn down."""
        proc = subprocess.Popen(self.command(end, argv), **kw)
        self._procs.append(proc)
        return proc

    def set_link(self, end: End, up: bool) -> None:
        from pyroute2 import IPRoute

        with IPRoute(**({"netns": end.ns} if end.ns else {})) as ipr:
            ipr.link(
                "set", index=ipr.link_lookup(ifname=end.ifname)[0], state="up" if up else "down"
            )

    def run_tls(
        self, *, conns: int = 3, msgs: int = 3, size: int = 200, port: int = 8443
    ) -> list[Flow]:
        """`conns` TLS connections a -> b:port, each sending `msgs` messages of `size` bytes that
        the server echoes, then closing cleanly (close_notify, FIN both ways)."""
        cert, key = _certificate()
        args = [f"--addr={self.b.addr}", f"--port={port}", f"--conns={conns}", f"--msgs={msgs}"]
        server = self._start_server(["tls-server", *args, f"--cert={cert}", f"--key={key}"])
        client = self._client(["tls-client", *args, f"--size={size}", f"--cert={cert}"])
        _finish(server)
        return [Flow(*json.loads(line)) for line in client.stdout.splitlines()]

    def run_udp(self, *, count: int = 10, size: int = 100, port: int = 9999) -> Flow:
        """`count` datagrams a -> b:port, each echoed back before the next is sent."""
        args = [f"--addr={self.b.addr}", f"--port={port}", f"--count={count}"]
        server = self._start_server(["udp-server", *args])
        client = self._client(["udp-client", *args, f"--size={size}"])
        _finish(server)
        return Flow(*json.loads(client.stdout))

    def _client(self, argv: list[str]) -> subprocess.CompletedProcess:
        return self.run(self.a, [sys.executable, str(_SCRIPT), *argv])

    def _start_server(self, argv: list[str]) -> subprocess.Popen:
        proc = self.popen(
            self.b, [sys.executable, str(_SCRIPT), *argv], stdout=subprocess.PIPE, text=True
        )
        if (
            not select.select([proc.stdout], [], [], 10)[0]
            or proc.stdout.readline().strip() != "ready"
        ):
            proc.kill()
            raise RuntimeError(f"traffic server {argv[0]} did not start")
        return proc


def _finish(proc: subprocess.Popen) -> None:
    if proc.wait(timeout=15) != 0:
        raise RuntimeError(f"traffic server exited with {proc.returncode}")


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and packet sockets)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` to run processes inside namespaces"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "needs pyroute2"
    return None


def require_netns() -> None:
    """pytest.skip with the reason when namespace tests cannot run here."""
    import pytest

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def veth_pair(*, root_end: bool = False) -> Iterator[VethPair]:
    """A veth pair with addresses and links up; see the module docstring for the two layouts."""
    from pyroute2 import IPRoute, netns

    _reap_stale()
    # Unique even if this file is imported twice (as `netns` and `tests.netns`): skip taken names.
    taken = set(netns.listnetns())
    while True:
        tag = f"{os.getpid()}-{next(_counter)}"
        if f"flagd-{tag}-b" not in taken and not Path("/sys/class/net", f"fd{tag}a").exists():
            break
    ns_a = None if root_end else f"flagd-{tag}-a"
    ns_b = f"flagd-{tag}-b"
    if_a, if_b = f"fd{tag}a", f"fd{tag}b"  # at most 15 characters with a 7-digit pid
    created: list[str] = []
    pair = None
    try:
        for ns in filter(None, (ns_a, ns_b)):
            netns.create(ns)
            created.append(ns)
            # Devices moved in pick up the namespace's defaults: no IPv6, so no ND/MLD chatter.
            subprocess.run(
                ["ip", "netns", "exec", ns, "sysctl", "-q", "-w"]
                + ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                capture_output=True,
            )
        with IPRoute() as ipr:
            ipr.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b})
            created.append(if_a)
        offloads_off = _lab_offloads_off(None, [if_a, if_b])
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=if_b)[0], net_ns_fd=ns_b)
            if ns_a:
                ipr.link("set", index=ipr.link_lookup(ifname=if_a)[0], net_ns_fd=ns_a)
        if root_end:
            _sysctl_write(f"net/ipv6/conf/{if_a}/disable_ipv6", "1")
            with _address_lock():
                net = _free_subnet()
                addr_a, addr_b = str(net.network_address + 1), str(net.network_address + 2)
                _configure(None, if_a, addr_a, net.prefixlen)
        else:
            net = ipaddress.ip_network("198.51.100.0/30")
            addr_a, addr_b = "198.51.100.1", "198.51.100.2"
            _configure(ns_a, if_a, addr_a, net.prefixlen)
        _configure(ns_b, if_b, addr_b, net.prefixlen)
        pair = VethPair(
            End(ns_a, if_a, addr_a), End(ns_b, if_b, addr_b), net.prefixlen, offloads_off
        )
        yield pair
    finally:
        for proc in pair._procs if pair else ():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        _teardown(created)


def _configure(ns: str | None, ifname: str, addr: str, prefixlen: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute(**({"netns": ns} if ns else {})) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=addr, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")
        if ns:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _sysctl_write(key: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", key).write_text(value)


@contextlib.contextmanager
def _address_lock() -> Iterator[None]:
    with open(_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of TEST-NET-2 that no root-namespace address is in (call under _address_lock)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        used = [
            ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
            for a in ipr.get_addr(family=socket.AF_INET)
        ]
    for net in TEST_NET.subnets(new_prefix=30):
        if not any(addr in net for addr in used):
            return net
    raise RuntimeError("no free /30 left in 198.51.100.0/24 in the root namespace")


def _teardown(created: list[str]) -> None:
    """Delete what was created, newest first; keep going past individual failures."""
    from pyroute2 import IPRoute, netns

    for name in reversed(created):
        with contextlib.suppress(Exception):
            if name.startswith("flagd-"):
                netns.remove(name)  # destroys the veth ends inside, and so their peers
            else:
                with IPRoute() as ipr:
                    found = ipr.link_lookup(ifname=name)
                    if found:
                        ipr.link("del", index=found[0])


def _reap_stale() -> None:
    """Remove namespaces and root-namespace veths left by test processes that died."""
    from pyroute2 import IPRoute, netns

    def dead(pid: str) -> bool:
        return pid.isdigit() and not Path("/proc", pid).exists()

    with contextlib.suppress(Exception):
        for ns in netns.listnetns():
            parts = ns.split("-")
            if len(parts) == 4 and parts[0] == "flagd" and dead(parts[1]):
                netns.remove(ns)
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                if name.startswith("fd") and "-" in name and dead(name[2:].split("-")[0]):
                    ipr.link("del", index=link["index"])


def _certificate() -> tuple[Path, Path]:
    """A self-signed EC certificate for CN/SAN flagd-test, made once per test process."""
    global _cert_dir
    if _cert_dir is None:
        _cert_dir = Path(tempfile.mkdtemp(prefix="flagd-cert-"))
        subprocess.run(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
            " -subj /CN=flagd-test -addext subjectAltName=DNS:flagd-test".split()
            + ["-keyout", str(_cert_dir / "key.pem"), "-out", str(_cert_dir / "cert.pem")],
            check=True,
            capture_output=True,
        )
    return _cert_dir / "cert.pem", _cert_dir / "key.pem"


# -- the traffic program (runs inside a namespace) ------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed early")
        buf += chunk
    return bytes(buf)


def _tls_server(a: argparse.Namespace) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    with socket.create_server((a.addr, a.port)) as srv:
        srv.settimeout(20)
        print("ready", flush=True)
        for _ in range(a.conns):
            conn, _ = srv.accept()
            conn.settimeout(20)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                for _ in range(a.msgs):
                    size = int.from_bytes(_recv_exact(tls, 4), "big")
                    tls.sendall(_recv_exact(tls, size))
                tls.unwrap().close()


def _tls_client(a: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(cafile=a.cert)
    for i in range(a.conns):
        with socket.create_connection((a.addr, a.port), timeout=20) as raw:
            src, sport = raw.getsockname()[:2]
            with ctx.wrap_socket(raw, server_hostname="flagd-test") as tls:
                for j in range(a.msgs):
                    msg = bytes([(i + j) % 256]) * a.size
                    tls.sendall(len(msg).to_bytes(4, "big") + msg)
                    if _recv_exact(tls, len(msg)) != msg:
                        raise RuntimeError("echo mismatch")
                tls.unwrap().close()
        print(json.dumps([6, src, sport, a.addr, a.port]), flush=True)


def _udp_server(a: argparse.Namespace) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((a.addr, a.port))
        sock.settimeout(20)
        print("ready", flush=True)
        for _ in range(a.count):
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)


def _udp_client(a: argparse.Namespace) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect((a.addr, a.port))
        for i in range(a.count):
            msg = i.to_bytes(4, "big") * (a.size // 4)
            sock.send(msg)
            if sock.recv(65535) != msg:
                raise RuntimeError("echo mismatch")
        src, sport = sock.getsockname()
    print(json.dumps([17, src, sport, a.addr, a.port]), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="flagd test traffic (run inside a network namespace)")
    p.add_argument("role", choices=["tls-server", "tls-client", "udp-server", "udp-client"])
    p.add_argument("--addr", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=3)
    p.add_argument("--msgs", type=int, default=3)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--cert")
    p.add_argument("--key")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    roles = {"tls-server": _tls_server, "tls-client": _tls_client}
    roles |= {"udp-server": _udp_server, "udp-client": _udp_client}
    roles[a.role](a)


if __name__ == "__main__":
    main()
