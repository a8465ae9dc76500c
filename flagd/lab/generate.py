"""`flagd lab generate`: run many short, varied client sessions and write one labelled capture each.

One run builds the lab (`topology.build_lab`), makes its certificates (`pki`), starts the servers
of the requested classes (`apps`), then works through a shuffled list of sessions (classes
interleaved, so nothing about the time of the run correlates with the label). For each session:
put the session's network conditions on the client link (`conditions`: delay, jitter, loss, rate,
MTU, congestion control; or a plain tbf with `--conditions none`), start a capture on it, run the client, stop the capture, compute per-flow
statistics, validate, and write `OUT/<class>/<session>.pcap` with at most `keep_packets` packets
per flow. Every session, kept or rejected, goes into `OUT/manifest.json`, rewritten atomically
after each one so an interrupted run still leaves a correct manifest of what it wrote.

A run resumes from that manifest: the same settings on the same `OUT` keep every session already
recorded and run the rest of the same seed's plan (`resume`). `flows_per_class` is a stopping
rule on that plan: a class's sessions are skipped once its kept flows reach the target, so a
class of one flow per session (vpn-*) and one of three (torrent) both end near it.

With `clients > 1` that many client namespaces run sessions at once, one worker thread each.
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import subprocess
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from flagd.lab import conditions
from flagd.lab.apps import APPS, CLASSES, App, RunContext
from flagd.lab.apps.base import draw_tls
from flagd.lab.conditions import Conditions
from flagd.lab.doctor import REQUIREMENTS, expand, require
from flagd.lab.pki import make_pki
from flagd.lab.record import Recorder, Rules, keep_first, session_stats, validate, write_pcap
from flagd.lab.topology import SERVER_NET, Client, Lab, LabError, build_lab, wait_quiet
from flagd.lab.tunnel import (
    ESP_PROPOSALS,
    IKE_PROPOSALS,
    Ipsec,
    OpenVpn,
    WireGuard,
    only_tunnel,
    staged_flush,
)

# The apps the honest benchmark should use: the direct-TLS variant wherever one exists (XMPP on
# 5223, SMTP submission on 465, SIP over TLS). SSH's version banner and the torrent tracker's
# HTTP announce have no encrypted variant; they stay, and the manifest marks those apps
# (`plaintext_start`) so shortcut masking can be checked against them.
BENCHMARK_APPS = (
    "xmpp-tls", "irc-tls", "smtps", "imaps", "sftp", "scp", "https-download", "hls-https",
    "icecast-https", "sip-tls", "linphone-tls", "aria2", "transmission",
    "curl-smtps", "curl-imaps", "wget-https", "icecast-ffmpeg", "sendxmpp-tls", "rtorrent",
    "smtps-aiosmtpd", "imaps-imap4d",
)  # fmt: skip
MANIFEST = "manifest.json"
OVPN_CIPHERS = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")
FORMAT = "flagd-lab/1"
TUNNELS = ("none", "wireguard", "openvpn", "ipsec")
DEFAULT_RATE_MBIT = 100  # tbf on every client link, so no session runs at memory speed
# After the client exits, the capture runs until its link has been quiet this long (FIN/ACKs),
# two round trips under a drawn delay (`drain_seconds`), at most DRAIN_LIMIT: a segment
# retransmitted late would otherwise land in the next session on the link and reject it
DRAIN_SECONDS = 0.3
DRAIN_LIMIT = 5.0


@dataclass(frozen=True)
class Settings:
    """One generation run."""

    out: Path
    classes: tuple[str, ...] = tuple(CLASSES)  # traffic classes (directories)
    apps: tuple[str, ...] = ()  # restrict to these app names (empty: every app of the classes)
    tunnels: tuple[str, ...] = ("none",)
    sessions: int = 10  # per class, spread over the class's apps
    seed: int = 0
    seconds: float = 10.0  # target length of one session
    clients: int = 1  # client namespaces running sessions at once
    random_ports: bool = False  # random server ports per run (defeats port shortcuts)
    keep_packets: int = 1000  # packets per flow kept on disk (statistics use all of them)
    # "random": network conditions drawn per session (`conditions`); "none": a plain link, as
    # every run made before conditions existed
    conditions: str = "random"
    # stop scheduling a class's sessions once its kept flows reach this (None: run the whole
    # plan); it only skips, so the plan, and what a resumed run draws, stays the seed's
    flows_per_class: int | None = None
    rules: Rules = field(default_factory=Rules)


@dataclass
class Job:
    id: str
    label: str
    app: str
    tunnel: str
    params: dict
    conditions: Conditions | None = None


def plan(settings: Settings, congestion: tuple[str, ...] = ("cubic", "reno")) -> list[Job]:
    """The sessions of a run, in run order: deterministic for a seed (and the congestion
    controls the kernel offers). Conditions come from a generator of their own, so a run
    without them draws exactly what runs made before they existed drew."""
    rng = random.Random(settings.seed)
    crng = random.Random(f"{settings.seed}/conditions")
    jobs: list[Job] = []
    for label in settings.classes:
        names = [a for a in CLASSES[label] if not settings.apps or a in settings.apps]
        if not names:
            raise LabError(f"no app of class {label!r} among {', '.join(settings.apps)}")
        for tunnel in settings.tunnels:
            for k in range(settings.sessions):
                app = names[k % len(names)]
                cond = None
                if settings.conditions == "random":
                    cond = conditions.draw(crng, congestion)
                budget = cond.budget_mbit if cond else None
                params = APPS[app]().params(rng, settings.seconds, budget)
                if cond is not None and APPS[app].tls_suites13 is not None:
                    params |= draw_tls(crng, APPS[app].tls_suites13)
                if tunnel != "none":
                    params["tunnel_port"] = rng.randint(20000, 60000)
                if tunnel == "openvpn":
                    params["tunnel_cipher"] = rng.choice(OVPN_CIPHERS)
                if tunnel == "ipsec":
                    params["tunnel_ike"] = rng.choice(IKE_PROPOSALS)
                    params["tunnel_esp"] = rng.choice(ESP_PROPOSALS)
                prefix = label if tunnel == "none" else f"vpn-{label}"
                # one vpn-* class per plain class whatever the tunnel: the tunnel is a parameter
                # (both tunnels in one run give a class two applications, like the plain ones)
                name = f"{prefix}-{app}" if tunnel == "none" else f"{prefix}-{tunnel}-{app}"
                jobs.append(Job(f"{name}-{k:05d}", prefix, app, tunnel, params, cond))
    rng.shuffle(jobs)
    return jobs


def check_settings(settings: Settings) -> list[type[App]]:
    """The app classes a run needs; LabError/MissingPrograms when it cannot run as asked."""
    unknown = [c for c in settings.classes if c not in CLASSES]
    if unknown:
        raise LabError(f"unknown class {unknown[0]!r}; classes: {', '.join(CLASSES)}")
    bad = [t for t in settings.tunnels if t not in TUNNELS]
    if bad:
        raise LabError(
            f"tunnel {bad[0]!r} is not available yet (built: {', '.join(TUNNELS)}); "
            f"tunnels: {', '.join(TUNNELS)}"
        )
    if settings.conditions not in conditions.MODES:
        raise LabError(
            f"conditions {settings.conditions!r}: one of {', '.join(conditions.MODES)}"
        )
    if settings.sessions < 1 or settings.seconds <= 0:
        raise LabError("sessions must be >= 1 and seconds > 0")
    if settings.flows_per_class is not None and settings.flows_per_class < 1:
        raise LabError("flows_per_class must be >= 1")
    apps = [
        APPS[name]
        for label in settings.classes
        for name in CLASSES[label]
        if not settings.apps or name in settings.apps
    ]
    for app in apps:
        require(app.programs, f"class {app.label} ({app.name})")
    for tunnel in (WireGuard, OpenVpn, Ipsec):
        if tunnel.name in settings.tunnels:
            require(tunnel.programs, f"the {tunnel.name} tunnel")
    return apps


def versions(programs: list[str]) -> dict[str, str]:
    """Debian package versions of what the run used (dpkg-query), plus flagd's and the kernel's."""
    from importlib.metadata import PackageNotFoundError, version

    packages = sorted({REQUIREMENTS[p].package for p in programs})
    out: dict[str, str] = {}
    res = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *packages],
        capture_output=True,
        text=True,
    )
    for line in res.stdout.splitlines():
        name, _, ver = line.partition(" ")
        out[name] = ver
    try:
        out["flagd"] = version("flagd")
    except PackageNotFoundError:
        out["flagd"] = "unknown"
    out["kernel"] = platform.release()
    return out


class Manifest:
    """The run's manifest, kept in memory and rewritten atomically after every session."""

    def __init__(self, settings: Settings, programs: list[str]) -> None:
        s = asdict(settings)
        s["out"] = str(settings.out)
        self.doc: dict = {
            "format": FORMAT,
            "created": _now(),
            "finished": None,
            "interrupted": False,
            "seed": settings.seed,
            "settings": s,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
            "versions": versions(programs),
            "apps": {
                name: {"class": APPS[name].label, "plaintext_start": APPS[name].plaintext_start}
                for name in sorted({a for c in settings.classes for a in CLASSES[c]})
                if not settings.apps or name in settings.apps
            },
            "lab": {},
            "sessions": [],
            "summary": {},
        }
        self.path = settings.out / MANIFEST
        self.lock = threading.Lock()
        self.was_lab: dict = {}  # a resumed run's "lab" as its last sitting wrote it

    def resume(self, settings: Settings) -> None:
        """Take over the sessions of the manifest already in `settings.out`, which a run with
        the same plan wrote (LabError otherwise: the plan would not be the same)."""
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise LabError(f"{self.path}: cannot resume from it ({e}); move it away") from None
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise LabError(f"{self.path}: not a {FORMAT} manifest; move it away")
        # what does not change the plan may differ: clients, the stopping rule, `out` itself
        free = ("out", "clients", "flows_per_class")
        as_read = json.loads(json.dumps(self.doc["settings"]))  # tuples as the file has them
        new = {k: v for k, v in as_read.items() if k not in free}
        was = {k: v for k, v in old["settings"].items() if k not in free}
        was.setdefault("conditions", "none")  # manifests from before conditions existed
        differ = sorted(k for k in new.keys() | was.keys() if new.get(k) != was.get(k))
        if differ:
            what = ", ".join(f"{k} {was.get(k)!r} -> {new.get(k)!r}" for k in differ)
            raise LabError(f"{self.path} was written with other settings ({what}); "
                           "resume with the same ones or use another --out")  # fmt: skip
        # one entry per sitting: when it started and with how many clients
        sittings = old.get("sittings") or [
            {"started": old["created"], "clients": old["settings"]["clients"]}
        ]
        sittings.append({"started": _now(), "clients": self.doc["settings"]["clients"]})
        self.doc.update(created=old["created"], sessions=old["sessions"], sittings=sittings)
        self.was_lab = old.get("lab") or {}
        self.doc["summary"] = summarize(self.doc["sessions"], self.doc["settings"]["clients"])

    def add(self, record: dict) -> None:
        with self.lock:
            self.doc["sessions"].append(record)
            self.doc["summary"] = summarize(self.doc["sessions"], self.doc["settings"]["clients"])
            self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.part")
        tmp.write_text(json.dumps(self.doc, indent=1, sort_keys=False) + "\n")
        tmp.replace(self.path)


