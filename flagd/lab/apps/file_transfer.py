"""File transfer: OpenSSH's sftp and scp against a per-run sshd, and curl downloading over
HTTPS from the streaming class's nginx.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from flagd.lab.apps.base import App, RunContext, _client, _remove, curl_tls, wait_tcp
from flagd.lab.apps.streaming import _start_nginx
from flagd.lab.topology import SERVER_ADDR, Client, LabError

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

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        # Mbit/s: the session's conditions (budget), or a tbf drawn here on both directions
        rate = budget_mbit or rng.choice([2, 5, 10, 20])
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


class HttpsDownload(App):
    """curl downloading files over HTTPS (one connection, or one per file with --parallel) from
    the same nginx as streaming: file transfer that is not SSH."""

    label = "file-transfer"
    name = "https-download"
    programs = ("nginx", "ffmpeg", "curl")
    tls_suites13 = True

    def start(self, ctx: RunContext) -> None:
        _start_nginx(ctx)

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        rate = budget_mbit or rng.choice([2, 5, 10, 20])
        budget = rate * 1e6 / 8 * seconds
        return {
            "rate_mbit": rate,
            "files": rng.randint(1, 3),
            "file_kb": max(4, int(budget / 1024 / 3 * rng.uniform(0.1, 0.9))),
            "parallel": rng.random() < 0.3,
            "seed": rng.randrange(1 << 30),
        }

    def _files(self, ctx: RunContext, client: Client, params: dict) -> list[Path]:
        """The session's files, freshly written with random bytes where nginx serves them."""
        rng = random.Random(params["seed"])
        files = ctx.workdir("nginx/www/files")
        names = []
        for k in range(params["files"]):
            path = files / f"c{client.index}-{k}.bin"
            path.write_bytes(rng.randbytes(int(params["file_kb"] * 1024 * rng.uniform(0.5, 1.5))))
            path.chmod(0o644)
            names.append(path)
        return names

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        port = ctx.shared["nginx"]
        names = self._files(ctx, client, params)
        argv = ["curl", "--silent", "--show-error", "--fail", "--cacert", str(ctx.pki.ca)]
        argv += [*curl_tls(params), *(["--parallel"] if params["parallel"] else [])]
        for path in names:
            argv += ["-o", "/dev/null", f"https://{SERVER_ADDR}:{port}/files/{path.name}"]
        try:
            return _client(ctx, client, argv, params)
        finally:
            _remove(names)


# the bulk cipher of each suite `draw_tls` may pick, as GnuTLS names it
_GNUTLS_CIPHERS = {"AES128-GCM": "AES-128-GCM", "AES_128_GCM": "AES-128-GCM",
                   "AES256-GCM": "AES-256-GCM", "AES_256_GCM": "AES-256-GCM",
                   "CHACHA20": "CHACHA20-POLY1305"}  # fmt: skip


def gnutls_priority(version: str, cipher: str | None) -> str:
    """A GnuTLS priority string for exactly this TLS version and suite (Debian's wget is built
    with GnuTLS: its --secure-protocol=TLSv1_3 fails, and --ciphers takes a priority string)."""
    priority = f"NORMAL:-VERS-ALL:+VERS-TLS{version}"
    if cipher:
        bulk = next(g for name, g in _GNUTLS_CIPHERS.items() if name in cipher)
        priority += f":-CIPHER-ALL:+{bulk}"
    return priority


class WgetDownload(HttpsDownload):
    """GNU wget downloading the same kind of files from the same nginx: another HTTPS client
    (its own TLS library, GnuTLS, and one keep-alive connection for all files)."""

    name = "wget-https"
    programs = ("nginx", "ffmpeg", "wget")
    tls_suites13 = True  # through a GnuTLS priority string

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        port = ctx.shared["nginx"]
        names = self._files(ctx, client, params)
        argv = ["wget", "--quiet", "--ca-certificate", str(ctx.pki.ca), "-O", "/dev/null"]
        argv += ["--tries=1", "--timeout=30", "--no-config"]
        if params.get("tls_version"):
            argv.append(f"--ciphers={gnutls_priority(params['tls_version'], params['tls_cipher'])}")
        argv += [f"https://{SERVER_ADDR}:{port}/files/{path.name}" for path in names]
        try:
            return _client(ctx, client, argv, params)
        finally:
            _remove(names)
