"""VPN tunnels for the lab's vpn-* classes: wireguard-go (userspace; kernel WireGuard is absent),
OpenVPN (UDP, tun) and IPsec (strongSwan, IKEv2 + ESP in UDP, user-space ESP).

The router is the tunnel's far end: one wireguard-go interface (198.51.100.1) that holds a
client's peer (198.51.100.(k+2)/32) only while that client's session runs. For each VPN session
the client brings up its own interface *after* the capture has started (so the handshake is in
the capture), points its route to the server at the tunnel, runs the session and takes the
tunnel down again, restoring the direct route. Each session therefore is one tunnel flow (UDP
client:random port -> router:51820), and the capture on the client's outer link sees only tunnel
packets, which `only_tunnel` checks; `staged_flush` checks that the flow opens with this
session's own packets.
OpenVPN works the same way, with a client process per session (`--lport` = the session's port),
and so does IPsec (a client charon per session, see `Ipsec`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flagd.frames import Frames
from flagd.lab.pki import DOMAIN, Pki
from flagd.lab.record import SessionStats
from flagd.lab.topology import SERVER_NET, Client, Lab, LabError
from flagd.packets import PROTO_UDP, Skip, decode

WG_PORT = 51820
OVPN_PORT = 1194
# 198.51.100.0/25 for WireGuard (router .1, client k .(k+2)), /25 above it for OpenVPN's pool
WG_NET = ipaddress.ip_network("198.51.100.0/25")
OVPN_NET = ipaddress.ip_network("198.51.100.128/25")
ROUTER_TUNNEL_ADDR = str(WG_NET[1])
# wireguard-go refuses to run on kernels with WireGuard support unless told it is wanted.
_ENV = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}


def tunnel_addr(client: Client) -> str:
    return str(WG_NET[client.index + 2])


class WireGuard:
    """The router's end plus per-client keys; `session(client)` is the per-session tunnel."""

    name = "wireguard"
    programs = ("wireguard-go", "wg")
    port = WG_PORT

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.state / "wireguard"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.router_key, self.router_pub = self._keypair("router")
        self.keys = {c.index: self._keypair(f"client{c.index}") for c in lab.clients}
        self._interface(lab.router, self.router_key, WG_PORT)
        self._ip(
            lab.router,
            "addr",
            "add",
            f"{ROUTER_TUNNEL_ADDR}/{WG_NET.prefixlen}",
            "dev",
            self.ifname(lab.router),
        )
        self._ip(lab.router, "link", "set", self.ifname(lab.router), "up")

    def ifname(self, ns: str) -> str:
        """Interface name for `ns`'s tunnel end: unique on the machine, because wireguard-go's
        control socket (/run/wireguard/<name>.sock) lives in the shared filesystem."""
        role = ns.rsplit("-", 1)[-1]  # rtr, c0, c1, ...
        return f"w{os.getpid()}{'r' if role == 'rtr' else role}"

    def _keypair(self, name: str) -> tuple[Path, str]:
        key = self.dir / f"{name}.key"
        private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True)
        key.write_text(private.stdout)
        key.chmod(0o600)
        public = subprocess.run(
            ["wg", "pubkey"], input=private.stdout, capture_output=True, text=True, check=True
        )
        return key, public.stdout.strip()

    def _interface(self, ns: str, key: Path, port: int) -> subprocess.Popen:
        """Start wireguard-go for `ns`; the router's must live, a client's ends with its
        session (another client's thread must not take that exit for a crash)."""
        router = ns == self.lab.router
        proc = self.lab.popen(ns, ["wireguard-go", "-f", self.ifname(ns)], log=f"wg-{ns}",
                              must_live=router, env=_ENV)
        deadline = time.monotonic() + 10
        # wireguard-go makes the interface before its control socket; a `wg set` in between
        # falls back to kernel netlink and fails ("Protocol not supported": no kernel
        # WireGuard here), which once ended a whole run: retry until the socket answers
        why = ""
        while True:
            if self._exists(ns):
                args = ("set", self.ifname(ns), "private-key", str(key), "listen-port", str(port))
                res = self.lab.run(ns, ["wg", *args])
                if res.returncode == 0:
                    return proc
                why = f"wg set: {res.stderr.strip()}"
            if proc.poll() is not None or time.monotonic() > deadline:
                why = why or self.lab.log(f"wg-{ns}")[-300:]
                self.lab.reap(proc, 0)
                raise LabError(f"wireguard-go did not set up {self.ifname(ns)} in {ns}: {why}")
            time.sleep(0.05)

    def _exists(self, ns: str) -> bool:
        return self.lab.run(ns, ["ip", "link", "show", self.ifname(ns)]).returncode == 0

    def _wg(self, ns: str, *args: str) -> None:
        res = self.lab.run(ns, ["wg", *args])
        if res.returncode:
            raise LabError(f"wg {args[0]} failed in {ns}: {res.stderr.strip()}")

    def _ip(self, ns: str, *args: str) -> None:
        res = self.lab.run(ns, ["ip", *args])
        if res.returncode:
            raise LabError(f"ip {' '.join(args)} failed in {ns}: {res.stderr.strip()}")

    @contextlib.contextmanager
    def session(self, client: Client, listen_port: int) -> Iterator[str]:
        """Bring the client's tunnel up, route the server through it; yields the client's tunnel
        address. Down again (direct route restored) on exit, whatever happened."""
        ns = client.ns
        key, _ = self.keys[client.index]
        proc = None
        try:
            self._peer(client, add=True)
            proc = self._interface(ns, key, listen_port)
            self._wg(
                ns, "set", self.ifname(ns), "peer", self.router_pub, "endpoint", f"{client.gateway}:{WG_PORT}",
                "allowed-ips", f"{SERVER_NET},{WG_NET}",
            )  # fmt: skip
            self._ip(ns, "addr", "add", f"{tunnel_addr(client)}/32", "dev", self.ifname(ns))
            self._ip(ns, "link", "set", self.ifname(ns), "up")
            self._ip(
                ns,
                "route",
                "replace",
                str(SERVER_NET),
                "dev",
                self.ifname(ns),
                "src",
                tunnel_addr(client),
            )
            self._ip(ns, "route", "replace", str(WG_NET), "dev", self.ifname(ns))
            yield tunnel_addr(client)
        finally:
            with contextlib.suppress(Exception):
                self.lab.run(
                    ns, ["ip", "link", "del", self.ifname(ns)]
                )  # wireguard-go exits with it
            self.lab.run(ns, ["ip", "route", "replace", str(SERVER_NET), "via", client.gateway])
            if proc is not None:
                self.lab.reap(proc, 3)
            with contextlib.suppress(LabError):
                self._peer(client, add=False)

    def _peer(self, client: Client, add: bool) -> None:
        """Add the client's peer on the router (no endpoint: the handshake tells it), or remove
        it. Between sessions the router has no peer for the client's tunnel address, so what a
        server still sends there is dropped. A peer kept across sessions would hold ("stage")
        up to 128 such packets, a voip server's RTP to a call that ended, and wireguard-go sends
        those the moment the next session's handshake completes: that session's flow would
        open with another session's traffic (see `staged_flush`). An endpoint kept would send
        them to the old session's port instead, during the next session's capture."""
        router, pub = self.ifname(self.lab.router), self.keys[client.index][1]
        if add:
            self._wg(self.lab.router, "set", router, "peer", pub,
                     "allowed-ips", f"{tunnel_addr(client)}/32")  # fmt: skip
        else:
            self._wg(self.lab.router, "set", router, "peer", pub, "remove")


