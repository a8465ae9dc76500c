"""Chat: XMPP with prosody (slixmpp client and echo bot) and IRC over TLS with ngircd."""

from __future__ import annotations

import contextlib
import random
import string
import subprocess
import sys
import time
from pathlib import Path

from flagd.lab.apps.base import (
    DEBIAN_PYTHON,
    HERE,
    App,
    RunContext,
    _chown,
    _client,
    _readline,
    python_tls,
    wait_tcp,
)
from flagd.lab.pki import DOMAIN
from flagd.lab.topology import SERVER_ADDR, Client, LabError

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

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
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
    tls_suites13 = False

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

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        return _chat_params(rng, seconds)

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        argv = [
            sys.executable, str(HERE / "irc_client.py"), "chat", f"--host={SERVER_ADDR}",
            f"--port={ctx.shared['irc']}", f"--ca={ctx.pki.ca}", f"--nick=user{client.index}",
            f"--channel={_irc_channel(client)}", f"--peer={_IRC_BOT}",
            f"--messages={params['messages']}", f"--rate={params['rate']}",
            f"--min-len={params['min_len']}", f"--max-len={params['max_len']}",
            f"--seed={params['seed']}", *python_tls(params),
        ]  # fmt: skip
        return _client(ctx, client, argv, params)


# -- chat: sendxmpp (Net::XMPP, Perl) over direct TLS to the same prosody ----------------------


class SendXmpp(App):
    """sendxmpp in interactive mode over direct TLS (XEP-0368): each line written to its stdin
    goes out as one message to the echo bot, at the session's rate; a second XMPP client, with
    its own XML stream and TLS stack (Net::XMPP, IO::Socket::SSL)."""

    label = "chat"
    name = "sendxmpp-tls"
    programs = ("prosody", "prosodyctl", DEBIAN_PYTHON, "sendxmpp")

    def start(self, ctx: RunContext) -> None:
        Xmpp().start(ctx)  # the same prosody and echo bot

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        return _chat_params(rng, seconds)

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        lab = ctx.lab
        _, direct = ctx.shared["xmpp"]
        home = ctx.workdir(f"client-{client.index}/sendxmpp")  # it looks for ~/.sendxmpprc
        argv = [
            "env", f"HOME={home}", "sendxmpp", "--ssl", "--tls-ca-path", str(ctx.pki.ca),
            "--username", f"user{client.index}", "--password", "labpass",
            "--jserver", f"{SERVER_ADDR}:{direct}", "--component", DOMAIN,
            "--resource", "sendxmpp", "--interactive", f"bot@{DOMAIN}",
        ]  # fmt: skip
        rng = random.Random(params["seed"])
        with open(lab.state / f"client-{client.index}.log", "ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
            log.flush()
            proc = lab.popen(
                client.ns, argv, must_live=False, stdin=subprocess.PIPE, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            assert proc.stdin is not None
            try:
                for _ in range(params["messages"]):
                    time.sleep(rng.expovariate(params["rate"]))
                    n = rng.randint(params["min_len"], params["max_len"])
                    line = "".join(rng.choices(string.ascii_letters + " .,!?", k=n))
                    proc.stdin.write(line.encode() + b"\n")
                    proc.stdin.flush()
                time.sleep(0.5)  # the last echo comes back before the stream closes
            except OSError:  # sendxmpp died (broken pipe): its exit status says why
                pass
            finally:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # EOF: sendxmpp closes the stream and exits
                lab.reap(proc, 20)
        return 124 if proc.returncode < 0 else proc.returncode
