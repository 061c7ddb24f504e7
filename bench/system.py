"""What the bench needs from the operating system: machine facts, peak memory, a quiet stdout."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path


def machine() -> dict[str, str | int]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _status_kb(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def peak_rss_mib(pid: int | str = "self") -> float:
    """The process's resident-set high-water mark (VmHWM) in MiB."""
    return _status_kb(pid, "VmHWM") / 1024


def rss_mib(pid: int | str = "self") -> float:
    """The process's resident set now (VmRSS) in MiB."""
    return _status_kb(pid, "VmRSS") / 1024


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Set VmHWM back to the current RSS (Linux ``clear_refs``); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null while processes that print banners are started.

    A child inherits the descriptor as it is at its start, so a cluster started in here stays
    quiet for its whole life while the bench's own output goes on as before.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
