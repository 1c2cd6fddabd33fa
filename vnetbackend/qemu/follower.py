"""Following the guest's RSS commits as QEMU reports them.

QEMU's ``virtio_net_rss_*`` trace events (log backend, ``-msg timestamp=on``) are written
to a file once per RSS command the guest sends::

    1234@1700000000.123456:virtio_net_rss_enable hashes 0x3f, table of 128, key of 40
    1234@1700000000.223456:virtio_net_rss_disable
    1234@1700000000.323456:virtio_net_rss_error Invalid key size, value 0x00000050

`TraceFollower` tails that file without polling (inotify wakes it) and yields one
`RssTraceEvent` per line. It reads in the event loop itself: a read of a file that
QEMU only appends to, bounded below, takes microseconds, while handing each read to a
thread costs the mirror's path hundreds of them. The events say *that* the
configuration changed; what it changed to is read from the device itself (see
`vnetbackend.qemu.snapshot`).

The file's size is bounded whatever the guest does: once everything in it was read and
it holds more than ``max_bytes``, the follower cuts it back to empty. QEMU writes it with
O_APPEND (as `logfile` opens it, and as the daemon opens QEMU's own log), so its next
line lands at the new end and QEMU never waits on the follower. A line written between
the last read and the cut would be lost, so the cut is itself an event (``truncated``)
after which the device must be read again.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from qemu.qmp import QMPClient

from vnetbackend.filewatch import FileWatch
from vnetbackend.qemu.qmp import call, reply_field

#: The QEMU trace events the follower reads (switched on over QMP).
TRACE_EVENTS = "virtio_net_rss_*"
#: The size past which a fully read trace log is cut back to empty.
MAX_TRACE_LOG_BYTES = 1 << 20
#: The most one read of the log takes.
READ_CHUNK_BYTES = 64 << 10
_LINE = re.compile(
    r"^(?:(?P<pid>\d+)@(?P<sec>\d+)\.(?P<usec>\d{6}):)?virtio_net_rss_"
    r"(?P<kind>enable|disable|error)\b ?(?P<args>.*)$"
)
#: QEMU 10.0 names the device first (``nic=0x...``); 7.2 does not.
_ENABLE_ARGS = re.compile(r"(?:nic=0x[0-9a-f]+ )?hashes 0x(?P<hashes>[0-9a-f]+), "
                          r"table of (?P<table>\d+), key of (?P<key>\d+)")


@dataclass(frozen=True, slots=True)
class RssTraceEvent:
    """One RSS trace line (``kind`` enable, disable or error), or the follower's note
    that it cut the log back (``truncated``). ``at`` is QEMU's wall-clock time (None
    without timestamps)."""

    kind: str
    at: float | None
    detail: str
    hash_types: int | None = None
    table_length: int | None = None
    key_length: int | None = None


def parse_trace_line(line: str) -> RssTraceEvent | None:
    """The event on *line*, or None when the line is not an RSS trace event."""
    match = _LINE.match(line.rstrip("\n"))
    if not match:
        return None
    at = float(f"{match['sec']}.{match['usec']}") if match["sec"] else None
    args = match["args"].strip()
    enable = _ENABLE_ARGS.match(args) if match["kind"] == "enable" else None
    if enable:
        return RssTraceEvent("enable", at, args, int(enable["hashes"], 16),
                             int(enable["table"]), int(enable["key"]))
    return RssTraceEvent(match["kind"], at, args)


def _no_follow(path: str, flags: int) -> int:
    """Open *path* unless it is a symbolic link (someone else's file planted there)."""
    return os.open(path, flags | os.O_NOFOLLOW)


class TraceFollower:
    """Yields the RSS trace events appended to *path* from now on (or from the start).

    Use as ``async with TraceFollower(path) as events: async for event in events``.
    The file must exist (create it before QEMU opens it).
    """

    def __init__(self, path: Path, *, from_start: bool = False,
                 max_bytes: int = MAX_TRACE_LOG_BYTES) -> None:
        self.path = path
        self._from_start = from_start
        self._max_bytes = max_bytes
        self._watch: FileWatch | None = None
        self._fd = -1

    async def __aenter__(self) -> TraceFollower:
        self._fd = _no_follow(str(self.path), os.O_RDWR | os.O_CLOEXEC)
        try:
            self._watch = FileWatch(self.path)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        if not self._from_start:
            os.lseek(self._fd, 0, os.SEEK_END)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __aiter__(self) -> AsyncIterator[RssTraceEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[RssTraceEvent]:
        assert self._fd >= 0 and self._watch is not None, \
            "use TraceFollower as an async context manager"
        partial = b""
        while True:
            self._watch.written.clear()
            chunk = os.read(self._fd, READ_CHUNK_BYTES)
            if not chunk:
                size = os.lseek(self._fd, 0, os.SEEK_CUR)
                if not partial and size > self._max_bytes:
                    os.ftruncate(self._fd, 0)
                    os.lseek(self._fd, 0, os.SEEK_SET)
                    yield RssTraceEvent("truncated", None, f"trace log cut back from {size} "
                                                           "bytes")
                    continue
                await self._watch.written.wait()
                continue
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for raw in lines:
                event = parse_trace_line(raw.decode("utf-8", "replace"))
                if event is not None:
                    yield event


async def control_queue_commits(qmp: QMPClient, virtio_path: str, control_queue: int,
                                interval: float = 0.1) -> AsyncIterator[int]:
    """Yield the control queue's used index as first read, then each time it moves
    (checked every *interval* s).

    The fallback for a QEMU whose trace events cannot be switched on: every control
    command the guest sends (RSS among them) advances that index. Raises
    `QemuCallFailed` when a query fails.
    """
    command = "x-query-virtio-queue-status"
    args = {"path": virtio_path, "queue": control_queue}
    last = reply_field(await call(qmp, command, args), "used-idx", int, command)
    yield last
    while True:
        await asyncio.sleep(interval)
        used = reply_field(await call(qmp, command, args), "used-idx", int, command)
        if used != last:
            last = used
            yield used