def only_tunnel(stats: SessionStats, client: Client, port: int) -> str | None:
    """Why a VPN session's capture holds more than its tunnel (UDP to the router's `port`), or
    None when it holds only that."""
    for f in stats.flows:
        ends = {(f.src, f.sport), (f.dst, f.dport)}
        if f.proto != 17 or (client.gateway, port) not in ends:
            return f"traffic outside the tunnel: {f.src}:{f.sport} -> {f.dst}:{f.dport}"
    if len(stats.flows) != 1:
        return f"{len(stats.flows)} tunnel flows (expected one)"
    return None


# Router data messages a clean session shows before the client's second one: the answer to the
# client's first (a TCP SYN-ACK) and one retransmission of it under loss.
MAX_EARLY_ROUTER_DATA = 2


def staged_flush(frames: Frames, port: int = WG_PORT) -> str | None:
    """Why a WireGuard session's tunnel flow opens with packets the router held from before the
    session (`WireGuard._peer`), or None. Every lab session opens with the client's connection:
    its first data message (a SYN) gets one answer before its second (the ACK). More router
    data messages in between were queued for the client before its handshake and sent
    once the handshake completed; they belong to an earlier session."""
    pk = decode(frames)
    udp = np.flatnonzero((pk.skip == Skip.OK) & (pk.proto == PROTO_UDP) & (pk.payload_len > 0))
    first = pk.l4_off[udp] + pk.l4_hdr_len[udp]
    seen = first < frames.offset[udp] + frames.caplen[udp]  # the message type was captured
    udp, first = udp[seen], first[seen]
    data = udp[frames.data[first] == 4]  # WireGuard message type 4: transport data
    from_router = pk.sport[data] == port
    before_second = np.cumsum(~from_router) == 1  # after the client's first, before its second
    early = int((from_router & before_second).sum())
    if early > MAX_EARLY_ROUTER_DATA:
        return (f"the tunnel flow opens with {early} router packets before the client's second: "
                "packets held for this client from before the session")
    return None


