"""The lab's applications: for each traffic class, real servers and clients from Debian packages.

An `App` starts its servers once per run in the server namespace (`start`), draws the parameters
of one session from the run's random generator (`params`), and runs one client session in a
client namespace (`session`, returning the client's exit status). Configs, accounts and data live
in the run's state directory; certificates come from `pki`. Servers run in the foreground as
children of the lab so teardown can kill them, and as their own users where they refuse root.

Each app names the programs it needs (`programs`); `doctor` maps those to Debian packages.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from flagd.lab.pki import DOMAIN, Pki
from flagd.lab.topology import SERVER_ADDR, Client, Lab, LabError, in_netns

HERE = Path(__file__).resolve().parent
DEBIAN_PYTHON = "/usr/bin/python3"  # has Debian's python3-slixmpp; flagd's own python may not


@dataclass
class RunContext:
    """What every app of one run shares."""

    lab: Lab
    pki: Pki
    rng: random.Random
    random_ports: bool = False  # draw server ports at random (defeats port shortcuts)
    session_seconds: float = 10.0  # target length of one session
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


class App:
    label: ClassVar[str]  # the traffic class: the directory its captures go to
    name: ClassVar[str]  # application and variant, e.g. "xmpp-starttls"
    programs: ClassVar[tuple[str, ...]]  # executables needed (doctor maps them to packages)
    plaintext_start: ClassVar[bool] = False  # does the session open with plaintext signalling?

    def start(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def params(self, rng: random.Random, seconds: float) -> dict:
        raise NotImplementedError

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        raise NotImplementedError


# -- chat: prosody + slixmpp -------------------------------------------------------------------


def _chat_params(rng: random.Random, seconds: float) -> dict:
    """One chat session: `messages` texts of `min_len`..`max_len` characters, `rate` a second."""
    rate = rng.choice([0.3, 0.5, 1.0, 2.0, 4.0])
    return {
        "messages": max(2, int(rate * seconds * rng.uniform(0.5, 0.9))),
        "rate": rate,
        "min_len": rng.randint(1, 20),
        "max_len": rng.choice([60, 200, 800]),
        "seed": rng.randrange(1 << 30),
    }


class Xmpp(App):
    """XMPP chat with prosody; a slixmpp echo bot in the server namespace answers every message."""

    label = "chat"
    name = "xmpp-starttls"
    programs = ("prosody", "prosodyctl", DEBIAN_PYTHON)
    plaintext_start = True  # stream header and STARTTLS before TLS
    direct_tls = False

    def start(self, ctx: RunContext) -> None:
        if "xmpp" in ctx.shared:  # both variants share one prosody
            return
        if (
            not Path(DEBIAN_PYTHON).exists()
            or subprocess.run(
                [DEBIAN_PYTHON, "-c", "import slixmpp"], capture_output=True
            ).returncode
        ):
            raise LabError("the chat client needs python3-slixmpp for /usr/bin/python3")
        base = ctx.workdir("prosody")
        (base / "data").mkdir(exist_ok=True)
        starttls, direct = ctx.port(5222, "xmpp"), ctx.port(5223, "xmpps")
        cfg = base / "prosody.cfg.lua"
        cfg.write_text(
            f"""
pidfile = "{base}/prosody.pid"
data_path = "{base}/data"
log = {{ info = "*console" }}
interfaces = {{ "{SERVER_ADDR}" }}
c2s_ports = {{ {starttls} }}
c2s_direct_tls_ports = {{ {direct} }}
s2s_ports = {{ }}
c2s_require_encryption = true
authentication = "internal_hashed"
plugin_paths = {{ }}
modules_enabled = {{ "roster"; "saslauth"; "tls"; "disco"; "ping"; "posix" }}
modules_disabled = {{ "s2s" }}
ssl = {{ certificate = "{ctx.pki.chain}"; key = "{ctx.pki.key}"; }}
c2s_direct_tls_ssl = {{ certificate = "{ctx.pki.chain}"; key = "{ctx.pki.key}"; }}
VirtualHost "{DOMAIN}"
"""
        )
        _chown(base, "prosody")
        lab = ctx.lab
        for user in ("bot", *(f"user{c.index}" for c in lab.clients)):
            res = lab.run(
                lab.server,
                ["prosodyctl", "--config", str(cfg), "register", user, DOMAIN, "labpass"],
                user="prosody",
            )
            if res.returncode:
                raise LabError(f"prosodyctl register failed: {(res.stderr or res.stdout)[-300:]}")
        proc = lab.popen(
            lab.server, ["prosody", "--config", str(cfg), "-F"], user="prosody", log="prosody"
        )
        wait_tcp(lab, starttls, proc=proc)
        bot = lab.popen(
            lab.server,
            [DEBIAN_PYTHON, str(HERE / "xmpp_bot.py"), "echo", f"--jid=bot@{DOMAIN}",
             "--password=labpass", f"--host={SERVER_ADDR}", f"--port={starttls}",
             f"--ca={ctx.pki.ca}", f"--seed={ctx.rng.randrange(1 << 30)}"],
            stdout=subprocess.PIPE, stderr=open(lab.state / "xmpp-bot.log", "ab"), text=True,
        )  # fmt: skip
        line = _readline(bot, 20)
        if line != "ready":
            raise LabError(f"XMPP echo bot did not log in: {lab.log('xmpp-bot')[-300:]}")
        ctx.shared["xmpp"] = (starttls, direct)

    def params(self, rng: random.Random, seconds: float) -> dict:
        return _chat_params(rng, seconds)

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        starttls, direct = ctx.shared["xmpp"]
        argv = [
            DEBIAN_PYTHON, str(HERE / "xmpp_bot.py"), "chat", f"--jid=user{client.index}@{DOMAIN}",
            "--password=labpass", f"--host={SERVER_ADDR}", f"--port={direct if self.direct_tls else starttls}",
            f"--ca={ctx.pki.ca}", f"--peer=bot@{DOMAIN}", f"--messages={params['messages']}",
            f"--rate={params['rate']}", f"--min-len={params['min_len']}",
            f"--max-len={params['max_len']}", f"--seed={params['seed']}",
        ]  # fmt: skip
        if self.direct_tls:
            argv.append("--direct-tls")
        return _client(ctx, client, argv, params)


class XmppTls(Xmpp):
    """The same chat over direct TLS (port 5223, XEP-0368): no plaintext before the handshake."""

    name = "xmpp-tls"
    plaintext_start = False
    direct_tls = True


# -- chat: ngircd (IRC over TLS) + a standard-library client and echo bot -----------------------

_IRC_BOT = "bot"


def _irc_channel(client: Client) -> str:
    # one channel per lab client: parallel sessions never see each other's messages
    return f"#lab{client.index}"


class IrcTls(App):
    """IRC over TLS (port 6697) with ngircd; an echo bot in the server namespace, in every
    client's channel, repeats each channel message back (two-way traffic, like the XMPP bot)."""

    label = "chat"
    name = "irc-tls"
    programs = ("ngircd",)

    def start(self, ctx: RunContext) -> None:
        if "irc" in ctx.shared:
            return
        lab = ctx.lab
        base = ctx.workdir("ngircd")
        port = ctx.port(6697, "ircs")
        conf = base / "ngircd.conf"
        # No [Global] Ports: ngircd then opens no plaintext listener at all, only [SSL] Ports.
        # No DNS or ident lookups (an ident query would be a connection back to the client),
        # no PAM; MaxConnectionsIP 0 (no limit): a killed session may leave its connection.
        conf.write_text(
            f"""[Global]
Name = irc.{DOMAIN}
Info = flagd lab IRC
AdminInfo1 = flagd lab
AdminInfo2 = {DOMAIN}
AdminEMail = admin@{DOMAIN}
Listen = {SERVER_ADDR}
MotdPhrase = Welcome to the flagd lab.
PidFile = {base}/ngircd.pid
ServerUID = irc
ServerGID = irc
[Limits]
MaxConnectionsIP = 0
[Options]
DNS = no
Ident = no
PAM = no
[SSL]
CertFile = {ctx.pki.chain}
KeyFile = {ctx.pki.key}
Ports = {port}
"""
        )
        _chown(base, "irc")
        # as irc from the start (setpriv), in the foreground: teardown kills its process group
        proc = lab.popen(
            lab.server, ["/usr/sbin/ngircd", "--nodaemon", "--config", str(conf)],
            user="irc", log="ngircd",
        )  # fmt: skip
        wait_tcp(lab, port, proc=proc)
        bot = lab.popen(
            lab.server,
            [sys.executable, str(HERE / "irc_client.py"), "echo", f"--host={SERVER_ADDR}",
             f"--port={port}", f"--ca={ctx.pki.ca}", f"--nick={_IRC_BOT}",
             "--channels=" + ",".join(_irc_channel(c) for c in lab.clients)],
            stdout=subprocess.PIPE, stderr=open(lab.state / "irc-bot.log", "ab"), text=True,
        )  # fmt: skip
        if _readline(bot, 20) != "ready":
            raise LabError(f"IRC echo bot did not join: {lab.log('irc-bot')[-300:]}")
        ctx.shared["irc"] = port

    def params(self, rng: random.Random, seconds: float) -> dict:
        return _chat_params(rng, seconds)

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        argv = [
            sys.executable, str(HERE / "irc_client.py"), "chat", f"--host={SERVER_ADDR}",
            f"--port={ctx.shared['irc']}", f"--ca={ctx.pki.ca}", f"--nick=user{client.index}",
            f"--channel={_irc_channel(client)}", f"--peer={_IRC_BOT}",
            f"--messages={params['messages']}", f"--rate={params['rate']}",
            f"--min-len={params['min_len']}", f"--max-len={params['max_len']}",
            f"--seed={params['seed']}",
        ]  # fmt: skip
        return _client(ctx, client, argv, params)


