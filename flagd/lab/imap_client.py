"""IMAPS mail-client session for the lab (stdlib imaplib), run as a program in a client namespace.

    imap_client.py --host IP --port N --ca CA --user U --password P --append K --size-kb S
                   --fetch F --think T --seed SEED [--tls-version 1.2|1.3] [--cipher SUITE]

Logs in over implicit TLS, appends K messages of about S KiB (a client saving sent mail), reads
up to F messages with pauses of about T seconds (a user reading), deletes what it appended and
logs out. Exit status 0 only when every command succeeded.
"""

import argparse
import imaplib
import random
import ssl
import sys
import time
from email.message import EmailMessage


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("--host", "--ca", "--user", "--password"):
        p.add_argument(name, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--append", type=int, default=1)
    p.add_argument("--size-kb", type=float, default=4)
    p.add_argument("--fetch", type=int, default=3)
    p.add_argument("--think", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tls-version", choices=["1.2", "1.3"])  # exactly this version
    p.add_argument("--cipher")  # an OpenSSL TLS 1.2 suite (ssl cannot choose 1.3 suites)
    a = p.parse_args()
    rng = random.Random(a.seed)
    ctx = ssl.create_default_context(cafile=a.ca)
    if a.tls_version:
        ctx.minimum_version = ctx.maximum_version = getattr(
            ssl.TLSVersion, "TLSv" + a.tls_version.replace(".", "_")
        )
    if a.cipher:
        ctx.set_ciphers(a.cipher)
    imap = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=ctx, timeout=30)
    # The server certificate carries the server's address as a SAN, so this verifies for real.
    imap.login(a.user, a.password)
    imap.select("INBOX")
    for k in range(a.append):
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = a.user, a.user, f"lab message {k}"
        msg.set_content(rng.randbytes(max(1, int(rng.uniform(0.5, 1.5) * a.size_kb * 1024))).hex())
        typ, _ = imap.append("INBOX", "", imaplib.Time2Internaldate(time.time()), msg.as_bytes())
        if typ != "OK":
            return 2
    typ, data = imap.search(None, "ALL")
    ids = data[0].split() if typ == "OK" else []
    for num in rng.sample(ids, min(a.fetch, len(ids))):
        time.sleep(rng.expovariate(1 / a.think) if a.think > 0 else 0)
        if imap.fetch(num, "(RFC822)")[0] != "OK":
            return 3
    # Keep the mailbox small for later sessions: delete everything but a few messages.
    for num in ids[: max(0, len(ids) - 5)]:
        imap.store(num, "+FLAGS", "\\Deleted")
    imap.expunge()
    imap.close()
    imap.logout()
    return 0


if __name__ == "__main__":
    sys.exit(main())
