"""IRC-over-TLS chat client and echo bot for the lab (standard library only), run as a program.

    irc_client.py echo --host IP --port N --ca CA --nick bot --channels '#lab0,#lab1'
    irc_client.py chat --host IP --port N --ca CA --nick user0 --channel '#lab0' --peer bot
                       --messages K --rate R --min-len A --max-len B --seed S

Both connect with TLS, verifying the server against CA, register (NICK/USER) and answer the
server's PINGs. `echo` joins its channels, prints "ready" once it is in all of them and then
repeats every channel message back into the channel, forever. `chat` joins its channel, checks
the peer is there, sends K messages at about R per second (exponential gaps) of random length
(split into several PRIVMSGs above what one IRC line holds, as clients do), waits for the
echoes and QUITs. Exit status 0 only when every line was echoed back, so a session that did
not really chat is never labelled.
"""

from __future__ import annotations

import argparse
import random
import select
import socket
import ssl
import string
import sys
import time

ALPHABET = string.ascii_letters + string.digits + " .,!?"
# An IRC line is at most 512 bytes with CR LF (RFC 2812 2.3); the server prefixes relayed
# messages with the sender's nick!user@host, so a client keeps its text well below that.
MAX_TEXT = 400


class Irc:
    """One registered IRC connection over TLS: a line reader that answers PINGs itself."""

    def __init__(
        self, host: str, port: int, ca: str, nick: str, version: str | None = None,
        cipher: str | None = None,
    ) -> None:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if version:  # exactly this version ("1.2", "1.3")
            ctx.minimum_version = ctx.maximum_version = getattr(
                ssl.TLSVersion, "TLSv" + version.replace(".", "_")
            )
        if cipher:  # a TLS 1.2 suite (ssl cannot choose 1.3 suites)
            ctx.set_ciphers(cipher)
        raw = socket.create_connection((host, port), timeout=15)
        # the certificate carries the server's address as a SAN: this verifies for real
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.buf = b""
        self.nick = nick
        self.send(f"NICK {nick}")
        self.send(f"USER {nick} 0 * :flagd lab {nick}")
        for _, command, params in self.lines(time.monotonic() + 15):
            if command == "001":  # RPL_WELCOME: registered
                self.nick = params[0]
                return
            if command in ("432", "433"):  # nickname refused or in use: a left-over session
                # ngircd allows 9 characters by default
                self.nick = f"{self.nick[:5]}{random.randrange(1000)}"
                self.send(f"NICK {self.nick}")
            elif command == "ERROR":
                raise ConnectionError(f"server closed the registration: {params}")
        raise TimeoutError("no welcome from the server")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def lines(self, deadline: float):
        """Yield (prefix, command, params) of server lines until `deadline` (monotonic)."""
        while True:
            while b"\r\n" in self.buf:
                raw, self.buf = self.buf.split(b"\r\n", 1)
                prefix, command, params = parse(raw.decode(errors="replace"))
                if command == "PING":
                    self.send("PONG :" + (params[0] if params else ""))
                    continue
                yield prefix, command, params
            # TLS may hold decrypted bytes that select() cannot see: read those first
            left = deadline - time.monotonic()
            if not self.sock.pending() and (
                left <= 0 or not select.select([self.sock], [], [], left)[0]
            ):
                return
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.buf += data

    def join(self, channels: list[str]) -> set[str]:
        """Join `channels`; returns the nicks found in them (NAMES replies)."""
        self.send("JOIN " + ",".join(channels))
        waiting, nicks = {c.lower() for c in channels}, set()
        for _, command, params in self.lines(time.monotonic() + 15):
            if command == "353":  # RPL_NAMREPLY: nick list, op/voice sigils in front
                nicks |= {n.lstrip("@+") for n in params[-1].split()}
            elif command == "366":  # RPL_ENDOFNAMES: one per joined channel
                waiting.discard(params[1].lower())
                if not waiting:
                    return nicks
            elif command in ("403", "405", "471", "473", "474", "475"):
                raise ConnectionError(f"cannot join: {params}")
        raise TimeoutError(f"not joined to {sorted(waiting)}")


def parse(line: str) -> tuple[str, str, list[str]]:
    """':prefix COMMAND a b :trailing text' -> (prefix, COMMAND, [a, b, 'trailing text'])."""
    prefix = ""
    if line.startswith(":"):
        prefix, _, line = line[1:].partition(" ")
    head, colon, trailing = line.partition(" :")
    words = head.split()
    params = words[1:] + ([trailing] if colon else [])
    return prefix, (words[0].upper() if words else ""), params


def echo(a: argparse.Namespace) -> int:
    irc = Irc(a.host, a.port, a.ca, a.nick)
    irc.join(a.channels.split(","))
    print("ready", flush=True)
    while True:
        for prefix, command, params in irc.lines(time.monotonic() + 60):
            sender = prefix.split("!")[0]
            if command == "PRIVMSG" and params[0].startswith("#") and sender != irc.nick:
                irc.send(f"PRIVMSG {params[0]} :{params[-1]}")


def chat(a: argparse.Namespace) -> int:
    rng = random.Random(a.seed)
    irc = Irc(a.host, a.port, a.ca, a.nick, a.tls_version, a.cipher)
    if a.peer not in irc.join([a.channel]):
        print(f"{a.peer} is not in {a.channel}", file=sys.stderr)
        return 2
    sent = echoed = 0

    def count(until: float) -> None:
        nonlocal echoed
        for prefix, command, params in irc.lines(until):
            if command == "PRIVMSG" and prefix.split("!")[0] == a.peer and params[0] == a.channel:
                echoed += 1

    for _ in range(a.messages):
        count(time.monotonic() + rng.expovariate(a.rate))  # reading while "typing"
        text = "".join(rng.choices(ALPHABET, k=rng.randint(a.min_len, a.max_len))).strip() or "."
        for k in range(0, len(text), MAX_TEXT):
            irc.send(f"PRIVMSG {a.channel} :{text[k : k + MAX_TEXT]}")
            sent += 1
    deadline = time.monotonic() + 10
    while echoed < sent and time.monotonic() < deadline:
        count(min(deadline, time.monotonic() + 0.5))
    irc.send("QUIT :bye")
    try:  # the server answers QUIT with ERROR and closes: read to the end
        for _ in irc.lines(time.monotonic() + 5):
            pass
    except OSError:  # ConnectionError, or an SSLError for a close without close_notify
        pass
    irc.sock.close()
    print(f"sent {sent} lines, {echoed} echoed", file=sys.stderr)
    return 0 if sent and echoed >= sent else 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["echo", "chat"])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--nick", required=True)
    p.add_argument("--channels", default="#lab")  # echo: the channels to serve
    p.add_argument("--channel", default="#lab")  # chat: the channel to talk in
    p.add_argument("--peer", default="bot")
    p.add_argument("--messages", type=int, default=5)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--min-len", type=int, default=5)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tls-version", choices=["1.2", "1.3"])
    p.add_argument("--cipher")
    a = p.parse_args()
    return echo(a) if a.mode == "echo" else chat(a)


if __name__ == "__main__":
    sys.exit(main())