# -- email: postfix (SMTP, STARTTLS required) + dovecot (IMAPS) --------------------------------

_POSTFIX_SERVICES = """\
{port} inet n - n - - smtpd
{smtps} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def _start_mail(ctx: RunContext) -> tuple[int, int, int]:
    """postfix (SMTP with STARTTLS required) delivering into a Maildir that dovecot serves over
    IMAPS; both started once per run. Returns (smtp, imaps, smtps) ports."""
    if "mail" in ctx.shared:
        return ctx.shared["mail"]
    lab, pki = ctx.lab, ctx.pki
    base = ctx.workdir("mail")
    box = base / "box"
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    _chown(box, "mail")
    smtp, imaps = ctx.port(25, "smtp"), ctx.port(993, "imaps")
    smtps = ctx.port(465, "smtps")  # submission over implicit TLS (RFC 8314)
    conf, spool, data = base / "postfix", base / "spool", base / "data"
    for d in (conf, spool, data):
        d.mkdir(exist_ok=True)
    shutil.chown(data, "postfix", "postfix")
    # Postfix with a private config directory fails silently until the config is complete:
    # every directory, map and service it needs is spelled out here, chroot off everywhere.
    (conf / "main.cf").write_text(
        f"""compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = {SERVER_ADDR}
inet_protocols = ipv4
myhostname = mail.{DOMAIN}
mydomain = {DOMAIN}
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {base}
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:8
virtual_gid_maps = static:8
virtual_mailbox_limit = 0
virtual_minimum_uid = 8
message_size_limit = 52428800
smtpd_tls_security_level = encrypt
smtpd_tls_cert_file = {pki.chain}
smtpd_tls_key_file = {pki.key}
smtpd_tls_auth_only = yes
smtpd_relay_restrictions = permit_mynetworks reject_unauth_destination
mynetworks = 127.0.0.0/8
maillog_file = /dev/stdout
biff = no
"""
    )
    (conf / "master.cf").write_text(_POSTFIX_SERVICES.format(port=smtp, smtps=smtps))
    res = lab.run(lab.server, ["postfix", "-c", str(conf), "check"])
    if res.returncode:
        raise LabError(f"postfix check failed: {(res.stderr or res.stdout)[-300:]}")
    proc = lab.popen(lab.server, ["postfix", "-c", str(conf), "start-fg"], log="postfix")
    wait_tcp(lab, smtp, proc=proc)
    dove = base / "dovecot"
    dove.mkdir(exist_ok=True)
    (dove / "dovecot.conf").write_text(
        f"""base_dir = {dove}/run
