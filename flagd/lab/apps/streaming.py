"""Streaming: nginx serving HLS over HTTPS (ffmpeg plays at playback rate), and icecast2 radio
over TLS (an ffmpeg source, curl listening).
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

from flagd.lab.apps.base import App, RunContext, _chown, _client, _remove, curl_tls, wait_tcp
from flagd.lab.pki import DOMAIN
from flagd.lab.topology import SERVER_ADDR, Client, LabError

# -- streaming: nginx serving HLS over HTTPS, ffmpeg pulling at playback rate ------------------

# (name, video size, video bitrate): the renditions a player can pick from
_RENDITIONS = (
    ("low", "426x240", "400k"),
    ("mid", "640x360", "1000k"),
    ("high", "960x540", "2500k"),
)


def _kbit(rate: str) -> int:
    """ffmpeg's "2500k" as 2500."""
    return int(rate.rstrip("k"))


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
    protocols = "\n        ssl_protocols TLSv1.2 TLSv1.3;" if ctx.vary_tls else ""
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
        ssl_certificate_key {ctx.pki.key};{protocols}
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

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        # under session conditions only the renditions the link carries at playback rate
        fits = [r[0] for r in _RENDITIONS if not budget_mbit or _kbit(r[2]) * 1.5 / 1000 <= budget_mbit]
        return {
            "rendition": rng.choice(fits or [_RENDITIONS[0][0]]),
            "watch_seconds": round(seconds * rng.uniform(0.6, 1.0), 1),
            "rate_mbit": budget_mbit or rng.choice([5, 10, 20, 50]),
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
    tls_suites13 = True

    def start(self, ctx: RunContext) -> None:
        _start_icecast(ctx)

    def params(
        self, rng: random.Random, seconds: float, budget_mbit: float | None = None
    ) -> dict:
        return {
            "station": rng.choice(list(_STATIONS)),
            "listen_seconds": round(seconds * rng.uniform(0.6, 1.0), 1),
            "rate_mbit": budget_mbit or rng.choice([2, 5, 10, 20]),
        }

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        port = ctx.shared["icecast"]
        out = ctx.workdir(f"client-{client.index}") / "stream"
        out.unlink(missing_ok=True)
        argv = [
            "curl", "--silent", "--show-error", "--fail", "--cacert", str(ctx.pki.ca),
            *curl_tls(params), "--max-time", str(params["listen_seconds"]), "-o", str(out),
            f"https://{SERVER_ADDR}:{port}/{params['station']}",
        ]  # fmt: skip
        try:
            rc = _client(ctx, client, argv, params)
            # a live stream never ends: curl stopping at --max-time (28) is the normal end
            got = out.stat().st_size if out.exists() else 0
            return 0 if rc == 28 and got > 0 else (rc or 1)
        finally:
            _remove([out])


class IcecastFfmpeg(Icecast):
    """An internet-radio player: ffmpeg reads a live station from icecast2 over HTTPS for the
    session's length, as a player would (demuxing, output discarded): the second client of
    icecast-https."""

    name = "icecast-ffmpeg"
    programs = ("icecast2", "ffmpeg")
    tls_suites13 = None  # ffmpeg has no option for the TLS version or suite

    def session(self, ctx: RunContext, client: Client, params: dict) -> int:
        port = ctx.shared["icecast"]
        argv = [
            "ffmpeg", "-nostdin", "-loglevel", "error", "-ca_file", str(ctx.pki.ca),
            "-tls_verify", "1", "-i", f"https://{SERVER_ADDR}:{port}/{params['station']}",
            "-t", str(params["listen_seconds"]), "-c", "copy", "-f", "null", "-",
        ]  # fmt: skip
        return _client(ctx, client, argv, params)
