"""What every benchmark prints about the machine it ran on (figures are only comparable on one)."""

from __future__ import annotations

import os
import platform


def machine(*extra: str) -> str:
    """CPU model, core count, kernel and Python, then any `extra` details of the benchmark."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return ", ".join([cpu, f"{os.cpu_count()} cores", f"{platform.system()} {platform.release()}",
                      f"Python {platform.python_version()}", *extra])
