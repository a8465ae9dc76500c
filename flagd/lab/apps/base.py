"""What every lab application shares: the run's context, the `App` interface, and the helpers
that start servers and run clients in namespaces.

An `App` starts its servers once per run in the server namespace (`start`), draws the parameters
of one session from the run's random generator (`params`), and runs one client session in a
client namespace (`session`, returning the client's exit status). Configs, accounts and data live
in the run's state directory; certificates come from `pki`. Servers run in the foreground as
children of the lab so teardown can kill them, and as their own users where they refuse root.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from flagd.lab.pki import Pki
from flagd.lab.topology import SERVER_ADDR, Client, Lab, LabError, in_netns

HERE = Path(__file__).resolve().parent.parent  # flagd/lab: the helper programs live there
DEBIAN_PYTHON = "/usr/bin/python3"  # has Debian's python3-slixmpp; flagd's own python may not


@dataclass
class RunContext:
    """What every app of one run shares."""

    lab: Lab
    pki: Pki
    rng: random.Random
    random_ports: bool = False  # draw server ports at random (defeats port shortcuts)
    session_seconds: float = 10.0  # target length of one session
    # sessions draw their TLS version and suite (--conditions random): servers whose default
    # leaves a version out (Debian 12's nginx: no TLS 1.3) enable both 1.2 and 1.3
    vary_tls: bool = False
    shared: dict = field(default_factory=dict)  # servers started once, shared by app variants
    _ports: set[int] = field(default_factory=set)
    _named: dict[str, int] = field(default_factory=dict)

    @property
    def ports(self) -> dict[str, int]:
        """Service name -> the port it listens on in this run."""
        return dict(self._named)

    def port(self, default: int, name: str | None = None) -> int:
        """The server port for a service: `default`, or a fresh random one with random_ports."""
        port = default
        while self.random_ports and (port == default or port in self._ports):
            port = self.rng.randint(20000, 60999)
        self._ports.add(port)
        self._named[name or str(default)] = port
        return port

    def workdir(self, name: str, mode: int = 0o755) -> Path:
        path = self.lab.state / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        return path


def wait_tcp(
    lab: Lab, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None
) -> None:
    """Wait until the server accepts TCP on SERVER_ADDR:port (probed inside the server's
    namespace, so the probe never shows up on a client link)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LabError(f"server for port {port} exited with status {proc.returncode}")
        with in_netns(lab.server):
            sock = socket.socket()
        with contextlib.closing(sock):
            sock.settimeout(1)
            try:
                sock.connect((SERVER_ADDR, port))
                return
            except OSError:
                pass
        time.sleep(0.2)
    raise LabError(f"no server listening on {SERVER_ADDR}:{port} after {timeout:.0f} s")


def _chown(path: Path, user: str, group: str | None = None) -> None:
    """`path` and everything under it to `user` and `group` (default: the user's namesake)."""
    group = group or user
    shutil.chown(path, user, group)
    for sub in path.rglob("*"):
        shutil.chown(sub, user, group)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz      .,\n", k=n))


# TLS versions and suites a session may be given (`draw_tls`). The lab's certificate has an EC
# P-256 key, so the TLS 1.2 suites are ECDHE-ECDSA ones; the TLS 1.3 suites are the three every
# OpenSSL build enables. Every lab server allows all of them.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
)  # fmt: skip
TLS13_CIPHERS = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")


def draw_tls(rng: random.Random, suites13: bool) -> dict:
    """A session's TLS version and cipher suite. `suites13`: whether the client can choose a
    TLS 1.3 suite (curl can; Python's ssl and swaks cannot: their 1.3 sessions get None)."""
    version = rng.choice(("1.2", "1.3"))
    if version == "1.2":
        return {"tls_version": version, "tls_cipher": rng.choice(TLS12_CIPHERS)}
    return {"tls_version": version, "tls_cipher": rng.choice(TLS13_CIPHERS) if suites13 else None}


def curl_tls(params: dict) -> list[str]:
    """curl's options for the session's drawn TLS version and suite (none when not drawn)."""
    version, cipher = params.get("tls_version"), params.get("tls_cipher")
    if not version:
        return []
    argv = [f"--tlsv{version}", "--tls-max", version]
    if cipher:
        argv += ["--ciphers" if version == "1.2" else "--tls13-ciphers", cipher]
    return argv


def python_tls(params: dict) -> list[str]:
    """The lab's Python clients' options for the drawn TLS version and (1.2) suite."""
    argv = [f"--tls-version={params['tls_version']}"] if params.get("tls_version") else []
    return argv + ([f"--cipher={params['tls_cipher']}"] if params.get("tls_cipher") else [])


class App:
    label: ClassVar[str]  # the traffic class: the directory its captures go to
    name: ClassVar[str]  # application and variant, e.g. "xmpp-starttls"
    programs: ClassVar[tuple[str, ...]]  # executables needed (doctor maps them to packages)
    plaintext_start: ClassVar[bool] = False  # does the session open with plaintext signalling?
    # TLS knobs of the client: None (none), False (version, and a suite for TLS 1.2 only) or
    # True (version and suite): with --conditions random, `draw_tls` picks them per session
    tls_suites13: ClassVar[bool | None] = None

    def start(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        """One session's parameters. `budget_mbit`: what the session's network conditions let
        one TCP connection move (None without conditions); apps that size their transfers to the
        link use it instead of drawing a rate of their own."""
        raise NotImplementedError

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        raise NotImplementedError



def _remove(*groups) -> None:
    for group in groups:
        for path in list(group):
            with contextlib.suppress(OSError):
                Path(path).unlink()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import select

    if proc.stdout is None:
        return ""
    if select.select([proc.stdout], [], [], timeout)[0]:
        return proc.stdout.readline().strip()
    return ""


def _client(ctx: RunContext, client: Client, argv: list[str], params: dict, **kw) -> int:
    """Run a client program in the client's namespace with a hard timeout; its exit status."""
    limit = max(30.0, 4 * ctx.session_seconds)
    log = ctx.lab.state / f"client-{client.index}.log"
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n".encode())
        fh.flush()
        try:
            res = ctx.lab.run(
                client.ns, argv, timeout=limit, capture_output=False, stdout=fh,
                stderr=subprocess.STDOUT, text=False, **kw,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return 124
    return res.returncode

