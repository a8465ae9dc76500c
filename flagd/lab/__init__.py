"""The traffic lab: labelled captures of real, unmodified applications between network namespaces.

`flagd lab generate` builds client/router/server namespaces (topology), starts real servers and
clients from Debian packages (apps), records one capture per client session on the client's link,
validates each session and writes `DIR/<class>/<session>.pcap` plus `DIR/manifest.json`
(generate). `flagd lab doctor` says which programs are missing and the apt-get line for them.
"""