state_dir = {dove}/state
log_path = /dev/stderr
protocols = imap
listen = {SERVER_ADDR}
ssl = required
ssl_cert = <{pki.chain}
ssl_key = <{pki.key}
disable_plaintext_auth = yes
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 8
passdb {{
  driver = static
  args = password=labpass
}}
userdb {{
  driver = static
  args = uid=8 gid=8 home={box}
}}
mail_location = maildir:{box}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
"""
    )
    proc = lab.popen(lab.server, ["dovecot", "-F", "-c", str(dove / "dovecot.conf")], log="dovecot")
    wait_tcp(lab, imaps, proc=proc)
    ctx.shared["mail"] = (smtp, imaps, smtps)
    return smtp, imaps, smtps


class Smtp(App):
    """Mail submission with swaks over SMTP + STARTTLS (required by the server), with an
    attachment of random size."""

    label = "email"
    name = "smtp-starttls"
    programs = ("postfix", "dovecot", "swaks")
    plaintext_start = True  # greeting, EHLO and STARTTLS before TLS
    implicit = False

    def start(self, ctx: RunContext) -> None:
        _start_mail(ctx)

    def params(self, rng: random.Random, seconds: float) -> dict:
        return {
            "attachment_kb": round(
                rng.choice([1, 4, 16, 64, 256, 1024]) * rng.uniform(0.5, 1.5), 1
            ),
            "body_chars": rng.randint(50, 5000),
            "seed": rng.randrange(1 << 30),
        }

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        smtp, _, smtps = ctx.shared["mail"]
        rng = random.Random(params["seed"])
        work = ctx.workdir(f"client-{client.index}")
        attach, body = work / "attachment.bin", work / "body.txt"
        attach.write_bytes(rng.randbytes(int(params["attachment_kb"] * 1024)))
        body.write_text(_text(rng, params["body_chars"]))
        argv = [
            "swaks", "--server", SERVER_ADDR, "--port", str(smtps if self.implicit else smtp),
            "--helo", f"client{client.index}.{DOMAIN}", "--from", f"user{client.index}@{DOMAIN}",
            "--to", f"box@{DOMAIN}", "--tlsc" if self.implicit else "--tls", "--tls-verify",
            "--tls-ca-path", str(ctx.pki.ca), "--body", f"@{body}", "--attach", f"@{attach}",
            "--suppress-data", "--timeout", "30",
        ]  # fmt: skip
        return _client(ctx, client, argv, params)


class Smtps(Smtp):
    """The same submission over implicit TLS (port 465): nothing in plaintext."""

    name = "smtps"
    plaintext_start = False
    implicit = True


class Imaps(App):
    """A mail client over IMAPS (implicit TLS, port 993): append, read and delete messages."""

    label = "email"
    name = "imaps"
    programs = ("postfix", "dovecot")

    def start(self, ctx: RunContext) -> None:
        _start_mail(ctx)

    def params(self, rng: random.Random, seconds: float) -> dict:
        return {
            "append": rng.randint(0, 3),
            "size_kb": rng.choice([1, 8, 64, 256]),
            "fetch": rng.randint(1, 6),
            "think": round(seconds / 8 * rng.uniform(0.5, 1.5), 2),
            "seed": rng.randrange(1 << 30),
        }

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        _, imaps, _ = ctx.shared["mail"]
        argv = [
            sys.executable, str(HERE / "imap_client.py"), f"--host={SERVER_ADDR}", f"--port={imaps}",
            f"--ca={ctx.pki.ca}", f"--user=user{client.index}", "--password=labpass",
            f"--append={params['append']}", f"--size-kb={params['size_kb']}",
            f"--fetch={params['fetch']}", f"--think={params['think']}", f"--seed={params['seed']}",
        ]  # fmt: skip
        return _client(ctx, client, argv, params)


# -- file transfer: OpenSSH (sftp and scp, get and put) -------------------------------------------


def _start_sshd(ctx: RunContext) -> int:
    """sshd in the foreground with per-run host and client keys; root logs in by key only,
    into a files directory in the run's state. Returns the port."""
    if "ssh" in ctx.shared:
        return ctx.shared["ssh"][0]
    lab = ctx.lab
    base = ctx.workdir("ssh", 0o700)
    files = ctx.workdir("ssh/files", 0o700)
    port = ctx.port(22, "ssh")
    for kind in ("ed25519", "ecdsa"):
        _keygen(base / f"host_{kind}", kind)
    _keygen(base / "client", "ed25519")
    (base / "authorized_keys").write_text((base / "client.pub").read_text())
    host_pub = (base / "host_ed25519.pub").read_text().split()[:2]
    host = SERVER_ADDR if port == 22 else f"[{SERVER_ADDR}]:{port}"
    (base / "known_hosts").write_text(f"{host} {' '.join(host_pub)}\n")
    (base / "sshd_config").write_text(
        f"""Port {port}
ListenAddress {SERVER_ADDR}
HostKey {base}/host_ed25519
HostKey {base}/host_ecdsa
PidFile {base}/sshd.pid
AuthorizedKeysFile {base}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
MaxStartups 64
MaxSessions 64
Subsystem sftp internal-sftp
"""
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    proc = lab.popen(
        lab.server, ["/usr/sbin/sshd", "-D", "-e", "-f", str(base / "sshd_config")], log="sshd"
    )
    wait_tcp(lab, port, proc=proc)
    ctx.shared["ssh"] = (port, base, files)
    return port


def _keygen(path: Path, kind: str) -> None:
    res = subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "flagd-lab", "-f", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if res.returncode:
        raise LabError(f"ssh-keygen failed: {res.stderr[-200:]}")


class Sftp(App):
    """OpenSSH's sftp client getting and putting random files (the SSH banner is plaintext)."""

    label = "file-transfer"
    name = "sftp"
    programs = ("sshd", "sftp", "ssh-keygen")
    plaintext_start = True  # SSH version banners

    def start(self, ctx: RunContext) -> None:
        _start_sshd(ctx)

    def params(self, rng: random.Random, seconds: float) -> dict:
        rate = rng.choice([2, 5, 10, 20])  # Mbit/s, tbf on both directions of the client link
        budget = rate * 1e6 / 8 * seconds  # bytes that fit in the session at that rate
        return {
            "rate_mbit": rate,
            "direction": rng.choice(["get", "put", "both"]),
            "files": rng.randint(1, 3),
            "file_kb": max(4, int(budget / 1024 / 3 * rng.uniform(0.1, 0.9))),
            "cipher": rng.choice(
                ["chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-ctr"]
            ),
            "seed": rng.randrange(1 << 30),
        }

    def _files(
        self, ctx: RunContext, client: Client, params: dict
    ) -> tuple[list[Path], list[Path]]:
        """(remote files to get, local files to put), freshly written with random bytes."""
        _, _, files = ctx.shared["ssh"]
        rng = random.Random(params["seed"])
        local = ctx.workdir(f"client-{client.index}/ssh")
        gets, puts = [], []
        for k in range(params["files"]):
            size = int(params["file_kb"] * 1024 * rng.uniform(0.5, 1.5))
            if params["direction"] in ("get", "both"):
                path = files / f"c{client.index}-get{k}.bin"
                path.write_bytes(rng.randbytes(size))
                gets.append(path)
            if params["direction"] in ("put", "both"):
                path = local / f"put{k}.bin"
                path.write_bytes(rng.randbytes(size))
                puts.append(path)
        return gets, puts

    def _ssh_options(self, ctx: RunContext, params: dict) -> list[str]:
        _, base, _ = ctx.shared["ssh"]
        return [
            "-i", str(base / "client"), "-o", f"UserKnownHostsFile={base / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-o", f"Ciphers={params['cipher']}", "-o", "ConnectTimeout=10",
        ]  # fmt: skip

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        port, _, files = ctx.shared["ssh"]
        gets, puts = self._files(ctx, client, params)
        local = ctx.workdir(f"client-{client.index}/ssh")
        batch = local / "batch"
        lines = [f"get {p} {local}/" for p in gets]
        lines += [f"put {p} {files}/c{client.index}-{p.name}" for p in puts]
        batch.write_text("\n".join(lines) + "\n")
        argv = ["sftp", *self._ssh_options(ctx, params), "-P", str(port), "-b", str(batch)]
        try:
            return _client(ctx, client, [*argv, f"root@{SERVER_ADDR}"], params)
        finally:
            _remove(gets, local.glob("*.bin"), files.glob(f"c{client.index}-put*"))


class Scp(Sftp):
    """OpenSSH's scp (SFTP protocol underneath since OpenSSH 9), one connection per direction."""

    name = "scp"
    programs = ("sshd", "scp", "ssh-keygen")

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        port, _, files = ctx.shared["ssh"]
        gets, puts = self._files(ctx, client, params)
        local = ctx.workdir(f"client-{client.index}/ssh")
        base = ["scp", "-q", *self._ssh_options(ctx, params), "-P", str(port)]
        remote = f"root@{SERVER_ADDR}:"
        try:
            rc = 0
            if gets:
                rc = _client(
                    ctx, client, [*base, *(remote + str(p) for p in gets), f"{local}/"], params
                )
            if puts and rc == 0:
                dest = f"{remote}{files}/"
                rc = _client(ctx, client, [*base, *map(str, puts), dest], params)
            return rc
        finally:
            _remove(gets, local.glob("*.bin"), files.glob("put*"))


# -- streaming: nginx serving HLS over HTTPS, ffmpeg pulling at playback rate ------------------

# (name, video size, video bitrate): the renditions a player can pick from
_RENDITIONS = (
    ("low", "426x240", "400k"),
    ("mid", "640x360", "1000k"),
    ("high", "960x540", "2500k"),
)


def _start_nginx(ctx: RunContext) -> int:
    """nginx (HTTPS, HTTP/1.1) serving the run's HLS renditions and download files."""
    if "nginx" in ctx.shared:
        return ctx.shared["nginx"]
    lab = ctx.lab
    base = ctx.workdir("nginx")
    www = ctx.workdir("nginx/www")
    for sub in ("tmp", "logs"):
        (base / sub).mkdir(exist_ok=True)
    port = ctx.port(443, "https")
    (base / "nginx.conf").write_text(
        f"""worker_processes 1;
pid {base}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    types {{ application/vnd.apple.mpegurl m3u8; video/mp2t ts; application/octet-stream bin; }}
    access_log off;
    client_body_temp_path {base}/tmp/body;
    proxy_temp_path {base}/tmp/proxy;
    fastcgi_temp_path {base}/tmp/fastcgi;
    uwsgi_temp_path {base}/tmp/uwsgi;
    scgi_temp_path {base}/tmp/scgi;
    sendfile on;
    keepalive_timeout 30;
    server {{
        listen {SERVER_ADDR}:{port} ssl;
        server_name {DOMAIN} *.{DOMAIN};
        ssl_certificate {ctx.pki.chain};
        ssl_certificate_key {ctx.pki.key};
        root {www};
    }}
}}
"""
    )
    _make_hls(ctx, www)
    proc = lab.popen(
        lab.server,
        ["nginx", "-c", str(base / "nginx.conf"), "-p", str(base), "-g", "daemon off;"],
        log="nginx",
    )
    wait_tcp(lab, port, proc=proc)
    ctx.shared["nginx"] = port
    return port


def _make_hls(ctx: RunContext, www: Path) -> None:
    """Encode a synthetic programme (moving test pattern with a tone) into HLS renditions of
    2 s segments. Done once per run, niced: it is the lab's only CPU-heavy step."""
    seconds = int(max(20, 3 * ctx.session_seconds))
    for name, size, rate in _RENDITIONS:
        out = www / "hls" / name
        out.mkdir(parents=True, exist_ok=True)
        argv = [
            "nice", "ffmpeg", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency={ctx.rng.randint(200, 900)}:duration={seconds}",
            "-c:v", "libx264", "-preset", "veryfast", "-b:v", rate, "-maxrate", rate,
            "-bufsize", rate, "-g", "50", "-c:a", "aac", "-b:a", "96k", "-threads", "1",
            "-f", "hls", "-hls_time", "2", "-hls_playlist_type", "vod",
            "-hls_segment_filename", str(out / "seg%03d.ts"), str(out / "index.m3u8"),
        ]  # fmt: skip
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode:
            raise LabError(f"ffmpeg could not make the HLS rendition {name}: {res.stderr[-300:]}")


class Hls(App):
    """A viewer: ffmpeg plays an HLS rendition over HTTPS at playback rate (-re)."""

    label = "streaming"
    name = "hls-https"
    programs = ("nginx", "ffmpeg")

    def start(self, ctx: RunContext) -> None:
        _start_nginx(ctx)

    def params(self, rng: random.Random, seconds: float) -> dict:
        return {
            "rendition": rng.choice([r[0] for r in _RENDITIONS]),
            "watch_seconds": round(seconds * rng.uniform(0.6, 1.0), 1),
            "rate_mbit": rng.choice([5, 10, 20, 50]),
        }

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        port = ctx.shared["nginx"]
        url = f"https://{SERVER_ADDR}:{port}/hls/{params['rendition']}/index.m3u8"
        argv = [
            "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-ca_file", str(ctx.pki.ca),
            "-tls_verify", "1", "-i", url, "-t", str(params["watch_seconds"]),
            "-c", "copy", "-f", "null", "-",
        ]  # fmt: skip
        return _client(ctx, client, argv, params)


class HttpsDownload(App):
    """curl downloading files over HTTPS (one connection, or one per file with --parallel) from
    the same nginx as streaming: file transfer that is not SSH."""

    label = "file-transfer"
    name = "https-download"
    programs = ("nginx", "ffmpeg", "curl")

    def start(self, ctx: RunContext) -> None:
        _start_nginx(ctx)

    def params(self, rng: random.Random, seconds: float) -> dict:
        rate = rng.choice([2, 5, 10, 20])
        budget = rate * 1e6 / 8 * seconds
        return {
            "rate_mbit": rate,
            "files": rng.randint(1, 3),
            "file_kb": max(4, int(budget / 1024 / 3 * rng.uniform(0.1, 0.9))),
            "parallel": rng.random() < 0.3,
            "seed": rng.randrange(1 << 30),
        }

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        port = ctx.shared["nginx"]
        rng = random.Random(params["seed"])
        files = ctx.workdir("nginx/www/files")
        names = []
        for k in range(params["files"]):
            path = files / f"c{client.index}-{k}.bin"
            path.write_bytes(rng.randbytes(int(params["file_kb"] * 1024 * rng.uniform(0.5, 1.5))))
            path.chmod(0o644)
            names.append(path)
        argv = ["curl", "--silent", "--show-error", "--fail", "--cacert", str(ctx.pki.ca)]
        argv += ["--parallel"] if params["parallel"] else []
        for path in names:
            argv += ["-o", "/dev/null", f"https://{SERVER_ADDR}:{port}/files/{path.name}"]
        try:
            return _client(ctx, client, argv, params)
        finally:
            _remove(names)


# -- streaming: icecast2 (HTTPS only), an ffmpeg source, curl listening -----------------------

# mount -> (ffmpeg encoder arguments, muxer, content type): the run's radio stations
_STATIONS = {
    "opus-64.ogg": (["-c:a", "libopus", "-b:a", "64k"], "ogg", "audio/ogg"),
    "vorbis-128.ogg": (["-c:a", "libvorbis", "-b:a", "128k"], "ogg", "audio/ogg"),
    "mp3-192.mp3": (["-c:a", "libmp3lame", "-b:a", "192k"], "mp3", "audio/mpeg"),
}


def _music(ctx: RunContext, path: Path) -> None:
    """30 s of stereo 'music' at 48 kHz: a stepping melody over a drone, with noise so the
    encoders have to spend their bits. Looped by the source."""
    notes = "(220+55*(floor(2*t)-8*floor(t/4)))"  # eight steps a bar; no commas (lavfi)
    left = f"0.3*sin(2*PI*{notes}*t)+0.1*sin(2*PI*110*t)+0.05*random(0)"
    right = f"0.3*sin(2*PI*1.5*{notes}*t)+0.1*sin(2*PI*165*t)+0.05*random(1)"
    res = subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         f"aevalsrc={left}|{right}:s=48000:d=30", "-c:a", "pcm_s16le", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if res.returncode:
        raise LabError(f"ffmpeg could not make the music file: {res.stderr[-300:]}")


def _start_icecast(ctx: RunContext) -> int:
    """icecast2 with one listener, HTTPS (the run's certificate), on the server's address, and
    one ffmpeg source encoding every station live over TLS. Returns the port."""
    if "icecast" in ctx.shared:
        return ctx.shared["icecast"]
    lab = ctx.lab
    base = ctx.workdir("icecast")
    (base / "log").mkdir(exist_ok=True)
    port = ctx.port(8443, "icecast")
    # One <listen-socket>, with <ssl>: no plaintext port. icecast refuses to run as root, and
    # setpriv cannot switch to it (its group is not named after its user): icecast drops to
    # icecast2:icecast itself (<changeowner>) once its socket is bound.
    (base / "icecast.xml").write_text(
        f"""<icecast>
  <location>flagd lab</location>
  <admin>admin@{DOMAIN}</admin>
  <hostname>{DOMAIN}</hostname>
  <limits><clients>64</clients><sources>{len(_STATIONS)}</sources></limits>
  <authentication>
    <source-password>labpass</source-password>
    <admin-user>admin</admin-user>
    <admin-password>labpass</admin-password>
  </authentication>
  <listen-socket>
    <port>{port}</port>
    <bind-address>{SERVER_ADDR}</bind-address>
    <ssl>1</ssl>
  </listen-socket>
  <fileserve>0</fileserve>
  <paths>
    <basedir>/usr/share/icecast2</basedir>
    <logdir>{base}/log</logdir>
    <webroot>/usr/share/icecast2/web</webroot>
    <adminroot>/usr/share/icecast2/admin</adminroot>
    <pidfile>{base}/icecast.pid</pidfile>
    <ssl-certificate>{ctx.pki.combined}</ssl-certificate>
  </paths>
  <logging><accesslog>-</accesslog><errorlog>-</errorlog><loglevel>3</loglevel></logging>
  <security>
    <chroot>0</chroot>
    <changeowner><user>icecast2</user><group>icecast</group></changeowner>
  </security>
</icecast>
"""
    )
    _chown(base, "icecast2", "icecast")
    proc = lab.popen(lab.server, ["icecast2", "-c", str(base / "icecast.xml")], log="icecast")
    wait_tcp(lab, port, proc=proc)
    music = base / "music.wav"
    _music(ctx, music)
    # the source: one ffmpeg, the music looped at its own pace, one live encode per station
    argv = ["nice", "ffmpeg", "-nostdin", "-loglevel", "warning", "-re", "-stream_loop", "-1"]
    argv += ["-i", str(music)]
    for mount, (codec, muxer, mime) in _STATIONS.items():
        argv += ["-map", "0:a", *codec, "-content_type", mime, "-tls", "1", "-f", muxer]
        argv.append(f"icecast://source:labpass@{SERVER_ADDR}:{port}/{mount}")
    source = lab.popen(lab.server, argv, log="icecast-source")
    deadline = time.monotonic() + 20
    while True:  # a listener that comes before its station gets a 404
        log = lab.log("icecast")
        if all(f'mountpoint "/{mount}"' in log for mount in _STATIONS):
            break
        if source.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"icecast source did not start: {lab.log('icecast-source')[-300:]}")
        time.sleep(0.2)
    ctx.shared["icecast"] = port
    return port


