"""Privileges of a capture process: become an unprivileged user once the packet socket is open.

Kept apart from capture.py, and free of numpy, so that `flagd run` can set no_new_privs before any
library has started a thread.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import struct


class PrivilegeError(RuntimeError):
    """The process could not become the user it was asked to; the message is one line."""


_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_CAP_SETPCAP = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _narrow_capabilities(keep: int) -> None:
    """Intersect this thread's effective, permitted and inheritable sets with the bit mask
    `keep` (capabilities 0-31; 32-63 all go): a set can only shrink, so what is not held is
    not asked for."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two __user_cap_data_struct {effective, permitted, inheritable}
    if libc.capget(header, data) != 0 or libc.capset(header, bytes(
            (ctypes.c_uint32 * 6)(*(v & keep for v in data[:3]), 0, 0, 0))) != 0:
        raise PrivilegeError(f"cannot drop capabilities: {os.strerror(ctypes.get_errno())}")


def drop_all_capabilities() -> None:
    """Empty the ambient, effective, permitted and inheritable sets of this thread."""
    ctypes.CDLL(None).prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _narrow_capabilities(0)


def keep_only_capabilities(keep: tuple[int, ...]) -> None:
    """Narrow this process to the capabilities `keep`: the bounding set first (so no exec can
    regain the rest), then the permitted, effective and inheritable sets. Root stays uid 0 (file
    access as root remains) but loses every other capability: no mounts, no modules, no ptrace."""
    libc = ctypes.CDLL(None)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in [c for c in range(last + 1) if c not in keep and c != _CAP_SETPCAP] + [_CAP_SETPCAP]:
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails harmlessly without CAP_SETPCAP
    _narrow_capabilities(sum(1 << c for c in keep))


def drop_privileges(user: str) -> None:
    """Become `user` (no supplementary groups, no capabilities) once the capture is open.

    The open socket keeps working; opening another one will fail. Run it before starting any
    other thread: set*id changes the whole process, but capabilities are per thread.
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"cannot drop privileges: no user {user!r}") from None
    try:
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)  # from root to non-root: the kernel clears all capabilities
        elif os.getuid() != pw.pw_uid:
            raise PrivilegeError(f"cannot drop privileges to {user!r}: not running as root")
    except PermissionError as exc:
        raise PrivilegeError(f"cannot drop privileges to {user!r}: {exc.strerror}") from None
    # Still here with ambient/file capabilities (systemd User= with AmbientCapabilities=): drop them.
    drop_all_capabilities()
    forbid_new_privileges()


def forbid_new_privileges() -> None:
    """Set no_new_privs: no execve from here on can gain privileges (setuid, file caps).

    The flag is per thread and inherited only by threads started later, so `flagd run` sets it
    before any other thread exists (importing numpy starts OpenBLAS's, loading the model
    torch's); drop_privileges sets it again for callers that did not.
    """
    ctypes.CDLL(None).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
