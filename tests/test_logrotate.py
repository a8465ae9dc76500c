"""The shipped logrotate config against a daemon that runs like the systemd unit runs it.

`flagd run` runs as an unprivileged user holding only CAP_NET_RAW (the unit's dynamic user and
AmbientCapabilities), writing into a log directory that user owns (the unit's LogsDirectory=,
reached through a symlink as /var/log/flagd is under DynamicUser=), on a veth pair where a
generator sends short UDP flows. A real `logrotate -f` with systemd/flagd.logrotate (only the
path and the signal command substituted) rotates twice while events flow. Every flow the
generator sent must appear exactly once across the current and rotated files, and the daemon
must end up writing to the current file, never to a rotated or deleted one (/proc/PID/fd).
The same run with the old `create 0640 root root` shows what the test catches: the daemon cannot
reopen a root-owned file and stays on the rotated one.
"""

from __future__ import annotations

import gzip
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.netns import netns_unavailable, veth_pair

pytestmark = [pytest.mark.netns, pytest.mark.slow]

why = netns_unavailable() or next(
    (f"needs {tool}" for tool in ("logrotate", "setpriv", "unshare") if shutil.which(tool) is None),
    None)
if why:
    pytest.skip(why + " (apt-get install logrotate util-linux)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "systemd" / "flagd.logrotate"
SHIPPED_LOG = "/var/log/flagd/events.jsonl"
SHIPPED_HUP = "systemctl reload flagd.service"  # ExecReload=: SIGHUP to the main process
CAP_NET_RAW = 1 << 13
PORT = 9999
FIRST_SPORT = 20000

# One UDP flow per source port: three datagrams, then the next port; prints the ports it used.
GENERATOR = """
import json, socket, sys, time
src, dst, dport, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seconds, rate = float(sys.argv[5]), float(sys.argv[6])
sent, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    port = first + len(sent)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, port))
        for i in range(3):
            s.sendto(b"flagd-logrotate %d %d" % (port, i) + bytes(64), (dst, dport))
    sent.append(port)
    time.sleep(1 / rate)
print(json.dumps(sent))
"""

SINK = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], {PORT}))
print("ready", flush=True)
while True:
    s.recv(4096)
"""


def _shadow_script(uid: int, gid: int, needed: list[Path], stash: Path) -> str:
    """Shell that lets `uid` reach `needed` (the interpreter, its libraries, the checkout) in a
    private mount namespace: a directory on the way that others cannot enter (pyenv under a
    0700 /root, here) is covered by a tmpfs that lets others through to those children only.
    A real deployment has python under /usr and needs none of this; nothing outside the
    namespace changes."""
    blocked: dict[Path, set[str]] = {}
    for path in needed:
        path = path.resolve()
        for parent in list(reversed(path.parents))[:-1] + [path.parent]:
            st = parent.stat()
            ok = (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)
                  or (st.st_gid == gid and st.st_mode & 0o010))
            if not ok:
                child = path.relative_to(parent).parts[0]
                blocked.setdefault(parent, set()).add(child)
    lines = ["set -e"]
    for n, (parent, children) in enumerate(sorted(blocked.items())):
        for m, child in enumerate(sorted(children)):
            keep = stash / f"{n}-{m}"
            keep.mkdir(parents=True)
            lines.append(f"mount --bind '{parent / child}' '{keep}'")
        lines.append(f"mount -t tmpfs -o mode=0711 flagd-shadow '{parent}'")
        for m, child in enumerate(sorted(children)):
            lines += [f"mkdir -p '{parent / child}'",
                      f"mount --bind '{stash / f'{n}-{m}'}' '{parent / child}'"]
    lines.append('exec "$@"')
    return "\n".join(lines)


def _config(base: Path, log: Path, pid: int, old_create: bool) -> Path:
    text = SHIPPED.read_text()
    assert SHIPPED_LOG in text and SHIPPED_HUP in text  # what the substitution below relies on
    text = text.replace(SHIPPED_LOG, str(log)).replace(SHIPPED_HUP, f"kill -HUP {pid}")
    if old_create:  # the config this project shipped before: a root-owned new log
        text = text.replace("    nocreate\n", "    create 0640 root root\n")
        assert "create 0640 root root" in text
    conf = base / "logrotate.conf"
    conf.write_text(text)
    conf.chmod(0o644)  # logrotate refuses a config others could write
    return conf


def _log_fds(pid: int, logdir: Path) -> list[str]:
    """Where the daemon's open files inside the log directory point ('(deleted)' if unlinked)."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(logdir)):
            out.append(target)
    return out


def _age(path: Path) -> int:
    """0 for the current log, N for events.jsonl.N(.gz): the oldest file has the largest N."""
    suffix = path.name.removeprefix("events.jsonl").removesuffix(".gz").lstrip(".")
    return int(suffix or 0)


def _read(path: Path) -> list[dict]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in data.decode().splitlines()]  # a torn line would raise


