"""Free TCP ports on loopback, and the processes below a process: what tests of `coffer serve`
and its workers look at."""

from __future__ import annotations

import contextlib
import socket

from coffer.bench.measure import process_stats

__all__ = ["children", "free_ports", "gone"]


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1 when looked at."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        with contextlib.ExitStack() as held:
            try:
                for port in range(first + 1, first + count):
                    taken = held.enter_context(socket.socket())
                    taken.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise AssertionError(f"no {count} consecutive free ports found")


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    return sorted(
        child for child, stat in process_stats().items() if stat.parent == pid and stat.state != "Z"
    )


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie left for a parent to reap has too)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            text = file.read()
    except OSError:
        return True
    return text[text.rindex(")") + 2 :].split()[0] in ("Z", "X")
