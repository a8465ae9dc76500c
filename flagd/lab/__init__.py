"""The traffic lab: labelled captures of real, unmodified applications between network namespaces.

`flagd lab generate --out DIR` builds client, router and server namespaces joined by veth pairs
(`topology`: documentation addresses only, no default route, no NAT, nothing in the caller's
namespace), makes a CA and keys for the run (`pki`), starts real servers from Debian packages
(`apps`), then runs many short client sessions with drawn parameters. Each session is captured on
the client's link (`record`), validated (client exit status, packet and payload minimums,
encrypted-looking payload, lab addresses only; VPN sessions: tunnel packets only, a WireGuard
flow opening with its own session's packets) and written to
`DIR/<class>/<session>.pcap`, at most `--keep-packets` packets per flow (statistics are computed
on all of them first). `DIR/manifest.json` describes the run (format "flagd-lab/1"): settings,
seed, Debian package versions, the lab's namespaces and ports, and one record per session, kept
or rejected (id, class, app, tunnel, params, returncode, reason, packet/byte counts, entropy and
per-flow 5-tuples with totals), plus a per-class summary with flows per minute.

Classes and applications (`apps.CLASSES`, one module of `apps` per class):

    chat           xmpp-starttls, xmpp-tls       prosody; slixmpp client, echo bot
                   sendxmpp-tls                  the same prosody and bot; sendxmpp
                   irc-tls                       ngircd (TLS only); Python client, echo bot
    email          smtp-starttls, smtps, imaps   postfix + dovecot; swaks, Python imaplib
                   curl-smtps, curl-imaps        the same servers; curl
    file-transfer  sftp, scp, https-download     OpenSSH; nginx + curl
                   wget-https                    the same nginx; wget (GnuTLS)
    streaming      hls-https                     nginx HLS (ffmpeg-made); ffmpeg at playback rate
                   icecast-https, icecast-ffmpeg icecast2 (TLS only), live ffmpeg source; curl,
                                                 or ffmpeg as the player
    voip           sip-tls, sip-udp              baresip auto-answer, SRTP, opus/G.722/PCMU
                   linphone-tls                  linphonec calling the same answerer (TLS, SRTP)
    torrent        aria2, transmission           opentracker + aria2c seeder; two leechers
    vpn-<class>    the same through --tunnel wireguard (wireguard-go), openvpn (UDP, tun) or
                   ipsec (strongSwan, IKEv2 + ESP in UDP)

With `--conditions random` (the default) each session also gets network conditions on its link
(`conditions`: delay, jitter, loss, rate, MTU, TCP congestion control) and, where its client can
choose, a TLS version and suite (`apps.base.draw_tls`); `--conditions none` plans what runs made
before these existed.

`generate.BENCHMARK_APPS` are the direct-TLS variants the honest benchmark should use. Teardown
(processes, namespaces, state) runs on exit, on Ctrl-C, on SIGTERM and after a crashed server;
`topology.reap_stale` removes what a killed run left and runs at the start of every lab.
`flagd lab doctor` lists the programs and prints the one apt-get line for what is missing.
"""
