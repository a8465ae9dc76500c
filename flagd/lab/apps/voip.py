"""VoIP: auto-answering baresip over SIP/TLS (or UDP) with SRTP, called by baresip or linphonec."""

from __future__ import annotations

import contextlib
import queue
import random
import subprocess
import threading
import time
from pathlib import Path

from flagd.lab.apps.base import App, RunContext, wait_tcp
from flagd.lab.topology import SERVER_ADDR, Client, Lab, LabError

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

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
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

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
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