class OpenVpn:
    """OpenVPN over UDP with tun devices: the router runs the server (pool 198.51.100.128/25,
    ECDHE only, the run's CA and certificate); each session starts a client process."""

    name = "openvpn"
    programs = ("openvpn",)
    port = OVPN_PORT

    def __init__(self, lab: Lab, pki: Pki) -> None:
        self.lab, self.pki = lab, pki
        self.dir = lab.state / "openvpn"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        net, mask = str(OVPN_NET.network_address), str(OVPN_NET.netmask)
        argv = [
            "openvpn", "--mode", "server", "--tls-server", "--dev", "tun", "--proto", "udp",
            "--port", str(OVPN_PORT), "--server", net, mask, "--topology", "subnet",
            "--ca", str(pki.ca), "--cert", str(pki.cert), "--key", str(pki.key), "--dh", "none",
            "--duplicate-cn", "--keepalive", "10", "60", "--verb", "3",
            "--data-ciphers", "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305",
        ]  # fmt: skip
        self.server = lab.popen(lab.router, argv, log="openvpn-server")
        self._wait(self.server, "openvpn-server", "Initialization Sequence Completed")

    def _wait(self, proc, log: str, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.lab.log(log):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"openvpn did not come up ({log}): {self.lab.log(log)[-400:]}")
            time.sleep(0.1)

    @contextlib.contextmanager
    def session(
        self, client: Client, listen_port: int, cipher: str = "AES-256-GCM"
    ) -> Iterator[str]:
        """Connect the client (from `listen_port`), route the server through tun0; yields the
        client's tunnel address. The client process goes and the direct route is back on exit."""
        ns, log = client.ns, f"openvpn-{client.ns}"
        (self.lab.state / f"{log}.log").unlink(missing_ok=True)
        argv = [
            "openvpn", "--client", "--dev", "tun0", "--proto", "udp",
            "--remote", client.gateway, str(OVPN_PORT), "--lport", str(listen_port), "--bind",
            "--ca", str(self.pki.ca), "--cert", str(self.pki.cert), "--key", str(self.pki.key),
            "--remote-cert-tls", "server", "--verify-x509-name", DOMAIN, "name",
            "--data-ciphers", cipher, "--route-noexec", "--explicit-exit-notify", "1",
            "--verb", "3",
        ]  # fmt: skip
        proc = self.lab.popen(ns, argv, log=log, must_live=False)  # ends with the session
        try:
            self._wait(proc, log, "Initialization Sequence Completed")
            addr = self._address(ns)
            res = self.lab.run(ns, ["ip", "route", "replace", str(SERVER_NET), "dev", "tun0"])
            if res.returncode:
                raise LabError(f"cannot route through tun0: {res.stderr.strip()}")
            yield addr
        finally:
            if proc.poll() is None:
                proc.terminate()  # explicit-exit-notify tells the server, inside the capture
            self.lab.reap(proc, 5)
            self.lab.run(ns, ["ip", "route", "replace", str(SERVER_NET), "via", client.gateway])

    def _address(self, ns: str) -> str:
        res = self.lab.run(ns, ["ip", "-4", "-o", "addr", "show", "dev", "tun0"])
        for word in res.stdout.split():
            if "/" in word and word.split("/")[0].count(".") == 3:
                return word.split("/")[0]
        raise LabError(f"tun0 in {ns} has no address: {res.stdout.strip()}")


