"""Certificates and keys made fresh for each lab run (never reused, never shipped).

One throwaway CA signs one server certificate whose names cover every lab service (`lab.test`,
`*.lab.test` and the server's address), so each client can verify its server for real. Keys are
EC P-256 made by the openssl program; they live in the run's state directory and go with it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from flagd.lab.topology import SERVER_ADDR

DOMAIN = "lab.test"  # RFC 6761 reserved: never resolves outside the lab


@dataclass(frozen=True)
class Pki:
    ca: Path  # CA certificate (PEM): the trust anchor given to clients
    cert: Path  # server certificate (PEM)
    key: Path  # server private key (PEM, unencrypted)
    chain: Path  # server certificate followed by the CA's
    combined: Path  # key + certificate in one file (servers that want both together)


def make_pki(directory: Path, days: int = 2) -> Pki:
    """Generate a CA and a server certificate into `directory` (created, mode 0755)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-days", str(days), "-subj", "/CN=flagd lab CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-keyout", ca_key, "-out", ca,
    )  # fmt: skip
    _openssl("req", *ec, "-subj", f"/CN={DOMAIN}", "-keyout", key, "-out", csr)
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName=DNS:{DOMAIN},DNS:*.{DOMAIN},IP:{SERVER_ADDR}\n"
        "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"  # OpenVPN checks key usage
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", str(days), "-extfile", ext, "-out", cert,
    )  # fmt: skip
    chain, combined = directory / "chain.pem", directory / "combined.pem"
    chain.write_bytes(cert.read_bytes() + ca.read_bytes())
    combined.write_bytes(key.read_bytes() + cert.read_bytes())
    for path in (key, combined):
        # Daemons running as their own users (prosody, dovecot's login processes) must read
        # the key; the state directory itself is private to this run and removed at teardown.
        path.chmod(0o644)
    return Pki(ca, cert, key, chain, combined)


def _openssl(*args: str | Path) -> None:
    res = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.strip()[-300:]}")
