"""XMPP chat bot for the lab (slixmpp), run as a program by Debian's python3, not imported by flagd.

    xmpp_bot.py echo  --jid bot@lab.test --password P --host IP --port N --ca CA [--direct-tls]
    xmpp_bot.py chat  --jid u@lab.test --password P --host IP --port N --ca CA --peer bot@lab.test
                      --messages K --rate R --min-len A --max-len B --seed S [--direct-tls]

`echo` stays online and answers every message with a text of random length; `chat` logs in,
sends K messages at about R per second (exponential gaps), waits for the answers and logs out.
Exit status 0 only when every message was answered, so a failed login is never labelled.
"""

import argparse
import asyncio
import logging
import random
import ssl
import string
import sys

import slixmpp

ALPHABET = string.ascii_letters + string.digits + " .,!?"


def _ssl_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Echo(slixmpp.ClientXMPP):
    def __init__(self, jid, password, seed):
        super().__init__(jid, password)
        self.rng = random.Random(seed)
        self.add_event_handler("session_start", self.start)
        self.add_event_handler("message", self.reply)

    async def start(self, _event):
        self.send_presence()
        print("ready", flush=True)

    def reply(self, msg):
        if msg["type"] in ("chat", "normal"):
            text = "".join(self.rng.choices(ALPHABET, k=self.rng.randint(5, 400)))
            msg.reply(text).send()


class Chat(slixmpp.ClientXMPP):
    def __init__(self, jid, password, args):
        super().__init__(jid, password)
        self.args = args
        self.rng = random.Random(args.seed)
        self.answers = 0
        self.ok = False
        self.got = asyncio.Event()
        self.add_event_handler("session_start", self.start)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("failed_auth", lambda _e: self.disconnect())

    def on_message(self, msg):
        if msg["type"] in ("chat", "normal"):
            self.answers += 1
            self.got.set()

    async def start(self, _event):
        self.send_presence()
        await self.get_roster()
        a = self.args
        for _ in range(a.messages):
            await asyncio.sleep(self.rng.expovariate(a.rate))
            text = "".join(self.rng.choices(ALPHABET, k=self.rng.randint(a.min_len, a.max_len)))
            self.send_message(mto=a.peer, mbody=text, mtype="chat")
        deadline = asyncio.get_running_loop().time() + 10
        while self.answers < a.messages and asyncio.get_running_loop().time() < deadline:
            self.got.clear()
            try:
                await asyncio.wait_for(self.got.wait(), 1)
            except TimeoutError:
                pass
        self.ok = self.answers >= a.messages
        self.disconnect()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["echo", "chat"])
    p.add_argument("--jid", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--direct-tls", action="store_true")
    p.add_argument("--peer")
    p.add_argument("--messages", type=int, default=5)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--min-len", type=int, default=5)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    bot = Echo(a.jid, a.password, a.seed) if a.mode == "echo" else Chat(a.jid, a.password, a)
    bot.ssl_context = _ssl_context(a.ca)
    bot.connect(address=(a.host, a.port), use_ssl=a.direct_tls, force_starttls=not a.direct_tls)
    loop = asyncio.get_event_loop()
    if a.mode == "echo":
        loop.run_forever()
        return 0
    loop.run_until_complete(bot.disconnected)
    return 0 if bot.ok else 1


if __name__ == "__main__":
    sys.exit(main())
