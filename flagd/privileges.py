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
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_all_capabilities() -> None:
    """Empty the ambient, effective, permitted and inheritable sets of this thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # two __user_cap_data_struct {effective, permitted, inheritable}, all zero
    if libc.capset(header, data) != 0:
        raise PrivilegeError(f"cannot drop capabilities: {os.strerror(ctypes.get_errno())}")


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
