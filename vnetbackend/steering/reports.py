"""Per-packet hash reports from the steering program's report rings.

The program writes each report into a ring of its own CPU, held in two array maps that
`ReportRings` maps into this process (bpf/steering.bpf.c says how the two sides meet).
`ReportReader.drain()` returns what is in the rings now; `ReportRings.take_batch()` copies
it as one numpy array of records (the layout's dtype, `RECORD_DTYPE`) with no per-record
Python work, for readers that judge reports in bulk; iterating a reader with ``async for``
waits on the program's bell (a BPF ring buffer that gets a record whenever a report lands
in a ring the reader had emptied) in the running asyncio loop (``loop.add_reader``), so
reports arrive without polling or threads. Reports of one CPU come oldest first; reports
of different CPUs come in no particular order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes as ct
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vnetbackend.errors import VnetError
from vnetbackend.rss.types import HashReport
from vnetbackend.steering.layout import (
    REPORT_FLAG_EX_DST,
    REPORT_FLAG_EX_SRC,
    REPORT_FLAG_EXT_HEADERS,
    REPORT_FLAG_FRAGMENT,
    ReportCursor,
    SteeringReport,
)
from vnetbackend.steering.mapped import SEQ_CST, Atomics, MappedMap


@dataclass(frozen=True, slots=True)
class Report:
    """What the program decided for one frame, and the frame's flow to match it by.

    ``src``/``dst`` are the IP header's addresses (4 or 16 bytes, empty for non-IP);
    ports are 0 unless ``l4_proto`` says the transport header counted (6 or 17).
    ``hashed_src``/``hashed_dst`` are the addresses the hash took: the `_EX` ones (home
    address, type 2 routing header) where the program used them, else ``src``/``dst``.
    ``generation`` names the configuration that steered the frame
    (`SteeringProgram.generation`); it is not compared, being the program's bookkeeping
    rather than what it decided.
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
    hashed_src: bytes = b""
    hashed_dst: bytes = b""
    generation: int = field(default=0, compare=False)

    @classmethod
    def from_record(cls, record: SteeringReport) -> Report:
        width = {4: 4, 6: 16}.get(record.ip_version, 0)
        src, dst = bytes(record.src)[:width], bytes(record.dst)[:width]
        return cls(
            queue=record.queue,
            hash=record.hash,
            report=HashReport(record.report_type),
            ip_version=record.ip_version,
            src=src,
            dst=dst,
            l4_proto=record.l4_proto,
            src_port=record.src_port,
            dst_port=record.dst_port,
            l3_offset=record.l3_offset,
            l3_len=record.l3_len,
            frame_len=record.frame_len,
            has_ext_headers=bool(record.flags & REPORT_FLAG_EXT_HEADERS),
            fragment=bool(record.flags & REPORT_FLAG_FRAGMENT),
            hashed_src=bytes(record.ex_src)[:width] if record.flags & REPORT_FLAG_EX_SRC
            else src,
            hashed_dst=bytes(record.ex_dst)[:width] if record.flags & REPORT_FLAG_EX_DST
            else dst,
            generation=record.generation,
        )


_RECORD_SIZE = ct.sizeof(SteeringReport)
#: One report record as a numpy structured type (fields as in `SteeringReport`).
RECORD_DTYPE = np.dtype(SteeringReport)
_CURSOR_SIZE = ct.sizeof(ReportCursor)
_HEAD = ReportCursor.head.offset
_TAIL = ReportCursor.tail.offset


class ReportRingError(VnetError):
    """The report rings could not be mapped into this process, or were closed."""


class ReportSource(Protocol):
    """Where a `ReportReader` gets its records and what it waits on."""

    @property
    def fd(self) -> int: ...

    def take_batch(self) -> np.ndarray: ...

    def skip(self) -> int: ...


