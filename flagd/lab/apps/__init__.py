"""The lab's applications: for each traffic class, real servers and clients from Debian packages.

One module per traffic class (`chat`, `email`, `file_transfer`, `streaming`, `voip`, `torrent`)
and `base` for what they share (`App`, `RunContext`, the helpers that run servers and clients in
namespaces). Each app names the programs it needs (`programs`); `doctor` maps those to Debian
packages. `APPS` (name -> app class) and `CLASSES` (class -> app names) are the registry the rest
of the lab reads.
"""

from __future__ import annotations

from flagd.lab.apps.base import App, RunContext, wait_tcp
from flagd.lab.apps.chat import IrcTls, SendXmpp, Xmpp, XmppTls
from flagd.lab.apps.email import (
    CurlImaps,
    CurlSmtps,
    Imaps,
    ImapsImap4d,
    Smtp,
    Smtps,
    SmtpsAiosmtpd,
)
from flagd.lab.apps.file_transfer import HttpsDownload, Scp, Sftp, WgetDownload
from flagd.lab.apps.streaming import Hls, Icecast, IcecastFfmpeg
from flagd.lab.apps.torrent import Aria2, RTorrent, Transmission
from flagd.lab.apps.voip import Linphone, Sip, SipUdp

__all__ = ["APPS", "CLASSES", "App", "RunContext", "wait_tcp"]

APPS: dict[str, type[App]] = {
    a.name: a
    for a in (
        Xmpp,
        XmppTls,
        IrcTls,
        SendXmpp,
        Smtp,
        Smtps,
        Imaps,
        CurlSmtps,
        CurlImaps,
        SmtpsAiosmtpd,
        ImapsImap4d,
        Sftp,
        Scp,
        HttpsDownload,
        WgetDownload,
        Hls,
        Icecast,
        IcecastFfmpeg,
        Sip,
        SipUdp,
        Linphone,
        Aria2,
        Transmission,
        RTorrent,
    )
}
CLASSES: dict[str, list[str]] = {}
for _app in APPS.values():
    CLASSES.setdefault(_app.label, []).append(_app.name)
