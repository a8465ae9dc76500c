"""Torrent: opentracker and an aria2c seeder; aria2c or transmission-cli leechers, encryption
required.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

from flagd.lab.apps.base import App, RunContext, _client, _remove, wait_tcp
from flagd.lab.topology import SERVER_ADDR, Client, LabError

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

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        rate = budget_mbit or rng.choice([2, 5, 10, 20])
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


class RTorrent(Aria2):
    """rtorrent (libtorrent, not aria2's own engine) leeching in daemon mode: encryption required
    (RC4 for the whole stream, as MSE allows), no DHT, PEX or UDP trackers; it shuts itself down
    once the download finishes."""

    name = "rtorrent"
    programs = ("opentracker", "aria2c", "mktorrent", "rtorrent")

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        torrent = ctx.shared["torrent"]["torrents"][params["torrent"]]
        dest = self._download(ctx, client)
        # a fresh session directory each time: resume data would make it skip the transfer
        base = ctx.lab.state / f"client-{client.index}/rtorrent"
        shutil.rmtree(base, ignore_errors=True)
        (base / "session").mkdir(parents=True)
        done, port = base / "finished", params["port"]
        # the options' values hold commas, which -o cannot carry: a config file does
        rc = base / "rtorrent.rc"
        rc.write_text(
            f"""system.daemon.set = true
session.path.set = {base}/session
directory.default.set = {dest}
dht.mode.set = disable
protocol.pex.set = no
trackers.use_udp.set = no
network.port_range.set = {port}-{port}
network.port_random.set = no
protocol.encryption.set = allow_incoming,try_outgoing,require,require_RC4
method.set_key = event.download.finished,lab_done,"execute.nothrow=touch,{done} ; system.shutdown.normal="
load.start = {torrent}
"""
        )
        try:
            rc_ = _client(ctx, client, ["rtorrent", "-n", "-o", f"import={rc}"], params)
            return 0 if done.exists() else (rc_ or 1)
        finally:
            self._download(ctx, client)