def summarize(sessions: list[dict], clients: int = 1) -> dict:
    """Per class: sessions kept and rejected, flows kept, session seconds and flows per minute.

    Flows per minute count the wall time of the sessions themselves (capture start to stop),
    divided over the clients that ran at once; server start-up is excluded.
    """
    out: dict[str, dict] = {}
    for s in sessions:
        c = out.setdefault(
            s["class"], {"sessions": 0, "rejected": 0, "flows": 0, "seconds": 0.0, "packets": 0}
        )
        c["seconds"] += s["seconds"]
        if s["valid"]:
            c["sessions"] += 1
            c["flows"] += len(s["flows"])
            c["packets"] += s["packets"]
        else:
            c["rejected"] += 1
    for c in out.values():
        c["seconds"] = round(c["seconds"], 2)
        minutes = c["seconds"] / max(clients, 1) / 60
        c["flows_per_minute"] = round(c["flows"] / minutes, 2) if minutes else 0.0
        per_session = c["flows"] / c["sessions"] if c["sessions"] else 0.0
        # sessions (and minutes) a run needs for 500 kept flows of this class
        c["sessions_for_500_flows"] = int(-(-500 // per_session)) if per_session else None
        c["minutes_for_500_flows"] = (
            round(500 / c["flows_per_minute"], 1) if c["flows_per_minute"] else None
        )
    return out


def drain_seconds(cond: Conditions | None) -> float:
    """How long a session's link must stay quiet before its capture ends."""
    if cond is None:
        return DRAIN_SECONDS
    return max(DRAIN_SECONDS, 2 * (2 * cond.delay_ms + cond.jitter_ms) / 1000)


def run_session(
    ctx: RunContext, client: Client, job: Job, settings: Settings
) -> tuple[dict, object | None]:
    """One session: shape, capture, run the client, validate. (manifest record, frames to keep)."""
    lab = ctx.lab
    app = APPS[job.app]()
    lab.check_processes()
    rate = job.params.get("rate_mbit", DEFAULT_RATE_MBIT)
    cond = job.conditions
    if cond is not None:
        how = ctx.shared["impairment"]
        cond = cond if how else cond.without_netem()  # the record says what the link did
        conditions.apply(lab, client, cond, how, seed=zlib.crc32(job.id.encode()))
    else:
        lab.shape(client, rate)
    started = time.time()
    try:
        rec = Recorder(client.ns, client.ifname)  # before the tunnel: its handshake is captured
        try:
            failure = None
            if job.tunnel == "none":
                rc = app.session(ctx, client, job.params)
            else:
                try:
                    rc = _tunnelled(ctx, client, job, app, cond)
                except LabError as e:  # this session's tunnel, not the lab: reject it, go on
                    rc, failure = -1, f"tunnel failed: {e}"
            wait_quiet(client.ns, client.ifname, drain_seconds(cond), DRAIN_LIMIT)
        finally:
            frames, capture = rec.stop()
    finally:
        if cond is not None:  # the next session on this link starts from a plain link
            conditions.reset(lab, client, DEFAULT_RATE_MBIT)
    seconds = time.time() - started
    stats = session_stats(frames)
    reason = failure or validate(rc, stats, settings.rules, client.addr)
    if reason is None and job.tunnel != "none":
        reason = only_tunnel(stats, client, ctx.shared[job.tunnel].port)
    if reason is None and job.tunnel == "wireguard":
        reason = staged_flush(frames)
    if reason is None and capture.dropped:
        reason = f"capture dropped {capture.dropped} packets"
    if reason is None and capture.received != stats.packets:
        reason = f"the kernel saw {capture.received} packets, the capture holds {stats.packets}"
    kept = keep_first(frames, settings.keep_packets, drop_earlier=True) if reason is None else None
    record = {
        "id": job.id,
        "class": job.label,
        "app": job.app,
        "tunnel": job.tunnel,
        "client": client.index,
        "pcap": f"{job.label}/{job.id}.pcap" if reason is None else None,
        "params": job.params,
        "conditions": cond.to_dict() if cond is not None else None,
        "started": datetime.fromtimestamp(started, UTC).isoformat(),
        "seconds": round(seconds, 3),
        "returncode": rc,
        "valid": reason is None,
        "reason": reason,
        "packets": stats.packets,
        # the kernel's count: more than `packets` would mean frames lost between ring and file
        "kernel_received": capture.received,
        "kernel_dropped": capture.dropped,
        "bytes": stats.bytes,
        "kept_packets": len(kept) if kept is not None else 0,
        "entropy": round(stats.entropy, 3),
        "flows": [asdict(f) for f in stats.flows],
    }
    return record, kept


def _tunnelled(
    ctx: RunContext, client: Client, job: Job, app: App, cond: Conditions | None
) -> int:
    """One session through the run's `job.tunnel`; the server's route to the client's tunnel
    address carries the session's congestion control."""
    lab = ctx.lab
    tunnel = ctx.shared[job.tunnel]
    extra = {}
    if job.tunnel == "openvpn":
        extra = {"cipher": job.params["tunnel_cipher"]}
    elif job.tunnel == "ipsec":
        extra = {"proposal": job.params["tunnel_ike"], "esp": job.params["tunnel_esp"]}
    with (
        lab.isolate(client),
        tunnel.session(client, job.params["tunnel_port"], **extra) as addr,
    ):
        if cond is not None:  # the tunnel made its own routes: theirs carry it now
            conditions.congestion(lab, client.ns, str(SERVER_NET), cond.congestion)
            lab.run(lab.server, conditions.tunnel_route(addr, cond.congestion, add=True))
        try:
            # the app sees the client at its tunnel address
            rc = app.session(ctx, replace(client, addr=addr), job.params)
            # the last ACKs still go through the tunnel
            wait_quiet(client.ns, client.ifname, drain_seconds(cond), DRAIN_LIMIT)
        finally:
            if cond is not None:
                lab.run(lab.server, conditions.tunnel_route(addr, cond.congestion, add=False))
    return rc


def resumed_impairment(was: dict, now: str | None) -> str | None:
    """What delays a run's links in this sitting (`now`: what this machine has). A resumed run
    keeps what it started with (`was`: its manifest's "lab"), so one run has one distribution
    of conditions: no delay before, none now even where the delay line has come since."""
    if not was:
        return now
    # manifests from before the delay line recorded only whether netem was there
    before = was["impairment"] if "impairment" in was else ("netem" if was.get("netem") else None)
    if before and not now:
        raise LabError(f"this run put delay, jitter and loss on its links ({before}) and nothing "
                       "here can (no sch_netem, no iptables for the delay line): `flagd lab "
                       "doctor --install`, or resume it where it started")
    return now if before else None


def generate(
    settings: Settings,
    progress: Callable[[dict], None] | None = None,
    on_ready: Callable[[Lab], None] | None = None,
) -> dict:
    """Run the whole generation; returns the manifest document. Everything is torn down on
    return, on exceptions, on Ctrl-C and on SIGTERM (turned into KeyboardInterrupt).

    `progress` is called with each session's manifest record; `on_ready` with the built lab
    once its servers run and before the first session (e.g. to start `flagd run` inside a
    client namespace: `lab.popen(lab.clients[0].ns, [...])`, stopped at teardown).
    """
    apps = check_settings(settings)
    tunnels = [t for t in (WireGuard, OpenVpn, Ipsec) if t.name in settings.tunnels]
    # the manifest's package versions cover the tunnels too
    programs = expand(p for a in (*apps, *tunnels) for p in a.programs)
    congestion = conditions.available_congestion() if settings.conditions != "none" else ()
    jobs = plan(settings, congestion)
    settings.out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(settings, programs)
    if manifest.path.exists():
        manifest.resume(settings)
        done = {s["id"] for s in manifest.doc["sessions"]}
        jobs = [j for j in jobs if j.id not in done]
    manifest.write()
    restore = _sigterm_as_interrupt()
    try:
        with build_lab(settings.clients) as lab:
            manifest.doc["lab"] = {
                "router": lab.router,
                "server": lab.server,
                "server_addr": lab.server_addr,
                "clients": [{"ns": c.ns, "iface": c.ifname, "addr": c.addr} for c in lab.clients],
                # False: segmentation offloads stayed on (no ethtool), frames may exceed the MTU
                "offloads_off": lab.offloads_off,
                # what put delay, jitter and loss on the links: "netem", "nfqueue" (no sch_netem
                # in this kernel: a user-space delay line) or None (nothing: records say 0)
                "impairment": resumed_impairment(manifest.was_lab, conditions.impairment(lab)),
                "congestion": list(congestion),
            }
            ctx = RunContext(
                lab,
                make_pki(lab.state / "pki"),
                random.Random(settings.seed + 1),
                random_ports=settings.random_ports,
                session_seconds=settings.seconds,
                vary_tls=settings.conditions == "random",
            )
            ctx.shared["impairment"] = manifest.doc["lab"]["impairment"]
            for app in dict.fromkeys(apps):
                app().start(ctx)
            if "wireguard" in settings.tunnels:
                ctx.shared["wireguard"] = WireGuard(lab)
            if "openvpn" in settings.tunnels:
                ctx.shared["openvpn"] = OpenVpn(lab, ctx.pki)
            if "ipsec" in settings.tunnels:
                ctx.shared["ipsec"] = Ipsec(lab)
            if on_ready is not None:
                on_ready(lab)
            manifest.doc["ports"] = ctx.ports
            manifest.write()
            _run_jobs(ctx, jobs, settings, manifest, progress)
    except KeyboardInterrupt:
        manifest.doc["interrupted"] = True
        raise
    finally:
        manifest.doc["finished"] = _now()
        manifest.write()
        restore()
    return manifest.doc


def _run_jobs(
    ctx: RunContext,
    jobs: list[Job],
    settings: Settings,
    manifest: Manifest,
    progress: Callable[[dict], None] | None,
) -> None:
    lab = ctx.lab
    queues: dict[str, deque[tuple[int, Job]]] = {}  # per class, its jobs in plan order
    for k, job in enumerate(jobs):
        queues.setdefault(job.label, deque()).append((k, job))
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()
    target = settings.flows_per_class
    flows: dict[str, int] = {}  # per class: kept flows, plus one for each session under way
    for s in manifest.doc["sessions"]:
        flows[s["class"]] = flows.get(s["class"], 0) + (len(s["flows"]) if s["valid"] else 0)

    def next_job() -> Job | None:
        """Plan order; with a target, the class with the fewest flows first, so a run stopped
        early holds about as many flows of each class (in a shuffled plan, a class of three
        tunnels gets three times the sessions)."""
        with lock:
            ready = [
                q for label, q in queues.items() if q and (target is None or flows.get(label, 0) < target)
            ]
            if not ready:
                return None
            q = min(ready, key=lambda q: (target and flows.get(q[0][1].label, 0), q[0][0]))
            job = q.popleft()[1]
            flows[job.label] = flows.get(job.label, 0) + 1
            return job

    def worker(client: Client) -> None:
        while not stop.is_set():
            job = next_job()
            if job is None:
                return
            try:
                record, kept = run_session(ctx, client, job, settings)
                if kept is not None:
                    path = settings.out / record["pcap"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_pcap(path, kept)
                manifest.add(record)
                with lock:  # the session's real flows replace the one it was counted as
                    flows[job.label] += (len(record["flows"]) if record["valid"] else 0) - 1
                if progress:
                    progress(record)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)
                stop.set()
                return

    if len(lab.clients) == 1:
        worker(lab.clients[0])  # in the main thread: Ctrl-C lands right here
    else:
        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in lab.clients]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            stop.set()
            raise
    if errors:
        raise errors[0]


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM unwind like Ctrl-C (teardown runs); returns the function that undoes it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    owner = os.getpid()

    def handler(signum, frame):  # noqa: ARG001
        if os.getpid() != owner:  # a forked helper (pyroute2) inherited this handler: just go
            os._exit(128 + signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