class Icecast(App):
    """An internet-radio listener: curl pulls a live Ogg/Opus, Ogg/Vorbis or MP3 station from
    icecast2 over HTTPS for the session's length (the start is icecast's burst, then the
    station's bitrate)."""

    label = "streaming"
    name = "icecast-https"
    programs = ("icecast2", "ffmpeg", "curl")

    def start(self, ctx: RunContext) -> None:
        _start_icecast(ctx)

    def params(self, rng: random.Random, seconds: float) -> dict:
        return {
            "station": rng.choice(list(_STATIONS)),
            "listen_seconds": round(seconds * rng.uniform(0.6, 1.0), 1),
            "rate_mbit": rng.choice([2, 5, 10, 20]),
        }

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        port = ctx.shared["icecast"]
        out = ctx.workdir(f"client-{client.index}") / "stream"
        out.unlink(missing_ok=True)
        argv = [
            "curl", "--silent", "--show-error", "--fail", "--cacert", str(ctx.pki.ca),
            "--max-time", str(params["listen_seconds"]), "-o", str(out),
            f"https://{SERVER_ADDR}:{port}/{params['station']}",
        ]  # fmt: skip
        try:
            rc = _client(ctx, client, argv, params)
            # a live stream never ends: curl stopping at --max-time (28) is the normal end
            got = out.stat().st_size if out.exists() else 0
            return 0 if rc == 28 and got > 0 else (rc or 1)
        finally:
            _remove([out])