class ReportRings:
    """The program's report rings: *cpus* rings of *slots* records, mapped from the maps
    `report_cursors` (*cursors_fd*) and `report_slots` (*slots_fd*); *bell_fd* is the bell
    ring buffer's fd and *consume_bell* empties it.

    The reader's side of the handshake: read `head`, copy the records up to it, then move
    `tail` with an atomic exchange (a full barrier) and read `head` again; stop only when it
    has not moved. The program moves `head` with an atomic add and then reads `tail`: one of
    the two sees the other, so a report written while the reader goes to sleep rings the bell.
    """

    def __init__(self, cursors_fd: int, slots_fd: int, bell_fd: int,
                 consume_bell: Callable[[], None], *, cpus: int, slots: int) -> None:
        try:
            self._atomics = Atomics()
        except OSError as err:
            raise ReportRingError(f"report rings need libatomic.so.1: {err}") from None
        self._cpus, self._slots = cpus, slots
        self._bell_fd, self._consume_bell = bell_fd, consume_bell
        try:
            self._cursor_map = MappedMap(cursors_fd, cpus * _CURSOR_SIZE, "the report cursors")
        except OSError as err:
            raise ReportRingError(str(err)) from None
        try:
            self._record_map = MappedMap(slots_fd, cpus * slots * _RECORD_SIZE,
                                         "the report slots")
        except OSError as err:
            self._cursor_map.close()
            raise ReportRingError(str(err)) from None
        self._cursors = self._cursor_map.address
        records = (ct.c_char * (cpus * slots * _RECORD_SIZE)).from_address(
            self._record_map.address)
        self._array = np.frombuffer(records, dtype=RECORD_DTYPE)
        self._closed = False
        self.taken = 0
        self._tails = [self._atomics.load64(self._cursor(cpu) + _TAIL, SEQ_CST)
                       for cpu in range(cpus)]

    @property
    def fd(self) -> int:
        return self._bell_fd

    def _cursor(self, cpu: int) -> int:
        return self._cursors + cpu * _CURSOR_SIZE

    def skip(self) -> int:
        """Hand every written record back unread; returns how many there were."""
        if self._closed:
            raise ReportRingError("the report rings were closed with their program")
        self._consume_bell()
        total = 0
        for cpu in range(self._cpus):
            cursor, tail = self._cursor(cpu), self._tails[cpu]
            while (head := self._atomics.load64(cursor + _HEAD, SEQ_CST)) != tail:
                # The program never runs more than a ring ahead of the tail it saw.
                total += head - max(tail, head - self._slots)
                tail = head
                self._atomics.exchange64(cursor + _TAIL, tail, SEQ_CST)
            self._tails[cpu] = tail
        return total

    def take_batch(self) -> np.ndarray:
        """The records written since the last call as one array of `RECORD_DTYPE`
        (oldest first per CPU): each CPU's run is copied with at most two slices (the
        ring may wrap), before its slots are handed back to the program."""
        if self._closed:
            raise ReportRingError("the report rings were closed with their program")
        self._consume_bell()
        pieces = []
        for cpu in range(self._cpus):
            cursor, tail = self._cursor(cpu), self._tails[cpu]
            while (head := self._atomics.load64(cursor + _HEAD, SEQ_CST)) != tail:
                tail = min(max(tail, head - self._slots), head)
                base = cpu * self._slots
                first, count = tail % self._slots, head - tail
                upto = min(first + count, self._slots)
                pieces.append(self._array[base + first: base + upto].copy())
                if first + count > self._slots:
                    pieces.append(self._array[base: base + first + count - self._slots].copy())
                tail = head
                self._atomics.exchange64(cursor + _TAIL, tail, SEQ_CST)
            self._tails[cpu] = tail
        batch = np.concatenate(pieces) if pieces else np.empty(0, RECORD_DTYPE)
        self.taken += len(batch)
        return batch

    def close(self) -> None:
        """Unmap the rings; reading them afterwards raises ReportRingError."""
        if not self._closed:
            self._closed = True
            del self._array
            self._record_map.close()
            self._cursor_map.close()


#: Records a pumping reader keeps for `ReportReader.drain`/`next` callers (6 MiB).
RETAINED_RECORDS = 1 << 16


