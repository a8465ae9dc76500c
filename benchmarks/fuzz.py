"""Fuzz the capture readers, the link/IP/TCP/UDP decoder and the flow meter with >= 1,000,000 inputs.

Three targets, each counting its inputs and every exception that is not `DecodeError`:
- frames: mutated frames (byte flips, boundary values, cuts, duplicated spans) of every crafted
  link type and edge case (tests/crafted.py), plus random bytes under random link types, decoded
  in batches of 4,096 and fed to a small flow table. One input = one frame.
- files: mutated pcap/pcapng files (five valid seeds covering every reader path) read with
  `read_capture`, decoded and metered. One input = one file.
- atheris (coverage-guided, when the atheris package imports): libFuzzer mutates whole capture
  files starting from the same seeds, with flagd's reader, decoder and flow table instrumented.
  Runs in a child process (libFuzzer exits when done). One input = one libFuzzer run.

Baseline in the same run: the same targets on the unmutated seeds (inputs/s), for the ratio.

    python benchmarks/fuzz.py [--frames 1000000] [--files 200000] [--atheris 200000]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Tally:
    def __init__(self, name: str, crash_dir: Path) -> None:
        self.name, self.crash_dir = name, crash_dir
        self.inputs = self.refused = 0
        self.escaped: Counter[str] = Counter()
        self.t0 = time.perf_counter()
        self.dt = 0.0

    def done(self) -> Tally:
        self.dt = time.perf_counter() - self.t0
        return self

    @property
    def rate(self) -> float:
        return self.inputs / max(self.dt, 1e-9)

    def escape(self, exc: BaseException, data: bytes) -> None:
        key = f"{type(exc).__name__}: {str(exc)[:120]}"
        if key not in self.escaped:  # keep the first input of each kind for a reproducer
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            (self.crash_dir / f"{self.name}-{len(self.escaped)}.bin").write_bytes(data)
            traceback.print_exc()
        self.escaped[key] += 1

    def line(self) -> str:
        return (f"{self.name:8s} {self.inputs:>10,} inputs in {self.dt:6.1f} s ({self.rate:>9,.0f}/s)"
                f"  refused with DecodeError {self.refused:,}  other exceptions "
                f"{sum(self.escaped.values())}")


def fuzz_frames(n: int, seed: int, crash_dir: Path, mutate_on: bool = True) -> Tally:
    import numpy as np

    from flagd.flows import FlowSettings, FlowTable
    from flagd.frames import Frames
    from flagd.packets import decode
    from tests.test_robustness import CASES, LINKTYPES, check_packets, mutate

    rng = random.Random(seed)
    t = Tally("frames" if mutate_on else "frames0", crash_dir)
    table = FlowTable(FlowSettings(max_flows=4096, ready_packets=5, idle_timeout=1.0))
    ts = 1_700_000_000.0
    while t.inputs < n:
        recs = []
        for _ in range(min(4096, n - t.inputs)):
            ts += 0.0001
            if not mutate_on:
                c = rng.choice(CASES)
                recs.append((ts, c.frame, len(c.frame), c.linktype))
                continue
            if rng.random() < 0.1:
                b = rng.randbytes(rng.randint(0, 120))
                recs.append((ts, b, len(b), rng.choice(LINKTYPES)))
                continue
            c = rng.choice(CASES)
            b = mutate(rng, c.frame)[: rng.randint(0, 200)]
            lt = c.linktype if rng.random() < 0.95 else rng.choice(LINKTYPES)
            recs.append((ts, b, len(b) + rng.choice((0, 0, 0, 1, 1500)), lt))
        fr = Frames.from_records(recs)
        try:
            check_packets(fr)
            table.add(decode(fr))
        except Exception as e:  # noqa: BLE001 - that is what we count
            t.escape(e, b"".join(r[1] for r in recs))
        t.inputs += len(recs)
    table.flush()
    _ = np
    return t.done()


def fuzz_files(n: int, seed: int, crash_dir: Path, mutate_on: bool = True) -> Tally:
    from flagd.flows import FlowSettings, FlowTable
    from flagd.packets import DecodeError, decode
    from flagd.pcapfile import read_capture
    from tests.test_robustness import SEEDS, check_frames, mutate

    rng = random.Random(seed)
    t = Tally("files" if mutate_on else "files0", crash_dir)
    path = Path(tempfile.mkdtemp(prefix="flagd-fuzz-", dir="/dev/shm")) / "in.cap"
    table = FlowTable(FlowSettings(max_flows=512, ready_packets=3, idle_timeout=1.0))
    for i in range(n):
        data = rng.choice(SEEDS)
        if mutate_on:
            data = mutate(rng, data)
            if rng.random() < 0.2:  # stack a second round: reach past the first bad header
                data = mutate(rng, data)
        path.write_bytes(data)
        try:
            with read_capture(path, batch_size=rng.choice((1, 3, 65536))) as cap:
                for fr in cap:
                    check_frames(fr)
                    table.add(decode(fr))
        except DecodeError:
            t.refused += 1
        except Exception as e:  # noqa: BLE001
            t.escape(e, data)
        t.inputs += 1
        if i % 1000 == 999:
            table.flush()
    path.unlink(missing_ok=True)
    path.parent.rmdir()
    return t.done()


def replay_ndpi(crash_dir: Path) -> Tally | None:
    """Every capture of the nDPI test suite (543 files, fuzz-* among them): read, decode, meter."""
    from flagd.flows import FlowSettings, FlowTable
    from flagd.packets import DecodeError, decode
    from flagd.pcapfile import read_capture
    from tests.conftest import shared_data

    d = shared_data() / "ndpi" / "pcap"
    if not d.is_dir():
        print(f"ndpi: no captures at {d}; skipped")
        return None
    t = Tally("ndpi", crash_dir)
    cut = 0
    for path in sorted(d.iterdir()):
        table = FlowTable(FlowSettings())
        try:
            with read_capture(path) as cap:
                for fr in cap:
                    table.add(decode(fr))
                cut += bool(cap.stats.problem)
            table.flush()
        except DecodeError:
            t.refused += 1
        except Exception as e:  # noqa: BLE001
            t.escape(e, path.name.encode())
        t.inputs += 1
    print(f"ndpi: {t.inputs} captures, {cut} stopped early with a one-line problem, "
          f"{t.refused} refused with DecodeError")
    return t.done()


# -- atheris (child process) ---------------------------------------------------------------------


def atheris_child(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        from flagd.flows import FlowSettings, FlowTable
        from flagd.packets import DecodeError, decode
        from flagd.pcapfile import read_capture
    path = Path(tempfile.mkdtemp(prefix="flagd-atheris-", dir="/dev/shm")) / "in.cap"

    def one(data: bytes) -> None:
        path.write_bytes(data)
        table = FlowTable(FlowSettings(max_flows=16, ready_packets=3, idle_timeout=1.0))
        try:
            with read_capture(path, batch_size=5) as cap:
                for fr in cap:
                    table.add(decode(fr))
        except DecodeError:
            return
        table.flush()

    atheris.Setup(argv, one)
    atheris.Fuzz()


def fuzz_atheris(n: int, crash_dir: Path, chunk: int = 40_000) -> Tally | None:
    """libFuzzer runs in children of `chunk` runs each, sharing one growing corpus directory.

    Chunks, because the process grows by ~4.5 KB per run under atheris's instrumentation (the
    same loop without atheris stays flat, 83 MB over 20,000 files, and the count of mappings
    stays constant under atheris too: no capture file is left mapped), which reaches libFuzzer's
    2 GiB RSS limit after ~280,000 runs. libFuzzer adds every input that finds new coverage to the corpus, so
    each chunk starts where the last one stopped.
    """
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris: not importable here (pip install atheris); skipped")
        return None
    from tests.test_robustness import SEEDS

    corpus = Path(tempfile.mkdtemp(prefix="flagd-corpus-"))
    for i, s in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(s)
    crash_dir.mkdir(parents=True, exist_ok=True)
    t = Tally("atheris", crash_dir)
    status = ""
    while t.inputs < n:
        runs = min(chunk, n - t.inputs)
        r = subprocess.run([sys.executable, __file__, "--atheris-child", f"-runs={runs}",
                            "-max_len=4096", f"-seed={t.inputs + 1}",
                            f"-artifact_prefix={crash_dir}/", str(corpus)],
                           capture_output=True, text=True)
        done = [ln for ln in r.stderr.splitlines() if ln.startswith("#") and "DONE" in ln]
        if r.returncode != 0 or not done:
            t.escaped[f"libFuzzer exit {r.returncode}"] += 1
            print(r.stderr[-3000:])
            break
        t.inputs += int(done[-1].split()[0][1:])
        status = done[-1]
        print(f"atheris: {t.inputs:,} runs; {status}", flush=True)
    print(f"atheris: corpus {len(list(corpus.iterdir()))} inputs; last status: {status}")
    return t.done()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--atheris-child":
        atheris_child([sys.argv[0], *sys.argv[2:]])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=200_000)
    p.add_argument("--atheris", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--crashes", type=Path, default=Path(tempfile.gettempdir()) / "flagd-fuzz-crashes")
    a = p.parse_args()
    print(f"machine: {machine()}")
    base_frames = fuzz_frames(40_960, a.seed, a.crashes, mutate_on=False)
    base_files = fuzz_files(1_000, a.seed, a.crashes, mutate_on=False)
    print("baseline (valid inputs):")
    print("  " + base_frames.line())
    print("  " + base_files.line())
    print("fuzzing:", flush=True)
    tallies = [fuzz_frames(a.frames, a.seed, a.crashes)]
    print("  " + tallies[-1].line(), flush=True)
    tallies.append(fuzz_files(a.files, a.seed, a.crashes))
    print("  " + tallies[-1].line(), flush=True)
    t = replay_ndpi(a.crashes)
    if t is not None:
        tallies.append(t)
        print("  " + t.line(), flush=True)
    if a.atheris:
        t = fuzz_atheris(a.atheris, a.crashes)
        if t is not None:
            tallies.append(t)
            print(f"  {t.name:8s} {t.inputs:>10,} inputs (coverage-guided)  other exceptions "
                  f"{sum(t.escaped.values())}", flush=True)
    total = sum(t.inputs for t in tallies)
    escaped = sum(sum(t.escaped.values()) for t in tallies)
    print(f"ratio mutated/valid throughput: frames {tallies[0].rate / base_frames.rate:.2f}x, "
          f"files {tallies[1].rate / base_files.rate:.2f}x")
    print(f"total: {total:,} inputs, {escaped} exceptions other than DecodeError")
    for t in tallies:
        for k, v in t.escaped.items():
            print(f"  {t.name}: {v} x {k}")
    sys.exit(1 if escaped else 0)


if __name__ == "__main__":
    main()
