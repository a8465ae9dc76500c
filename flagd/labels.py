"""Labels for training captures: which class a pcap's flows belong to.

Two labellers, both `(path, root) -> class name | None` (None: the capture cannot be labelled;
the caller skips it and counts it):

- "dir" (default): the class is the name of the capture's parent directory, so a tree such as
  `train/chat/x.pcap, train/voip/y.pcap` labels itself.
- "iscx": the original ISCX VPN-nonVPN 2016 capture names (Draper-Gil et al., ICISSP 2016), e.g.
  `facebook_audio1a.pcap`, `vpn_skype_chat1a.pcap`, mapped to the paper's 12 traffic classes.

How the ISCX names map. Two published mappings exist and we checked both: Deep Packet's
(Lotfollahi et al.; github.com/munhouiani/Deep-Packet, `utils.py`, PREFIX_TO_TRAFFIC_ID) and
DeepTraffic's (Wang et al. 2017; github.com/echowei/DeepTraffic,
`2.encrypted_traffic_classification/1.DataSet/DataSet.txt`), the preprocessing behind the shared
`iscx-vpn2016` data. They never disagree on a file; each leaves some files out (Deep Packet drops
gmailchat, netflix, spotify, scp and voipbuster; DeepTraffic drops ftps, sftp, scp, and the
non-VPN facebook/skype audio and voipbuster). We label the union: every file that either of them
labels gets the class they give it, and scp (file transfer by name, left out by both) goes to
file-transfer. Notable consequences:
- gmailchat* is "email" (DeepTraffic files it under Email), not "chat".
- Video calls (facebook_video*, hangouts_video*, skype_video*) are None: both mappings leave them
  out, and they are neither clean streaming nor voip.
- The Tor captures (torFacebook, torYoutube1, ...) and browsing captures are None: not among the
  12 classes. Rules match at the start of the name, so `toryoutube1` is not read as youtube.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from os import PathLike
from pathlib import Path

# The paper's 12 classes in the fixed order used for label ids, reports and heat maps.
CLASSES_12: tuple[str, ...] = (
    "chat", "email", "file-transfer", "streaming", "torrent", "voip",
    "vpn-chat", "vpn-email", "vpn-file-transfer", "vpn-streaming", "vpn-torrent", "vpn-voip",
)

Labeller = Callable[[Path, Path], str | None]

# (pattern, class) tried in order on the lower-cased file name with any "vpn_" prefix removed;
# the first match wins, a class of None means "known, deliberately left out".
_CALL_APPS = r"(?:facebook|hangouts?|skype)"
ISCX_RULES: tuple[tuple[re.Pattern[str], str | None], ...] = tuple(
    (re.compile(pattern), cls)
    for pattern, cls in (
        (rf"{_CALL_APPS}_?video", None),  # video calls: left out by both reference mappings
        (r"gmail", "email"),  # gmailchat*: "email" per DeepTraffic; must precede the chat rule
        (r"email", "email"),
        (rf"(?:aim|icq|{_CALL_APPS})_?chat", "chat"),
        (r"chat\b", "chat"),  # DeepTraffic's vpn_chat.pcap
        (rf"{_CALL_APPS}_?(?:audio|voice)", "voip"),
        (r"voipbuster", "voip"),
        (r"skype_?(?:files?|transfer)", "file-transfer"),
        (r"(?:ftps|sftp|scp)", "file-transfer"),
        (r"(?:netflix|spotify|vimeo|youtube)", "streaming"),
        (r"(?:bit)?torrent", "torrent"),
    )
)


def iscx_label(filename: str | PathLike[str]) -> str | None:
    """Class of an original ISCX VPN-nonVPN 2016 capture name, or None when it has none.

    Only the file name counts (directories are ignored); matching is case-insensitive.
    """
    name = Path(filename).name.lower()
    vpn = name.startswith("vpn_")
    if vpn:
        name = name[len("vpn_"):]
    for pattern, cls in ISCX_RULES:
        if pattern.match(name):
            if cls is None:
                return None
            return f"vpn-{cls}" if vpn else cls
    return None


def label_from_dir(path: str | PathLike[str], root: str | PathLike[str]) -> str | None:
    """The name of the directory holding `path`; None for a file directly in `root` or outside it.

    The immediate parent counts, not the first folder under root, so `root` may be any ancestor
    (`data/` or `data/train/` both label `data/train/chat/x.pcap` as "chat").
    """
    p, r = Path(path).absolute(), Path(root).absolute()
    if p.parent == r or not p.is_relative_to(r):
        return None
    return p.parent.name


def _iscx(path: Path, root: Path) -> str | None:
    return iscx_label(path)


LABELLERS: dict[str, Labeller] = {"dir": label_from_dir, "iscx": _iscx}


def labeller(kind: str) -> Labeller:
    """The labelling function for `--labels KIND` ("dir" or "iscx")."""
    try:
        return LABELLERS[kind]
    except KeyError:
        raise ValueError(f"unknown labeller {kind!r}; choose from {sorted(LABELLERS)}") from None