# -- voip: baresip (SIP over TLS or UDP, SRTP, opus / G.722 / G.711) ---------------------------

# codec -> (baresip codec spec, sample rate, channels). baresip 1.0 does not resample: the audio
# file must have exactly the codec's rate and channel count, so each codec gets its own file and
# its own answering instance.
_CODECS = {
    "opus": ("opus/48000/2", 48000, 2),
    "g722": ("G722/16000/1", 16000, 1),
    "pcmu": ("PCMU/8000/1", 8000, 1),
}


def _baresip_config(ctx: RunContext, directory: Path, listen: str, account: str, wav: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config").write_text(
        f"""poll_method epoll
sip_listen {listen}
sip_certificate {ctx.pki.combined}
sip_cafile {ctx.pki.ca}
audio_player aufile,/dev/null
audio_source aufile,{wav}
audio_alert aufile,/dev/null
rtp_ports 10000-40000
module_path /usr/lib/baresip/modules
module opus.so
module g722.so
module g711.so
module aufile.so
module srtp.so
module_app account.so
module_app menu.so
"""
    )
    (directory / "accounts").write_text(account + "\n")
    (directory / "contacts").write_text("")


def _voice(ctx: RunContext, codec: str) -> Path:
    """A mono/stereo test voice for `codec`: a tone that glides, with noise (so opus has to
    work for it), at exactly the codec's sample rate."""
    _, rate, channels = _CODECS[codec]
    path = ctx.lab.state / "voip" / f"voice-{codec}.wav"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        seconds = int(max(30, 4 * ctx.session_seconds))
        src = f"aevalsrc=0.4*sin(2*PI*(200+100*sin(0.5*t))*t)+0.05*random(0):s={rate}:d={seconds}"
        res = subprocess.run(
            ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", src, "-ac", str(channels),
             "-ar", str(rate), "-c:a", "pcm_s16le", str(path)],
            capture_output=True, text=True,
        )  # fmt: skip
        if res.returncode:
            raise LabError(f"ffmpeg could not make the voice file: {res.stderr[-300:]}")
    return path


