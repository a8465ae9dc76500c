"""Labelling captures: directory names, and ISCX VPN-nonVPN 2016 file names -> 12 classes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flagd.labels import CLASSES_12, iscx_label, label_from_dir, labeller

SHARED = Path(os.environ.get("FLAGD_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))

# Every original ISCX name from the issue, with the class we give it. Where Deep Packet
# (munhouiani/Deep-Packet utils.py) or DeepTraffic (echowei/DeepTraffic DataSet.txt) label a file,
# the class is theirs; None marks files both leave out (video calls) or outside the 12 classes.
ISCX_NAMES = [
    ("aim_chat_3a.pcap", "chat"),
    ("aim_chat_3b.pcap", "chat"),
    ("AIMchat1.pcapng", "chat"),
    ("email1a.pcap", "email"),
    ("facebook_audio1a.pcap", "voip"),
    ("facebook_chat_4a.pcap", "chat"),
    ("facebook_video1a.pcap", None),
    ("facebookchat1.pcapng", "chat"),
    ("ftps_down_1a.pcap", "file-transfer"),
    ("gmailchat1.pcapng", "email"),
    ("hangouts_audio1a.pcap", "voip"),
    ("hangout_chat_4b.pcap", "chat"),
    ("hangouts_video1b.pcap", None),
    ("ICQchat1.pcapng", "chat"),
    ("icq_chat_3a.pcap", "chat"),
    ("netflix1.pcap", "streaming"),
    ("scp1.pcap", "file-transfer"),
    ("scpDown1.pcap", "file-transfer"),
    ("scpUp1.pcap", "file-transfer"),
    ("sftp1.pcap", "file-transfer"),
    ("sftpDown1.pcap", "file-transfer"),
    ("sftpUp1.pcap", "file-transfer"),
    ("sftp_down_3a.pcap", "file-transfer"),
    ("skype_audio1a.pcap", "voip"),
    ("skype_chat1a.pcap", "chat"),
    ("skype_file1.pcap", "file-transfer"),
    ("skype_transfer1.pcap", "file-transfer"),
    ("skype_video1a.pcap", None),
    ("spotify1.pcap", "streaming"),
    ("vimeo1.pcap", "streaming"),
    ("voipbuster1b.pcap", "voip"),
    ("youtube1.pcap", "streaming"),
    ("youtubeHTML5_1.pcap", "streaming"),
    ("ftps_up_2a.pcap", "file-transfer"),
    ("Torrent01.pcapng", "torrent"),
    ("vpn_aim_chat1a.pcap", "vpn-chat"),
    ("vpn_bittorrent.pcap", "vpn-torrent"),
    ("vpn_email2a.pcap", "vpn-email"),
    ("vpn_facebook_audio2.pcap", "vpn-voip"),
    ("vpn_facebook_chat1a.pcap", "vpn-chat"),
    ("vpn_ftps_A.pcap", "vpn-file-transfer"),
    ("vpn_hangouts_audio1.pcap", "vpn-voip"),
    ("vpn_hangouts_chat1a.pcap", "vpn-chat"),
    ("vpn_icq_chat1a.pcap", "vpn-chat"),
    ("vpn_netflix_A.pcap", "vpn-streaming"),
    ("vpn_sftp_A.pcap", "vpn-file-transfer"),
    ("vpn_skype_audio1.pcap", "vpn-voip"),
    ("vpn_skype_chat1a.pcap", "vpn-chat"),
    ("vpn_skype_files1a.pcap", "vpn-file-transfer"),
    ("vpn_spotify_A.pcap", "vpn-streaming"),
    ("vpn_vimeo_A.pcap", "vpn-streaming"),
    ("vpn_voipbuster1a.pcap", "vpn-voip"),
    ("vpn_youtube_A.pcap", "vpn-streaming"),
]

# DeepTraffic's DataSet.txt: the original files behind the shared iscx-vpn2016 data, by the
# folder (class) each was filed under. Our mapping must agree with every one of them.
DEEPTRAFFIC = {
    "chat": "AIMchat1.pcapng AIMchat2.pcapng aim_chat_3a.pcap aim_chat_3b.pcap facebookchat1.pcapng "
            "facebookchat2.pcapng facebookchat3.pcapng facebook_chat_4a.pcap facebook_chat_4b.pcap "
            "hangouts_chat_4a.pcap hangout_chat_4b.pcap ICQchat1.pcapng ICQchat2.pcapng "
            "icq_chat_3a.pcap icq_chat_3b.pcap skype_chat1a.pcap skype_chat1b.pcap",
    "email": "email1a.pcap email1b.pcap email2a.pcap email2b.pcap gmailchat1.pcapng "
             "gmailchat2.pcapng gmailchat3.pcapng",
    "file-transfer": " ".join(f"skype_file{i}.pcap" for i in range(1, 9)),
    "torrent": "Torrent01.pcap",
    "streaming": "netflix1.pcap netflix2.pcap netflix3.pcap netflix4.pcap spotify1.pcap "
                 "spotify2.pcap spotify3.pcap spotify4.pcap vimeo1.pcap vimeo2.pcap vimeo3.pcap "
                 "vimeo4.pcap youtube1.pcap youtube2.pcap youtube3.pcap youtube4.pcap "
                 "youtube5.pcap youtube6.pcap youtubeHTML5_1.pcap",
    "voip": "hangouts_audio1a.pcap hangouts_audio1b.pcap hangouts_audio2a.pcap "
            "hangouts_audio2b.pcap hangouts_audio3.pcap hangouts_audio4.pcap",
    "vpn-chat": "vpn_aim_chat1a.pcap vpn_aim_chat1b.pcap vpn_chat.pcap vpn_facebook_chat1a.pcap "
                "vpn_facebook_chat1b.pcap vpn_hangouts_chat1a.pcap vpn_hangouts_chat1b.pcap "
                "vpn_icq_chat1a.pcap vpn_icq_chat1b.pcap vpn_skype_chat1a.pcap "
                "vpn_skype_chat1b.pcap",
    "vpn-email": "vpn_email2a.pcap vpn_email2b.pcap",
    "vpn-file-transfer": "vpn_ftps_A.pcap vpn_ftps_B.pcap vpn_sftp_A.pcap vpn_sftp_B.pcap "
                         "vpn_skype_files1a.pcap vpn_skype_files1b.pcap",
    "vpn-torrent": "vpn_bittorrent.pcap",
    "vpn-streaming": "vpn_netflix_A.pcap vpn_spotify_A.pcap vpn_vimeo_A.pcap vpn_vimeo_B.pcap "
                     "vpn_youtube_A.pcap",
    "vpn-voip": "vpn_facebook_audio2.pcap vpn_hangouts_audio1.pcap vpn_hangouts_audio2.pcap "
                "vpn_skype_audio1.pcap vpn_skype_audio2.pcap vpn_voipbuster1a.pcap "
                "vpn_voipbuster1b.pcap",
}

# Deep Packet's traffic classes for files DeepTraffic leaves out (the rest agree with the above).
DEEP_PACKET_EXTRA = [
    ("ftps_down_1b.pcap", "file-transfer"), ("sftp_up_2b.pcap", "file-transfer"),
    ("sftpdown2.pcap", "file-transfer"), ("facebook_audio4.pcap", "voip"),
    ("skype_audio2b.pcap", "voip"), ("hangouts_audio3.pcap", "voip"),
]


def test_classes_12_fixed_order():
    assert CLASSES_12 == (
        "chat", "email", "file-transfer", "streaming", "torrent", "voip",
        "vpn-chat", "vpn-email", "vpn-file-transfer", "vpn-streaming", "vpn-torrent", "vpn-voip",
    )


@pytest.mark.parametrize(("name", "expected"), ISCX_NAMES)
def test_iscx_names(name, expected):
    assert iscx_label(name) == expected


@pytest.mark.parametrize(("name", "expected"),
                         [(n, cls) for cls, names in DEEPTRAFFIC.items() for n in names.split()]
                         + DEEP_PACKET_EXTRA)
def test_iscx_agrees_with_reference_mappings(name, expected):
    assert iscx_label(name) == expected


def test_every_class_is_reachable():
    assert {iscx_label(n) for n, _ in ISCX_NAMES} - {None} == set(CLASSES_12)


@pytest.mark.parametrize("name", [
    "torFacebook.pcap", "torYoutube1.pcap", "torVimeo1.pcap",  # Tor captures: not torrent/streaming
    "BROWSING_gate_SSL_Browsing.pcap", "ssl_browsing.pcap", "unknown.pcap", "", "vpn_.pcap",
    "vpn_facebook_video2.pcap", "notes.txt", "my_youtube.pcap",
])
def test_iscx_unmappable_names_are_none(name):
    assert iscx_label(name) is None


def test_iscx_case_insensitive_and_ignores_directories(tmp_path):
    assert iscx_label("VPN_SKYPE_CHAT1A.PCAP") == "vpn-chat"
    assert iscx_label("NetFlix3.PcapNG") == "streaming"
    assert iscx_label(Path("/data/VPN-PCAPs-01/vpn_youtube_A.pcap")) == "vpn-streaming"
    # The iscx labeller reads only the file name, never the folder it sits in.
    assert labeller("iscx")(tmp_path / "voip" / "vimeo2.pcap", tmp_path) == "streaming"


def test_label_from_dir(tmp_path):
    assert label_from_dir(tmp_path / "chat" / "a.pcap", tmp_path) == "chat"
    assert label_from_dir(tmp_path / "train" / "vpn-voip" / "raw.pcap", tmp_path) == "vpn-voip"
    assert label_from_dir(tmp_path / "loose.pcap", tmp_path) is None  # not in a class folder
    assert label_from_dir(Path("/elsewhere/chat/a.pcap"), tmp_path) is None  # outside root
    assert labeller("dir") is label_from_dir


def test_label_from_dir_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert label_from_dir(Path("data/email/x.pcapng"), tmp_path / "data") == "email"
    assert label_from_dir("data/email/x.pcapng", "data") == "email"


def test_unknown_labeller():
    with pytest.raises(ValueError, match="iscx"):
        labeller("filename")


def test_dir_labels_on_shared_data():
    root = SHARED / "iscx-vpn2016" / "train"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set FLAGD_SHARED_DATA)")
    label = labeller("dir")
    got = {label(p, root) for p in root.rglob("*.pcap")}
    assert got == set(CLASSES_12)
