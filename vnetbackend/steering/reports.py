"""Per-packet hash reports from the steering program's ring buffer.

`ReportReader.drain()` returns what is in the ring now; iterating it with ``async for``
waits on the ring buffer's fd in the running asyncio loop (``loop.add_reader``), so reports
arrive without polling or threads.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes as ct
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vnetbackend.rss.types import HashReport
from vnetbackend.steering.layout import (
    REPORT_FLAG_EXT_HEADERS,
    REPORT_FLAG_FRAGMENT,
    SteeringReport,
)


@dataclass(frozen=True, slots=True)
class Report:
    """What the program decided for one frame, and the frame's flow to match it by.

    ``src``/``dst`` are the IP header's addresses (4 or 16 bytes, empty for non-IP);
    ports are 0 unless ``l4_proto`` says the transport header counted (6 or 17).
    """

    queue: int
    hash: int
    report: HashReport
    ip_version: int
    src: bytes
    dst: bytes
    l4_proto: int
    src_port: int
    dst_port: int
    l3_offset: int
    l3_len: int
    frame_len: int
    has_ext_headers: bool
    fragment: bool

    @classmethod
    def from_record(cls, record: SteeringReport) -> Report:
        width = {4: 4, 6: 16}.get(record.ip_version, 0)
        return cls(
            queue=record.queue,
            hash=record.hash,
            report=HashReport(record.report_type),
            ip_version=record.ip_version,
            src=bytes(record.src)[:width],
            dst=bytes(record.dst)[:width],
            l4_proto=record.l4_proto,
            src_port=record.src_port,
            dst_port=record.dst_port,
            l3_offset=record.l3_offset,
            l3_len=record.l3_len,
            frame_len=record.frame_len,
            has_ext_headers=bool(record.flags & REPORT_FLAG_EXT_HEADERS),
            fragment=bool(record.flags & REPORT_FLAG_FRAGMENT),
        )


_RECORD_SIZE = ct.sizeof(SteeringReport)


class ReportReader:
    """Reads the program's report ring buffer (one reader per loaded program).

    *open_ring* registers a callback ``(ctx, data, size)`` with bcc; *consume* makes bcc
    call it for every record in the ring; *ring_fd* is the ring buffer map's fd.
    Records that cannot be decoded are counted in ``malformed`` and skipped.
    """

    def __init__(self, open_ring: Callable[[Callable[[Any, int, int], int]], None],
                 consume: Callable[[], None], ring_fd: int) -> None:
        self._consume = consume
        self._ring_fd = ring_fd
        self._ready: collections.deque[Report] = collections.deque()
        self._discarding = False
        self._discarded = 0
        self.malformed = 0
        open_ring(self._on_record)

    def _on_record(self, _ctx: Any, data: int, size: int) -> int:
        if self._discarding:
            self._discarded += 1
            return 0
        if size < _RECORD_SIZE:
            self.malformed += 1
            return 0
        record = SteeringReport.from_buffer_copy(ct.string_at(data, _RECORD_SIZE))
        try:
            report = Report.from_record(record)
        except ValueError:  # a report type the specification does not have
            self.malformed += 1
            return 0
        self._ready.append(report)
        return 0

    def drain(self) -> list[Report]:
        """Every report written so far and not yet returned, oldest first."""
        self._consume()
        reports = list(self._ready)
        self._ready.clear()
        return reports

    def discard(self) -> int:
        """Empty the ring without decoding (for benchmarks); returns how many records."""
        self._discarding, self._discarded = True, 0
        try:
            self._consume()
        finally:
            self._discarding = False
        return self._discarded + len(self.drain())

    async def next(self, timeout: float | None = None) -> Report:
        """The next report; waits on the ring buffer fd (TimeoutError after *timeout* s)."""
        self._consume()
        if self._ready:
            return self._ready.popleft()
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def on_readable() -> None:
            self._consume()
            if self._ready:
                arrived.set()

        loop.add_reader(self._ring_fd, on_readable)
        try:
            on_readable()  # a record may have landed before the reader was added
            async with asyncio.timeout(timeout):
                await arrived.wait()
        finally:
            loop.remove_reader(self._ring_fd)
        return self._ready.popleft()

    def __aiter__(self) -> AsyncIterator[Report]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Report]:
        while True:
            yield await self.next()


async def collect_reports(reader: ReportReader, frame_lengths: Iterable[int],
                          timeout: float) -> list[Report]:
    """Every report read until one for each of *frame_lengths* arrived (or *timeout* s).

    Returns all reports read, those of other frames included, so that a caller can count
    what matched nothing; a length whose report never came is simply missing.
    """
    missing = set(frame_lengths)
    reports: list[Report] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while missing:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            report = await reader.next(timeout=remaining)
        except TimeoutError:
            break
        reports.append(report)
        missing.discard(report.frame_len)
    return reports + reader.drain()