def _start_baresip(ctx: RunContext) -> dict[str, int]:
    """One auto-answering baresip per codec; returns codec -> SIP port (TLS is port + 1)."""
    if "sip" in ctx.shared:
        return ctx.shared["sip"]
    lab = ctx.lab
    ports = {}
    for k, (codec, (spec, _, _)) in enumerate(_CODECS.items()):
        port = ctx.port(5060 + 10 * k, f"sip-{codec}")
        directory = lab.state / "voip" / f"server-{codec}"
        account = (
            f"<sip:{codec}@{SERVER_ADDR};transport=tls>;regint=0;answermode=auto;"
            f"mediaenc=srtp-mand;audio_codecs={spec}"
        )
        _baresip_config(ctx, directory, f"{SERVER_ADDR}:{port}", account, _voice(ctx, codec))
        proc = lab.popen(
            lab.server, ["baresip", "-f", str(directory)], log=f"baresip-{codec}",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_tcp(lab, port + 1, proc=proc)  # the TLS listener, opened last
        ports[codec] = port
    ctx.shared["sip"] = ports
    return ports


class Sip(App):
    """A phone call: baresip dials an auto-answering baresip over SIP/TLS, SRTP media (SDES)."""

    label = "voip"
    name = "sip-tls"
    programs = ("baresip", "ffmpeg")
    transport = "tls"

    def start(self, ctx: RunContext) -> None:
        _start_baresip(ctx)

    def params(self, rng: random.Random, seconds: float) -> dict:
        return {
            "codec": rng.choice(list(_CODECS)),
            "call_seconds": max(3, int(seconds * rng.uniform(0.6, 1.0))),
        }

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        ports = ctx.shared["sip"]
        codec = params["codec"]
        spec = _CODECS[codec][0]
        port = ports[codec] + (1 if self.transport == "tls" else 0)
        directory = ctx.lab.state / "voip" / f"client-{client.index}-{codec}-{client.addr}"
        if not directory.exists():
            account = (
                f"<sip:user{client.index}@{client.addr};transport={self.transport}>;regint=0;"
                f"mediaenc=srtp-mand;audio_codecs={spec}"
            )
            _baresip_config(ctx, directory, f"{client.addr}:5060", account, _voice(ctx, codec))
        target = f"sip:{codec}@{SERVER_ADDR}:{port};transport={self.transport}"
        argv = ["baresip", "-f", str(directory), "-t", str(params["call_seconds"] + 1)]
        # baresip takes its SDP media address from one interface: in a VPN session that must be
        # the tunnel's, or the server would send RTP to the client's outer address
        argv += ["-n", _interface_of(ctx.lab, client)]
        try:
            res = ctx.lab.run(
                client.ns, [*argv, "-e", f"/dial {target}"], stdin=subprocess.DEVNULL,
                timeout=params["call_seconds"] + 30,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return 124
        with open(ctx.lab.state / f"client-{client.index}.log", "a") as fh:
            fh.write(f"\n$ {' '.join(argv)}\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
        # baresip exits 0 whatever happened to the call: the call must have been established
        return 0 if res.returncode == 0 and "Call established" in res.stdout else 1


def _interface_of(lab: Lab, client: Client) -> str:
    """The interface holding `client.addr` in its namespace (the tunnel's in VPN sessions)."""
    res = lab.run(client.ns, ["ip", "-o", "-4", "addr", "show"])
    for line in res.stdout.splitlines():
        words = line.split()
        if len(words) > 3 and words[3].split("/")[0] == client.addr:
            return words[1]
    return client.ifname


class SipUdp(Sip):
    """The same call with SIP over UDP: plaintext signalling (SDP carries the SRTP keys)."""

    name = "sip-udp"
    transport = "udp"
    plaintext_start = True


# -- voip: linphonec (liblinphone) calling the same baresip auto-answerers --------------------

# codec -> liblinphone's (mime, RTP clock rate, channels): G.722 runs at an 8000 RTP clock
# (RFC 3551) whatever its 16 kHz audio, and liblinphone names it so.
_LINPHONE_CODECS = {
    "opus": ("opus", 48000, 2),
    "g722": ("G722", 8000, 1),
    "pcmu": ("PCMU", 8000, 1),
}
# SDES crypto suites for liblinphone to offer: baresip 1.0 answers an AES-256 offer with an
# AES-128 suite, which liblinphone rejects, so only the two AES-128 ones work with it
_SRTP_SUITES = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
# linphonec's lines that end a call attempt (a refused INVITE, a failed handshake, a hang-up)
_LINPHONE_FAILED = (" error.", " ended (", "Error from linphone_core_invite")


def _linphone_config(ctx: RunContext, client: Client, params: dict) -> str:
    """A complete linphonerc for one call. Nothing in it names anything outside the lab: no
    account (no REGISTER), no STUN/TURN/ICE/uPnP, no remote provisioning, no DNS SRV."""
    mime, rate, channels = _LINPHONE_CODECS[params["codec"]]
    # The client has no default route, so liblinphone's guess of its own address (the route
    # to a public address) gives 127.0.0.1: the SDP would send the server's RTP to itself.
    # rtp/bind_address fixes the media address, guess_hostname=0 keeps From on the contact.
    # verify_server_cn=0: the lab's certificate names the server by an IP SAN, which mbedTLS
    # 2.28 cannot match; the chain is still verified against the run's CA. SIP over TLS only,
    # and as a client only (port -2: no listening socket).
    return f"""[sip]
sip_port=0
sip_tcp_port=0
sip_tls_port=-2
contact=sip:user{client.index}@{client.addr}
guess_hostname=0
use_ipv6=0
dns_srv_enabled=0
dns_search_enabled=0
root_ca={ctx.pki.ca}
verify_server_certs=1
verify_server_cn=0
media_encryption=srtp
media_encryption_mandatory=1
srtp_crypto_suites={params["srtp_suite"]}
[net]
nat_policy_ref=lab
[nat_policy_0]
ref=lab
protocols=
[rtp]
bind_address={client.addr}
audio_rtp_port=10000-40000
[sound]
echocancellation=0
tone_indications=0
[video]
display=0
capture=0
automatically_initiate=0
automatically_accept=0
[audio_codec_0]
mime={mime}
rate={rate}
channels={channels}
enabled=1
"""


def _linphone_call(
    ctx: RunContext, client: Client, argv: list[str], commands: list[str], seconds: float
) -> int:
    """Drive linphonec through its command prompt: send `commands` (the last one places the
    call), hold the call `seconds` once its media run, hang up and quit. 0 only when the media
    were established and the call lasted until our hang-up; linphonec is killed if it hangs."""
    lab = ctx.lab
    lines: queue.Queue[str | None] = queue.Queue()
    with open(lab.state / f"client-{client.index}.log", "a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        proc = lab.popen(
            client.ns, argv, must_live=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
        )  # fmt: skip

        def pump() -> None:  # a thread: readline after select() would miss buffered lines
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                lines.put(line)
            lines.put(None)

        def send(command: str, timeout: float = 10) -> None:
            """Send one command and wait until linphonec has taken it (it echoes it after its
            prompt): its stdin reader keeps one line, and overwrites it with the next."""
            assert proc.stdin is not None
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
            if not wait_for((command,), timeout):  # None: no echo in time, "": it exited
                raise TimeoutError(f"linphonec did not take {command!r}")

        def wait_for(words: tuple[str, ...], timeout: float) -> str | None:
            """The first line holding one of `words` within `timeout` seconds ("" at EOF)."""
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    line = lines.get(timeout=left)
                except queue.Empty:
                    break
                if line is None:
                    return ""
                if any(w in line for w in words):
                    return line
            return None

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        ok = False
        try:
            # liblinphone starts in about a second (the first command waits for that) and a lab
            # call is set up in a tenth of one; 30 s each covers a loaded machine
            for k, command in enumerate(commands):
                send(command, 30 if k == 0 else 10)
            line = wait_for(("Media streams established", *_LINPHONE_FAILED), 30)
            if line and "Media streams established" in line:
                ok = wait_for(_LINPHONE_FAILED, seconds) is None  # no hang-up from the far end
                send("terminate")
                wait_for((" ended (",), 5)
            send("quit")
        except OSError:  # linphonec died (a broken pipe) or stopped taking commands
            ok = False
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]  # EOF makes linphonec quit too
            lab.reap(proc, 10)
            reader.join(5)
    if proc.returncode < 0:  # killed by reap: it hung
        return 124
    return proc.returncode if proc.returncode else (0 if ok else 1)


class Linphone(App):
    """A phone call from linphonec (liblinphone 5) to the auto-answering baresip of `Sip`:
    SIP over TLS, SRTP (SDES, suite drawn), audio from a wav file (the lab has no sound card)."""

    label = "voip"
    name = "linphone-tls"
    programs = ("baresip", "ffmpeg", "linphonec")

    def start(self, ctx: RunContext) -> None:
        _start_baresip(ctx)

    def params(self, rng: random.Random, seconds: float) -> dict:
        return {
            "codec": rng.choice(list(_CODECS)),
            "call_seconds": max(3, int(seconds * rng.uniform(0.6, 1.0))),
            "srtp_suite": rng.choice(_SRTP_SUITES),
        }

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        codec = params["codec"]
        target = f"sip:{codec}@{SERVER_ADDR}:{ctx.shared['sip'][codec] + 1};transport=tls"
        # HOME holds liblinphone's database: without a directory to create it in, the core
        # never leaves its startup state (no SIP transport, every call fails at once)
        home = ctx.workdir(f"client-{client.index}/linphone")
        (home / ".local/share/linphone").mkdir(parents=True, exist_ok=True)
        config = home / "linphonerc"
        config.write_text(_linphone_config(ctx, client, params))
        argv = ["env", f"HOME={home}", "linphonec", "-c", str(config)]
        # file mode: the wav is the microphone, and what the far end sends is dropped
        commands = ["soundcard use files", f"play {_voice(ctx, codec)}", f"call {target}"]
        return _linphone_call(ctx, client, argv, commands, params["call_seconds"])


# -- torrent: opentracker + an aria2c seeder; aria2c / transmission-cli leechers --------------

_TORRENT_MB = (0.5, 2, 6, 12)  # the run's torrents: one file each, random bytes
_ARIA_BT = [
    "--enable-dht=false", "--enable-dht6=false", "--enable-peer-exchange=false",
    "--bt-enable-lpd=false", "--bt-require-crypto=true", "--bt-min-crypto-level=arc4",
    "--disable-ipv6=true", "--summary-interval=0", "--console-log-level=warn",
]  # fmt: skip


def _start_torrents(ctx: RunContext) -> dict:
    """opentracker (whitelisting the run's torrents: Debian's build accepts nothing else) and
    an aria2c seeding them, encryption required."""
    if "torrent" in ctx.shared:
        return ctx.shared["torrent"]
    lab = ctx.lab
    base = ctx.workdir("torrent")
    tracker, seed = ctx.workdir("torrent/tracker"), ctx.workdir("torrent/seed")
    port, peer_port = ctx.port(6969, "tracker"), ctx.port(6881, "seeder")
    announce = f"http://{SERVER_ADDR}:{port}/announce"
    torrents, hashes = [], []
    for k, mb in enumerate(_TORRENT_MB):
        data = seed / f"file{k}.bin"
        data.write_bytes(ctx.rng.randbytes(int(mb * 1e6)))
        torrent = base / f"file{k}.torrent"
        piece = 15 if mb < 1 else 16 if mb < 4 else 18  # 32 KiB .. 256 KiB pieces
        res = subprocess.run(
            ["mktorrent", "-a", announce, "-l", str(piece), "-o", str(torrent), str(data)],
            capture_output=True, text=True,
        )  # fmt: skip
        if res.returncode:
            raise LabError(f"mktorrent failed: {res.stderr[-300:]}")
        info = subprocess.run(["aria2c", "-S", str(torrent)], capture_output=True, text=True)
        found = [ln.split()[-1] for ln in info.stdout.splitlines() if ln.startswith("Info Hash:")]
        if not found:
            raise LabError(f"cannot read the info hash of {torrent.name}")
        torrents.append(torrent)
        hashes.append(found[0])
    (tracker / "whitelist").write_text("\n".join(hashes) + "\n")
    # opentracker chroots into its rootdir and drops to nobody: paths are inside the chroot.
    (tracker / "opentracker.conf").write_text(
        f"access.whitelist /whitelist\nlisten.tcp {SERVER_ADDR}:{port}\n"
        f"listen.udp {SERVER_ADDR}:{port}\ntracker.rootdir {tracker}\ntracker.user nobody\n"
    )
    proc = lab.popen(
        lab.server, ["opentracker", "-f", str(tracker / "opentracker.conf")], log="opentracker"
    )
    wait_tcp(lab, port, proc=proc)
    argv = ["aria2c", f"--dir={seed}", "--seed-ratio=0.0"]
    argv += [f"--listen-port={peer_port}", "--bt-seed-unverified=true", *_ARIA_BT]
    proc = lab.popen(lab.server, [*argv, *map(str, torrents)], log="aria2-seeder")
    wait_tcp(lab, peer_port, proc=proc)
    ctx.shared["torrent"] = {"torrents": torrents, "tracker": port}
    return ctx.shared["torrent"]


class Aria2(App):
    """aria2c leeching one of the run's torrents from the seeder (tracker announce is HTTP)."""

    label = "torrent"
    name = "aria2"
    programs = ("opentracker", "aria2c", "mktorrent")
    plaintext_start = True  # the tracker announce is plaintext HTTP (its own flow)

    def start(self, ctx: RunContext) -> None:
        _start_torrents(ctx)

    def params(self, rng: random.Random, seconds: float) -> dict:
        rate = rng.choice([2, 5, 10, 20])
        # only torrents that download in about half the session at that rate (peers ramp up
        # slowly, transmission especially); the smallest always qualifies
        fits = [k for k, mb in enumerate(_TORRENT_MB) if mb * 8 / rate <= seconds / 2] or [0]
        return {"torrent": rng.choice(fits), "rate_mbit": rate, "port": rng.randint(20000, 60000)}

    def _download(self, ctx: RunContext, client: Client) -> Path:
        path = ctx.workdir(f"client-{client.index}/torrent")
        for old in path.iterdir():
            _remove([old])
        return path

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        torrent = ctx.shared["torrent"]["torrents"][params["torrent"]]
        dest = self._download(ctx, client)
        limit = int(max(10, 3 * ctx.session_seconds))
        argv = ["aria2c", f"--dir={dest}", "--seed-time=0", f"--listen-port={params['port']}"]
        argv += [f"--bt-stop-timeout={limit}", *_ARIA_BT, str(torrent)]
        try:
            return _client(ctx, client, argv, params)
        finally:
            self._download(ctx, client)


class Transmission(Aria2):
    """transmission-cli leeching (encryption required); stops itself once the file is complete."""

    name = "transmission"
    programs = ("opentracker", "aria2c", "mktorrent", "transmission-cli")

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        torrent = ctx.shared["torrent"]["torrents"][params["torrent"]]
        dest = self._download(ctx, client)
        # a fresh config directory each time: resume data of an earlier session of the same
        # torrent would make transmission-cli consider it complete and exit without a transfer
        shutil.rmtree(ctx.lab.state / f"client-{client.index}/transmission", ignore_errors=True)
        config = ctx.workdir(f"client-{client.index}/transmission")
        done = config / "done.sh"
        # transmission-cli never exits by itself: the on-finish script stops it
        done.write_text('#!/bin/sh\ntouch "$(dirname "$0")/finished"\nkill -INT $PPID\n')
        done.chmod(0o755)
        (config / "finished").unlink(missing_ok=True)
        # No DHT/LPD/PEX/uTP: peers come from the lab's tracker only, and nothing is looked up.
        settings = {"dht-enabled": False, "lpd-enabled": False, "pex-enabled": False}
        settings |= {"utp-enabled": False, "encryption": 2, "port-forwarding-enabled": False}
        (config / "settings.json").write_text(json.dumps(settings))
        argv = ["transmission-cli", "-er", "-M", "-p", str(params["port"]), "-g", str(config)]
        argv += ["-w", str(dest), "-f", str(done), str(torrent)]
        try:
            rc = _client(ctx, client, argv, params)
            return 0 if (config / "finished").exists() else (rc or 1)
        finally:
            self._download(ctx, client)


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


APPS: dict[str, type[App]] = {
    a.name: a
    for a in (
        Xmpp,
        XmppTls,
        IrcTls,
        Smtp,
        Smtps,
        Imaps,
        Sftp,
        Scp,
        HttpsDownload,
        Hls,
        Icecast,
        Sip,
        SipUdp,
        Linphone,
        Aria2,
        Transmission,
    )
}
CLASSES: dict[str, list[str]] = {}
for _app in APPS.values():
    CLASSES.setdefault(_app.label, []).append(_app.name)
