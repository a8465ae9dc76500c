"""Record tests/data/lab-tls.pcap: the small sample capture the README's quick start replays.

Real traffic between two network namespaces on a veth pair made here (198.51.100.0/24 only):
TLS sessions of different sizes from Python's ssl module and a UDP echo exchange, captured with
flagd's own live capture and written as a classic pcap. Needs root.

    python tests/record_sample.py [OUT]
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flagd.capture import open_capture  # noqa: E402
from tests import crafted  # noqa: E402
from tests.netns import veth_pair  # noqa: E402


def record(out: Path) -> int:
    records: list[crafted.Record] = []
    with veth_pair(root_end=True) as pair:
        cap = open_capture(pair.a.ifname)
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                fr = cap.read(0.05)
                for i in range(len(fr)):
                    o, n = int(fr.offset[i]), int(fr.caplen[i])
                    records.append(crafted.Record(float(fr.ts[i]), fr.data[o:o + n].tobytes(),
                                                  int(fr.wirelen[i])))

        t = threading.Thread(target=reader)
        t.start()
        pair.run_tls(conns=4, msgs=6, size=200, port=8443)
        pair.run_tls(conns=3, msgs=3, size=1200, port=9443)
        pair.run_udp(count=20, size=160, port=5004)
        pair.run_udp(count=8, size=60, port=3478)
        time.sleep(0.3)
        stop.set()
        t.join()
        cap.close()
    crafted.write_pcap(out, records, cap.linktype)
    return len(records)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data" / "lab-tls.pcap"
    print(f"{out}: {record(out)} packets")