def _rotate_under_traffic(old_create: bool) -> dict:
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="flagd-logrotate-"))  # outside pytest's 0700 tmp
    try:
        base.chmod(0o755)
        # /var/log/flagd -> private/flagd, owned by the service user, as DynamicUser= lays it out
        private = base / "log" / "private"
        private.mkdir(parents=True, mode=0o700)
        logdir_real = private / "flagd"
        logdir_real.mkdir(mode=0o750)
        os.chown(logdir_real, nobody.pw_uid, nobody.pw_gid)
        private.chmod(0o711)  # systemd's is 0700, opened to the service in its own namespace
        (base / "log" / "flagd").symlink_to("private/flagd")
        log = base / "log" / "flagd" / "events.jsonl"
        cfg = base / "flagd.toml"
        cfg.write_text("idle_timeout = 1.0\n")
        cfg.chmod(0o644)
        needed = [Path(sys.executable), Path(sys.base_prefix), Path(sys.prefix), REPO]
        shadow = _shadow_script(nobody.pw_uid, nobody.pw_gid, needed, base / "stash")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"}
        with veth_pair() as pair:
            sink = pair.popen(pair.b, [sys.executable, "-c", SINK, pair.b.addr],
                              stdout=subprocess.PIPE, text=True)
            assert select.select([sink.stdout], [], [], 30)[0], "UDP sink did not start"
            assert sink.stdout.readline().strip() == "ready"
            # ip netns exec, unshare, sh and setpriv all exec: the Popen pid is the daemon's
            daemon = pair.popen(pair.a, [
                "unshare", "--mount", "--propagation", "private", "sh", "-c", shadow, "sh",
                "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                "--inh-caps=+net_raw", "--ambient-caps=+net_raw",
                sys.executable, "-m", "flagd", "run", "--iface", pair.a.ifname, "--no-model",
                "--no-dashboard", "--config", str(cfg), "--log", str(log), "--stats-interval", "1",
            ], cwd="/", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 60
            while not (log.exists() and log.stat().st_size):  # first stats event written
                assert daemon.poll() is None, daemon.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "daemon did not start"
                time.sleep(0.1)
            status = Path(f"/proc/{daemon.pid}/status").read_text()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            assert fields["Uid"].split()[0] == str(nobody.pw_uid)
            for key in ("CapEff", "CapPrm", "CapAmb"):  # CAP_NET_RAW at most (it may give
                assert int(fields[key], 16) & ~CAP_NET_RAW == 0, fields[key]  # that up, too)

            gen = pair.popen(pair.a, [sys.executable, "-c", GENERATOR, pair.a.addr, pair.b.addr,
                                      str(PORT), str(FIRST_SPORT), "9", "80"], stdout=subprocess.PIPE, text=True)
            t0 = time.monotonic()
            conf = _config(base, log, daemon.pid, old_create)
            state = base / "logrotate.state"
            fds_after = []
            for at in (2.5, 5.5):  # seconds into the generator's 9
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                r = subprocess.run(["logrotate", "-f", "-s", str(state), str(conf)],
                                   capture_output=True, text=True, timeout=60)
                assert r.returncode == 0 and not r.stderr.strip(), r.stderr
                # The reopen: a new events.jsonl the daemon owns (or, with the old config, not)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not (
                        log.exists() and log.stat().st_uid == nobody.pw_uid):
                    time.sleep(0.05)
                time.sleep(0.5)  # events keep flowing into whatever the daemon now holds
                fds_after.append(_log_fds(daemon.pid, logdir_real))
            sent = json.loads(gen.communicate(timeout=60)[0])
            time.sleep(1.5)  # idle flows expire and are written
            final_fds = _log_fds(daemon.pid, logdir_real)
            daemon.send_signal(signal.SIGTERM)
            _, err = daemon.communicate(timeout=60)
            assert daemon.returncode == 0, err[-3000:]
        files = sorted(p.name for p in logdir_real.iterdir())
        events = [e for p in sorted(logdir_real.iterdir(), key=_age, reverse=True) for e in _read(p)]
        return {"sent": sent, "events": events, "files": files, "fds": fds_after,
                "final_fds": final_fds, "log": str(logdir_real / "events.jsonl"), "stderr": err,
                "owner": (logdir_real / "events.jsonl").stat().st_uid,
                "current_size": (logdir_real / "events.jsonl").stat().st_size}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _flows_seen(run: dict) -> Counter:
    return Counter(e["src_port"] for e in run["events"]
                   if e["event_type"] == "flow" and e["proto"] == "UDP" and e["dest_port"] == PORT)


def test_two_rotations_under_traffic_lose_no_event():
    run = _rotate_under_traffic(old_create=False)
    sent = run["sent"]
    assert len(sent) > 300, "the generator sent too few flows to mean anything"
    # two rotations: the current log, the second one's file, the first one's compressed
    assert run["files"] == ["events.jsonl", "events.jsonl.1", "events.jsonl.2.gz"], run["files"]
    seen = _flows_seen(run)
    assert set(seen) == set(sent), f"lost: {sorted(set(sent) - set(seen))[:20]}"
    assert all(n == 1 for n in seen.values()), [p for p, n in seen.items() if n > 1][:20]
    # After each rotation the daemon writes to the new file it created, not to a rotated one
    for fds in [*run["fds"], run["final_fds"]]:
        assert fds == [run["log"]], fds
    assert run["owner"] == pwd.getpwnam("nobody").pw_uid
    assert "cannot" not in run["stderr"], run["stderr"]
    # Oldest file first, the events are in the order they were written: the final stats last
    stamps = [e["timestamp"] for e in run["events"] if e["event_type"] == "stats"]
    assert stamps == sorted(stamps) and len(stamps) >= 8
    assert run["events"][-1]["event_type"] == "stats" and run["events"][-1]["stats"]["final"]


def test_the_old_root_owned_create_is_caught():
    """`create 0640 root root` (what was shipped before): the unprivileged daemon cannot open the
    root-owned new log and stays on the rotated file; the new one stays empty, so notifempty
    stops every later rotation and the rotated file grows without bound."""
    run = _rotate_under_traffic(old_create=True)
    assert "Permission denied" in run["stderr"]
    assert run["final_fds"] == [run["log"] + ".1"], run["final_fds"]
    assert run["files"] == ["events.jsonl", "events.jsonl.1"]  # the second rotation did nothing
    assert run["owner"] == 0 and run["current_size"] == 0
