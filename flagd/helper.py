"""The capture helper of `flagd run`: the one process that keeps CAP_NET_RAW once the daemon drops it.

`flagd run` forks it first thing, before numpy or torch have started a thread, so the fork is
safe and the helper is a small single-threaded interpreter importing nothing but the standard
library. The daemon then gives its capabilities up (see `cli.run`), in every thread it will
ever have. Whenever it needs capture it asks the helper, over a private socketpair:

- `packet_socket(type)`: the helper opens an AF_PACKET socket (the only step that needs
  CAP_NET_RAW; binding, the ring, filters and fanout do not) and passes the descriptor back
  (SCM_RIGHTS).
- `spawn(index, spec, channel)`: the helper forks a capture process (`flagd.fanout`), which
  opens its own socket with the helper's privilege, then drops to the daemon's user. Forking
  here and not in the daemon matters: the daemon runs torch's threads, and fork() from a
  process with threads can deadlock the child on a lock some other thread held. The child
  starts as a copy of this thread-free helper and imports what it needs itself.

The helper keeps only the capabilities those two requests need (CAP_NET_RAW, and CAP_SETUID and
CAP_SETGID for a capture process to become the daemon's user), accepts requests only from the
daemon at the other end of its socketpair, and exits when the daemon goes away (end of file on
that socket). Requests are JSON, never pickle: the daemon parses untrusted packets, and a pickle
is code, so a daemon taken over through its parser must not be able to run code in the one
process that is still privileged.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import threading

from flagd.privileges import PrivilegeError, keep_only_capabilities

_MAX_REQUEST = 1 << 16


class HelperError(RuntimeError):
    """The helper could not do what it was asked; the message is one line."""


CAP_SETGID = 6
CAP_SETUID = 7
CAP_NET_RAW = 13
_KEEP = (CAP_SETGID, CAP_SETUID, CAP_NET_RAW)  # what the helper's two requests need


def has_capability(cap: int) -> bool:
    """Whether this thread holds capability `cap` (CAP_*) in its effective set."""
    try:
        with open("/proc/thread-self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def has_cap_net_raw() -> bool:
    """Whether this thread may open packet sockets."""
    return has_capability(CAP_NET_RAW)


def _send(sock: socket.socket, msg: object, fds: list[int] = ()) -> None:
    data = json.dumps(msg).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def _recv(sock: socket.socket) -> tuple[object, list[int]] | None:
    """A message and the descriptors that came with it; None at end of file."""
    fds = array.array("i")
    data, anc, _, _ = sock.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    try:
        return json.loads(data), list(fds)
    except ValueError:  # not JSON: a request nobody we know sent
        for fd in fds:
            os.close(fd)
        return ["?"], []


class Helper:
    """The daemon's end of the helper; safe to use from several threads."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._sock = sock
        self.pid = pid
        self._lock = threading.Lock()

    @classmethod
    def start(cls) -> Helper:
        """Fork the helper. Call it before any thread exists (see the module docstring)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the helper
            code = 0
            try:
                ours.close()
                _serve(theirs)
            except BaseException:  # noqa: BLE001 - whatever happens, never return into the CLI
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        return cls(ours, pid)

    def _call(self, msg: tuple, fds: list[int] = ()) -> tuple[object, list[int]]:
        with self._lock:
            try:
                _send(self._sock, msg, fds)
                reply = _recv(self._sock)
            except OSError as e:
                raise HelperError(f"capture helper unreachable ({e.strerror or e})") from None
        if reply is None:
            raise HelperError("capture helper is gone")
        (status, value), got = reply
        if status != "ok":
            for fd in got:
                os.close(fd)
            raise HelperError(str(value))
        return value, got

    def packet_socket(self, sock_type: int) -> socket.socket:
        """A fresh AF_PACKET socket (protocol 0: it receives nothing until bound)."""
        _, fds = self._call(("socket", int(sock_type)))
        if len(fds) != 1:
            raise HelperError("capture helper sent no socket")
        return socket.socket(fileno=fds[0])

    def spawn(self, index: int, spec: dict, channel: socket.socket) -> int:
        """Fork capture process `index` with its spec (`WorkerSpec.to_dict()`) and its end of
        the channel."""
        pid, _ = self._call(("spawn", int(index), spec), [channel.fileno()])
        return int(pid)

    def close(self) -> None:
        """Let the helper go (it exits at end of file) and reap it."""
        with self._lock:
            if self._sock.fileno() < 0:
                return
            self._sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(sock: socket.socket) -> None:
    """The helper's loop: answer requests until the daemon closes its end."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # Ctrl-C and systemd's stop reach the whole process group; the daemon decides.
        signal.signal(sig, signal.SIG_IGN)
    try:
        keep_only_capabilities(_KEEP)
    except PrivilegeError:
        pass  # as narrow as the kernel lets it be; the requests still check what they need
    while True:
        ready = select.select([sock], [], [], 1.0)[0]
        _reap()
        if not ready:
            continue
        try:
            got = _recv(sock)
        except OSError:
            return
        if got is None:
            return
        msg, fds = got
        try:
            if not isinstance(msg, list) or not msg:
                _send(sock, ("error", "malformed request"))
            elif msg[0] == "socket" and len(msg) == 2 and type(msg[1]) is int:
                try:
                    s = socket.socket(socket.AF_PACKET, msg[1], 0)
                except PermissionError:
                    _send(sock, ("error", "no CAP_NET_RAW to open a packet socket"))
                    continue
                except OSError as e:
                    _send(sock, ("error", f"cannot open a packet socket: {e.strerror}"))
                    continue
                _send(sock, ("ok", None), [s.fileno()])
                s.close()
            elif msg[0] == "spawn" and len(msg) == 3 and type(msg[1]) is int \
                    and isinstance(msg[2], dict) and len(fds) == 1:
                _send(sock, ("ok", _fork_capture(sock, msg[1], msg[2], fds[0])))
            else:
                _send(sock, ("error", f"unknown request {str(msg[0])[:40]!r}"))
        finally:
            for fd in fds:
                os.close(fd)


def _fork_capture(control: socket.socket, index: int, spec: dict, channel_fd: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        control.close()
        # Capture processes need no BLAS threads: numpy's OpenBLAS would start one per core.
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        from flagd.fanout import WorkerSpec, capture_main

        capture_main(index, WorkerSpec.from_dict(spec), socket.socket(fileno=os.dup(channel_fd)))
    except BaseException:  # noqa: BLE001 - the traceback is on stderr; the daemon sees the exit
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _reap() -> None:
    """Collect capture processes that ended (their daemon notices by end of file)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
