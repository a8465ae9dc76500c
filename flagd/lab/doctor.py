"""Which programs the lab needs, which are installed, and the one apt-get line for the rest.

Every requirement is a program (or a library a program needs) with the Debian package that
brings it and a check that runs nothing: a lookup on PATH, a file, or an import probe.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class Requirement:
    name: str  # what the apps call it (a program name, or a library described in words)
    package: str  # Debian package that brings it
    check: Callable[[], bool]

    @property
    def installed(self) -> bool:
        return self.check()


def _which(name: str) -> Callable[[], bool]:
    # sbin directories too: the lab runs as root, but a doctor run by a user has no sbin on PATH
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return lambda: shutil.which(name) is not None or shutil.which(name, path=path) is not None


def _file(path: str) -> Callable[[], bool]:
    # programs outside PATH (charon lives in /usr/lib/ipsec) and plugins
    return lambda: Path(path).exists()


def _probe(argv: list[str]) -> Callable[[], bool]:
    @cache
    def check() -> bool:
        if not Path(argv[0]).exists() and shutil.which(argv[0]) is None:
            return False
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0

    return check


# Program name -> requirement. The apps name programs; the packages are Debian 12's.
REQUIREMENTS: dict[str, Requirement] = {
    r.name: r
    for r in (
        Requirement("ip", "iproute2", _which("ip")),
        Requirement("tc", "iproute2", _which("tc")),
        Requirement("setpriv", "util-linux", _which("setpriv")),
        Requirement("ethtool", "ethtool", _which("ethtool")),
        Requirement("iptables-legacy", "iptables", _which("iptables-legacy")),
        Requirement("openssl", "openssl", _which("openssl")),
        Requirement("prosody", "prosody", _which("prosody")),
        Requirement("prosodyctl", "prosody", _which("prosodyctl")),
        Requirement(
            "/usr/bin/python3",
            "python3-slixmpp",
            _probe(["/usr/bin/python3", "-c", "import slixmpp"]),
        ),
        Requirement("ngircd", "ngircd", _which("ngircd")),
        Requirement("sendxmpp", "sendxmpp", _which("sendxmpp")),
        Requirement("postfix", "postfix", _which("postfix")),
        Requirement("dovecot", "dovecot-imapd", _which("dovecot")),
        Requirement(
            "aiosmtpd",
            "python3-aiosmtpd",
            _probe(["/usr/bin/python3", "-c", "import aiosmtpd"]),
        ),
        Requirement("imap4d", "mailutils-imap4d", _which("imap4d")),
        Requirement("swaks", "swaks", _which("swaks")),
        Requirement(
            "perl Net::SSLeay", "libnet-ssleay-perl", _probe(["perl", "-MNet::SSLeay", "-e1"])
        ),
        Requirement(
            "perl IO::Socket::SSL",
            "libio-socket-ssl-perl",
            _probe(["perl", "-MIO::Socket::SSL", "-e1"]),
        ),
        Requirement("sshd", "openssh-server", _which("sshd")),
        Requirement("sftp", "openssh-client", _which("sftp")),
        Requirement("scp", "openssh-client", _which("scp")),
        Requirement("ssh-keygen", "openssh-client", _which("ssh-keygen")),
        Requirement("nginx", "nginx-light", _which("nginx")),
        Requirement("ffmpeg", "ffmpeg", _which("ffmpeg")),
        Requirement("icecast2", "icecast2", _which("icecast2")),
        Requirement("curl", "curl", _which("curl")),
        Requirement("wget", "wget", _which("wget")),
        Requirement("baresip", "baresip-core", _which("baresip")),
        Requirement("linphonec", "linphone-cli", _which("linphonec")),
        Requirement("opentracker", "opentracker", _which("opentracker")),
        Requirement("aria2c", "aria2", _which("aria2c")),
        Requirement("transmission-cli", "transmission-cli", _which("transmission-cli")),
        Requirement("mktorrent", "mktorrent", _which("mktorrent")),
        Requirement("rtorrent", "rtorrent", _which("rtorrent")),
        Requirement("openvpn", "openvpn", _which("openvpn")),
        Requirement("wireguard-go", "wireguard-go", _which("wireguard-go")),
        Requirement("wg", "wireguard-tools", _which("wg")),
        Requirement("charon", "strongswan-charon", _file("/usr/lib/ipsec/charon")),
        Requirement("swanctl", "strongswan-swanctl", _which("swanctl")),
        # user-space ESP (kernel ESP is optional in kernels, and absent on some lab hosts)
        Requirement(
            "charon kernel-libipsec",
            "libcharon-extra-plugins",
            _file("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so"),
        ),
        # AES-GCM, ChaCha20-Poly1305, ECP and X25519 for the drawn proposals
        Requirement(
            "charon openssl",
            "libstrongswan-standard-plugins",
            _file("/usr/lib/ipsec/plugins/libstrongswan-openssl.so"),
        ),
    )
}
# Needed by every lab run whatever the classes: namespaces, shaping, certificates.
BASE = ("ip", "tc", "setpriv", "openssl")
# Wanted by every run but not fatal, and the manifest says when they were missing: without
# ethtool segmentation offloads stay on (pyroute2 cannot turn TSO off on a veth) and captures
# may hold 64 KiB frames; without iptables a kernel lacking sch_netem gets no delay, jitter or
# loss (`conditions`: the delay line is fed by iptables' NFQUEUE target).
RECOMMENDED = ("ethtool", "iptables-legacy")
# Libraries and plugins a program needs: swaks talks STARTTLS only with these two Perl
# libraries present; charon needs its user-space ESP and openssl plugins.
EXTRA = {
    "swaks": ("perl Net::SSLeay", "perl IO::Socket::SSL"),
    "charon": ("charon kernel-libipsec", "charon openssl"),
}


def expand(programs: Iterable[str]) -> list[str]:
    """The programs plus the base set and the libraries they depend on, in a stable order."""
    out: list[str] = []
    for name in (*BASE, *programs):
        for item in (name, *EXTRA.get(name, ())):
            if item not in out:
                out.append(item)
    return out


def missing(programs: Iterable[str]) -> list[Requirement]:
    return [REQUIREMENTS[name] for name in expand(programs) if not REQUIREMENTS[name].installed]


def apt_line(reqs: Iterable[Requirement]) -> str:
    """The one command that installs the packages behind `reqs` (empty when none)."""
    packages = sorted({r.package for r in reqs})
    if not packages:
        return ""
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


class MissingPrograms(RuntimeError):
    """Programs a requested class needs are not installed; the message has the apt-get line."""


def require(programs: Iterable[str], what: str) -> None:
    gone = missing(programs)
    if gone:
        names = ", ".join(r.name for r in gone)
        raise MissingPrograms(
            f"{what} needs programs that are not installed ({names}); install them with:\n"
            f"  {apt_line(gone)}\n"
            "(with a policy-rc.d that exits 101, so no daemon starts outside the lab)"
        )


@dataclass(frozen=True)
class Report:
    rows: list[tuple[str, str, str, bool]]  # (class, app, program, installed)
    apt: str  # the apt-get line for everything missing ("" when nothing is)

    @property
    def ok(self) -> bool:
        return not self.apt


def diagnose(apps: dict[str, list[tuple[str, tuple[str, ...]]]]) -> Report:
    """`apps`: class -> [(app name, programs)]. One row per program each app needs."""
    base = (*BASE, *RECOMMENDED)
    rows = [("(all)", "(lab)", name, REQUIREMENTS[name].installed) for name in base]
    gone = [REQUIREMENTS[name] for name in base if not REQUIREMENTS[name].installed]
    for label, entries in apps.items():
        for app, programs in entries:
            for name in expand(programs):
                if name in BASE:
                    continue
                req = REQUIREMENTS[name]
                rows.append((label, app, name, req.installed))
                if not req.installed:
                    gone.append(req)
    return Report(rows, apt_line(gone))