def decode_batch(batch: np.ndarray) -> tuple[list[Report], int]:
    """The reports of a batch of records (`RECORD_DTYPE`), in order, and how many records
    were skipped for a report type the specification does not have."""
    reports = []
    for row in batch:
        with contextlib.suppress(ValueError):
            reports.append(Report.from_record(SteeringReport.from_buffer_copy(row.tobytes())))
    return reports, len(batch) - len(reports)


class ReportReader:
    """Reads the program's reports from *source* (one reader per loaded program).

    Every record read passes, as part of a batch, through `on_batch` (if set) before
    anything else sees it: a daemon judges every report there. `pump` reads the rings
    whenever the bell rings; callers of `drain` and `next` meanwhile get the reports the
    pump read, decoded on demand, of which the last `retain` records are kept (older
    ones are counted in ``not_retained``). Records whose report type the specification
    does not have are counted in ``malformed`` and skipped.
    """

    def __init__(self, source: ReportSource, retain: int = RETAINED_RECORDS) -> None:
        self._source = source
        self.retain = retain
        self.on_batch: Callable[[np.ndarray], None] | None = None
        self._batches: collections.deque[np.ndarray] = collections.deque()
        self._retained = 0
        self._ready: collections.deque[Report] = collections.deque()
        self._waiters: set[asyncio.Event] = set()
        self._pumping = False
        self.malformed = 0
        self.not_retained = 0

    def take_batch(self) -> np.ndarray:
        """Read every record in the rings now, as one array (`RECORD_DTYPE`)."""
        batch = self._source.take_batch()
        if len(batch):
            if self.on_batch is not None:
                self.on_batch(batch)
            self._batches.append(batch)
            self._retained += len(batch)
            while self._retained > self.retain:
                dropped = self._batches.popleft()
                self._retained -= len(dropped)
                self.not_retained += len(dropped)
            for waiter in self._waiters:
                waiter.set()
        return batch

    def _consume(self) -> None:
        self.take_batch()
        while self._batches:
            reports, malformed = decode_batch(self._batches.popleft())
            self._ready.extend(reports)
            self.malformed += malformed
        self._retained = 0

    def drain(self) -> list[Report]:
        """Every report written so far and not yet returned (oldest first per CPU)."""
        self._consume()
        reports = list(self._ready)
        self._ready.clear()
        return reports

    def discard(self) -> int:
        """Empty the rings without decoding or `on_batch` (for benchmarks); returns how
        many records there were."""
        pending = len(self._ready) + self._retained
        self._ready.clear()
        self._batches.clear()
        self._retained = 0
        return pending + self._source.skip()

    async def pump(self) -> None:
        """Read the rings each time the bell's fd is readable, until cancelled; raises
        `ReportRingError` if the rings go away (their program was closed), and whatever
        `on_batch` raises."""
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()

        def on_bell() -> None:
            try:
                self.take_batch()
            except Exception as err:  # rings gone, or a fault in on_batch: stop here
                loop.remove_reader(self._source.fd)
                if not failed.done():
                    failed.set_exception(err)

        loop.add_reader(self._source.fd, on_bell)
        self._pumping = True
        try:
            self.take_batch()  # records that landed before the reader was added
            await failed
        finally:
            self._pumping = False
            loop.remove_reader(self._source.fd)

    async def next(self, timeout: float | None = None) -> Report:
        """The next report; waits on the bell's fd, or on the pump while one runs
        (TimeoutError after *timeout* s)."""
        self._consume()
        if self._ready:
            return self._ready.popleft()
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        own = not self._pumping
        if own:
            loop.add_reader(self._source.fd, self.take_batch)
        self._waiters.add(arrived)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._consume()  # a record may have landed before the wait began
                    if self._ready:
                        return self._ready.popleft()
                    arrived.clear()
                    await arrived.wait()
        finally:
            self._waiters.discard(arrived)
            if own:
                loop.remove_reader(self._source.fd)

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