# -- IPsec: strongSwan's charon, IKEv2 with a pre-shared key, ESP in UDP -----------------------

IPSEC_PORT = 4500  # IKE and ESP, both on the NAT-traversal port: one flow per session
CHARON = "/usr/lib/ipsec/charon"
# IKE and ESP proposals drawn per session (openssl plugin: AES-GCM, ECP and X25519 groups)
IKE_PROPOSALS = (
    "aes128-sha256-x25519", "aes256-sha384-ecp384", "aes256gcm16-prfsha384-ecp256",
    "aes128gcm16-prfsha256-modp2048", "chacha20poly1305-prfsha256-x25519",
)  # fmt: skip
ESP_PROPOSALS = ("aes128gcm16", "aes256gcm16", "aes128-sha256", "aes256-sha512", "chacha20poly1305")
_CHARON_PLUGINS = (
    "random nonce openssl pem pkcs1 x509 pubkey aes sha1 sha2 hmac gcm gmp kdf "
    "kernel-libipsec kernel-netlink socket-default vici"
)


class Ipsec:
    """IPsec with strongSwan: the router's charon answers, each session starts a client charon
    that brings up one IKEv2 SA (pre-shared key) and one tunnel-mode CHILD_SA from its tunnel
    address to the server's network.

    Kernel ESP is not needed (nor available on every lab host): charon's kernel-libipsec plugin
    does ESP in user space through a TUN device (ipsec0), which only speaks ESP in UDP. Both
    sides force that encapsulation and the client talks to the router's port 4500 from the
    start (the session's own port on its side), so IKE and ESP share one UDP flow, the shape
    `only_tunnel` checks. charon writes its pid file to a fixed /var/run/charon.pid: each one
    runs with a private /run (a bind mount inside the mount namespace `ip netns exec` makes),
    which is how several run side by side. A client's tunnel address is its WireGuard address
    (one tunnel at a time per client, and charon's routes, in table 220, come first)."""

    name = "ipsec"
    programs = ("charon", "swanctl")
    port = IPSEC_PORT

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.state / "ipsec"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.psk = os.urandom(24).hex()
        router = self.dir / "router"
        conn = f"""
  lab {{
    version = 2
    local_port = {IPSEC_PORT}
    encap = yes
    proposals = {",".join(IKE_PROPOSALS)}
    local {{ auth = psk
      id = router.{DOMAIN} }}
    remote {{ auth = psk }}
    children {{ lab {{
      local_ts = {SERVER_NET}
      remote_ts = {WG_NET}
      esp_proposals = {",".join(ESP_PROPOSALS)}
    }} }}
  }}"""
        self.server = self._charon(lab.router, router, port=500, nat_t=IPSEC_PORT, conn=conn)

    def _charon(
        self, ns: str, directory: Path, *, port: int, nat_t: int, conn: str
    ) -> subprocess.Popen:
        """Start a charon for `ns` with its own strongswan.conf, /run and vici socket, load the
        connection `conn` and the key into it; returns the process."""
        run = directory / "run"
        run.mkdir(parents=True, exist_ok=True)
        (directory / "strongswan.conf").write_text(
            f"""charon {{
  load = {_CHARON_PLUGINS}
  port = {port}
  port_nat_t = {nat_t}
  retransmit_tries = 3
  install_virtual_ip = no
  filelog {{ stderr {{ path = /dev/stderr
    default = 1 }} }}
  plugins {{ vici {{ socket = unix://{directory}/charon.vici }} }}
}}
"""
        )
        (directory / "swanctl.conf").write_text(
            f'connections {{{conn}\n}}\nsecrets {{ ike-lab {{ secret = "{self.psk}" }} }}\n'
        )
        env = {**os.environ, "STRONGSWAN_CONF": str(directory / "strongswan.conf")}
        log = f"charon-{ns}"
        argv = ["sh", "-c", f'mount --bind "{run}" /run && exec {CHARON}']
        proc = self.lab.popen(ns, argv, log=log, must_live=ns == self.lab.router, env=env)
        deadline = time.monotonic() + 15
        while not (directory / "charon.vici").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                why = self.lab.log(log)[-400:]
                if ns != self.lab.router:
                    self.lab.reap(proc, 0)
                raise LabError(f"charon did not start in {ns}: {why}")
            time.sleep(0.05)
        self._swanctl(ns, directory, "--load-all", "--file", str(directory / "swanctl.conf"))
        return proc

    def _swanctl(self, ns: str, directory: Path, *args: str, timeout: float = 30) -> str:
        res = self.lab.run(
            ns, ["swanctl", *args, "--uri", f"unix://{directory}/charon.vici"], timeout=timeout
        )
        if res.returncode:
            raise LabError(f"swanctl {args[0]} failed in {ns}: {(res.stdout + res.stderr)[-400:]}")
        return res.stdout

    @contextlib.contextmanager
    def session(
        self, client: Client, listen_port: int, proposal: str = IKE_PROPOSALS[0],
        esp: str = ESP_PROPOSALS[0],
    ) -> Iterator[str]:
        """Start the client's charon (IKE and ESP from `listen_port`), bring the tunnel up with
        the drawn proposals; yields the client's tunnel address. The SA is deleted (inside the
        capture), charon stopped and its routes gone on exit."""
        ns, addr = client.ns, tunnel_addr(client)
        directory = self.dir / client.ns
        shutil.rmtree(directory, ignore_errors=True)
        conn = f"""
  lab {{
    version = 2
    remote_addrs = {client.gateway}
    local_port = {listen_port}
    remote_port = {IPSEC_PORT}
    encap = yes
    proposals = {proposal}
    local {{ auth = psk
      id = client{client.index}.{DOMAIN} }}
    remote {{ auth = psk
      id = router.{DOMAIN} }}
    children {{ lab {{
      local_ts = {addr}/32
      remote_ts = {SERVER_NET}
      esp_proposals = {esp}
      start_action = none
    }} }}
  }}"""
        self.lab.run(ns, ["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
        proc = None
        try:
            # port 0: the plain IKE socket on a random port, unused (the client starts on 4500)
            proc = self._charon(ns, directory, port=0, nat_t=listen_port, conn=conn)
            self._swanctl(ns, directory, "--initiate", "--child", "lab", "--timeout", "20")
            yield addr
        finally:
            if proc is not None:
                with contextlib.suppress(LabError, subprocess.TimeoutExpired):
                    self._swanctl(ns, directory, "--terminate", "--ike", "lab", "--timeout", "5")
                proc.terminate()
                self.lab.reap(proc, 5)
            self.lab.run(ns, ["ip", "route", "flush", "table", "220"])
            self.lab.run(ns, ["ip", "addr", "del", f"{addr}/32", "dev", "lo"])
