"""Email: postfix (SMTP with STARTTLS required, or SMTPS) delivering into a Maildir that
dovecot serves over IMAPS; swaks submits, Python's imaplib reads. A second server stack beside
it: aiosmtpd (SMTPS) delivering into a Maildir that GNU Mailutils' imap4d serves over IMAPS.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time

from flagd.lab.apps.base import (
    DEBIAN_PYTHON,
    HERE,
    App,
    RunContext,
    _chown,
    _client,
    _text,
    curl_tls,
    python_tls,
    wait_tcp,
)
from flagd.lab.pki import DOMAIN
from flagd.lab.topology import MAX_CLIENTS, SERVER_ADDR, Client, LabError

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


def _swaks_tls(params: dict) -> list[str]:
    """swaks' options for the drawn TLS version and (1.2) suite."""
    version, cipher = params.get("tls_version"), params.get("tls_cipher")
    argv = ["--tls-protocol", "tlsv" + version.replace(".", "_")] if version else []
    return argv + (["--tls-cipher", cipher] if cipher else [])


class Smtp(App):
    """Mail submission with swaks over SMTP + STARTTLS (required by the server), with an
    attachment of random size."""

    label = "email"
    name = "smtp-starttls"
    programs = ("postfix", "dovecot", "swaks")
    plaintext_start = True  # greeting, EHLO and STARTTLS before TLS
    tls_suites13 = False
    implicit = False

    def start(self, ctx: RunContext) -> None:
        _start_mail(ctx)

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        return {
            "attachment_kb": round(
                rng.choice([1, 4, 16, 64, 256, 1024]) * rng.uniform(0.5, 1.5), 1
            ),
            "body_chars": rng.randint(50, 5000),
            "seed": rng.randrange(1 << 30),
        }

    def port(self, ctx: RunContext) -> int:
        """The server port this app submits to."""
        smtp, _, smtps = ctx.shared["mail"]
        return smtps if self.implicit else smtp

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        rng = random.Random(params["seed"])
        work = ctx.workdir(f"client-{client.index}")
        attach, body = work / "attachment.bin", work / "body.txt"
        attach.write_bytes(rng.randbytes(int(params["attachment_kb"] * 1024)))
        body.write_text(_text(rng, params["body_chars"]))
        argv = [
            "swaks", "--server", SERVER_ADDR, "--port", str(self.port(ctx)),
            "--helo", f"client{client.index}.{DOMAIN}", "--from", f"user{client.index}@{DOMAIN}",
            "--to", f"box@{DOMAIN}", "--tlsc" if self.implicit else "--tls", "--tls-verify",
            "--tls-ca-path", str(ctx.pki.ca), "--body", f"@{body}", "--attach", f"@{attach}",
            "--suppress-data", "--timeout", "30", *_swaks_tls(params),
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
    tls_suites13 = False

    def start(self, ctx: RunContext) -> None:
        _start_mail(ctx)

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        return {
            "append": rng.randint(0, 3),
            "size_kb": rng.choice([1, 8, 64, 256]),
            "fetch": rng.randint(1, 6),
            "think": round(seconds / 8 * rng.uniform(0.5, 1.5), 2),
            "seed": rng.randrange(1 << 30),
        }

    def port(self, ctx: RunContext) -> int:
        """The server port this app reads from."""
        return ctx.shared["mail"][1]

    def user(self, client: Client) -> str:
        return f"user{client.index}"

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        argv = [
            sys.executable, str(HERE / "imap_client.py"), f"--host={SERVER_ADDR}",
            f"--port={self.port(ctx)}", f"--ca={ctx.pki.ca}", f"--user={self.user(client)}",
            "--password=labpass",
            f"--append={params['append']}", f"--size-kb={params['size_kb']}",
            f"--fetch={params['fetch']}", f"--think={params['think']}", f"--seed={params['seed']}",
            *python_tls(params),
        ]  # fmt: skip
        return _client(ctx, client, argv, params)


class CurlImaps(Imaps):
    """curl as the IMAPS client: appends messages (APPEND), then reads some by index (FETCH),
    one connection per command, each over implicit TLS with the drawn version and suite."""

    name = "curl-imaps"
    programs = ("postfix", "dovecot", "curl")
    tls_suites13 = True

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        imaps = self.port(ctx)
        rng = random.Random(params["seed"])
        work = ctx.workdir(f"client-{client.index}")
        base = ["curl", "--silent", "--show-error", "--fail", "--cacert", str(ctx.pki.ca)]
        base += [*curl_tls(params), "--user", f"user{client.index}:labpass", "--max-time", "60"]
        box = f"imaps://{SERVER_ADDR}:{imaps}/INBOX"
        message = work / "message.eml"
        appended = max(1, params["append"])  # so the messages read below exist, whoever ran before
        for k in range(appended):
            body = rng.randbytes(max(1, int(rng.uniform(0.5, 1.5) * params["size_kb"] * 1024)))
            message.write_text(
                f"From: user{client.index}@{DOMAIN}\r\nTo: user{client.index}@{DOMAIN}\r\n"
                f"Subject: lab message {k}\r\n\r\n{body.hex()}\r\n"
            )
            rc = _client(ctx, client, [*base, "-T", str(message), box], params)
            if rc:
                return rc
        # messages 1..appended exist: imaps sessions expunge all but the newest five
        for _ in range(params["fetch"]):
            time.sleep(rng.expovariate(1 / params["think"]) if params["think"] > 0 else 0)
            url = f"{box};MAILINDEX={rng.randint(1, min(appended, 5))}"
            rc = _client(ctx, client, [*base, "-o", "/dev/null", url], params)
            if rc:
                return rc
        return 0


class CurlSmtps(Smtps):
    """curl as the mail submitter over implicit TLS (port 465): one message with a random
    attachment, MIME built by curl itself (-F), TLS version and suite drawn."""

    name = "curl-smtps"
    programs = ("postfix", "dovecot", "curl")
    tls_suites13 = True

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        smtps = self.port(ctx)
        rng = random.Random(params["seed"])
        work = ctx.workdir(f"client-{client.index}")
        attach, body = work / "attachment.bin", work / "body.txt"
        attach.write_bytes(rng.randbytes(int(params["attachment_kb"] * 1024)))
        body.write_text(_text(rng, params["body_chars"]))
        sender = f"user{client.index}@{DOMAIN}"
        argv = [
            "curl", "--silent", "--show-error", "--fail", "--cacert", str(ctx.pki.ca),
            *curl_tls(params), "--max-time", "60", "--mail-from", sender,
            "--mail-rcpt", f"box@{DOMAIN}", "-H", f"From: {sender}", "-H", f"To: box@{DOMAIN}",
            "-H", "Subject: lab mail", "-F", f"=<{body};type=text/plain",
            "-F", f"=@{attach};type=application/octet-stream",
            f"smtps://{SERVER_ADDR}:{smtps}",
        ]  # fmt: skip
        return _client(ctx, client, argv, params)


# -- email, second stack: aiosmtpd (SMTPS) + GNU Mailutils imap4d (IMAPS) -----------------------
# Debian lets one package provide mail-transport-agent and one imap-server (exim4 and
# opensmtpd conflict with postfix, courier and cyrus with dovecot). aiosmtpd (an SMTP server on
# Python's asyncio and ssl) provides neither and mailutils-imap4d (GnuTLS) conflicts with none,
# so both stacks install and run side by side, on ports of their own.

_IMAP4D_CONF = """\
logging {{ syslog no; }}
mode daemon;
foreground yes;
auth {{ authorization virtdomain; authentication generic; }}
virtdomain {{ passwd-dir "{passwd}"; }}
mailbox {{ mailbox-type maildir; }}
# the lab's key is world-readable by design (pki); imap4d refuses such keys unless told
tls-file-checks {{ key-file none; cert-file none; ca-file none; }}
server {addr}:{port} {{
  tls-mode connection;
  tls {{ ssl-certificate-file "{chain}"; ssl-key-file "{key}"; }}
}}
"""


def _start_mail_b(ctx: RunContext) -> tuple[int, int]:
    """aiosmtpd taking mail over implicit TLS into a Maildir that imap4d serves over IMAPS,
    both started once per run; aiosmtpd runs as the mail user, who owns the Maildir (as in
    the postfix stack's virtual_uid_maps). Returns (smtps, imaps) ports."""
    if "mail-b" in ctx.shared:
        return ctx.shared["mail-b"]
    lab, pki = ctx.lab, ctx.pki
    base = ctx.workdir("mail-b")
    home, passwd = base / "home", base / "passwd"
    for sub in ("cur", "new", "tmp"):  # imap4d's INBOX of a virtual user: HOME/INBOX
        (home / "INBOX" / sub).mkdir(parents=True, exist_ok=True)
    _chown(home, "mail")
    # without --random-ports, 465 and 993 may be postfix's and dovecot's on the same address
    smtps, imaps = ctx.port(10465, "smtps-aiosmtpd"), ctx.port(10993, "imaps-imap4d")
    crypted = subprocess.run(["openssl", "passwd", "-6", "labpass"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    passwd.mkdir(exist_ok=True)
    # virtdomain: logins are user@DOMAIN, looked up in PASSWD/DOMAIN; every user shares one box
    (passwd / DOMAIN).write_text("".join(
        f"user{i}:{crypted}:8:8::{home}:/bin/false\n" for i in range(MAX_CLIENTS)))
    conf = base / "imap4d.conf"
    conf.write_text(_IMAP4D_CONF.format(passwd=passwd, addr=SERVER_ADDR, port=imaps,
                                        chain=pki.chain, key=pki.key))
    proc = lab.popen(lab.server, ["imap4d", f"--config-file={conf}"], log="imap4d")
    wait_tcp(lab, imaps, proc=proc)
    proc = lab.popen(lab.server, [
        DEBIAN_PYTHON, "-m", "aiosmtpd", "--nosetuid", "--listen", f"{SERVER_ADDR}:{smtps}",
        "--smtpscert", str(pki.chain), "--smtpskey", str(pki.key),
        "--class", "aiosmtpd.handlers.Mailbox", str(home / "INBOX"),
    ], user="mail", log="aiosmtpd")  # fmt: skip
    wait_tcp(lab, smtps, proc=proc)
    ctx.shared["mail-b"] = (smtps, imaps)
    return smtps, imaps


class SmtpsAiosmtpd(Smtps):
    """swaks submitting over implicit TLS to the second stack's aiosmtpd."""

    name = "smtps-aiosmtpd"
    programs = ("aiosmtpd", "imap4d", "swaks")

    def start(self, ctx: RunContext) -> None:
        _start_mail_b(ctx)

    def port(self, ctx: RunContext) -> int:
        return ctx.shared["mail-b"][0]


class ImapsImap4d(Imaps):
    """The imaplib mail client (append, read, delete) against the second stack's imap4d."""

    name = "imaps-imap4d"
    programs = ("imap4d", "aiosmtpd")  # the server first: loio reads it as programs[0]

    def start(self, ctx: RunContext) -> None:
        _start_mail_b(ctx)

    def port(self, ctx: RunContext) -> int:
        return ctx.shared["mail-b"][1]

    def user(self, client: Client) -> str:
        return f"user{client.index}@{DOMAIN}"  # a virtdomain login names its domain
