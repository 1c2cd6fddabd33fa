"""The guest's side of the daemon's check: the records port read, every frame joined.

`LiveCheck` connects to the unix socket of the VM's virtio-serial port
``org.vnetbackend.records.0`` (QEMU's ``-chardev socket,server=on`` behind a
``virtserialport``), where the guest's recorder writes a line per received frame
(`vnetbackend.guest_records`), and joins each record with the steering program's report
of its frame (`vnetbackend.flowjoin.FlowJoin`).

Two orderings make the join exact:

* a frame's report is in the rings before the frame can reach the guest, so before each
  batch of records is joined the rings are read (`Hooks.read_reports`), and every report
  read reaches `add_reports` first;
* QEMU steers a frame with the configuration it holds when it takes the frame from the
  tap, which can be one the guest set after the program steered it. Records are joined
  only while the daemon's mirror is in sync (`Hooks.in_sync`), and a record is judged
  under its report's generation and every later one (`Hooks.configs_since`). A record
  can still arrive before the daemon has read QEMU's trace line of the guest command
  whose configuration steered it; so a pair that disagrees is held, the daemon reads the
  device again (`Hooks.request_sync`), and the pair is judged again once that snapshot,
  taken after the record arrived and so after QEMU steered its frame, is mirrored. Only
  then is it a disagreement. Such reads are at most one per `DOUBT_SYNC_INTERVAL_S`: a
  guest that keeps sending disagreeing records cannot make the daemon pause its VM
  more often.

The port carries the guest's words: a malformed line is counted, never joined; the port
closing ends the guest's side, not the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vnetbackend.checker import Outcome
from vnetbackend.flowjoin import FlowJoin, FlowVerdict, frame_class
from vnetbackend.guest_records import GuestRecord, RecordParser, stream_records
from vnetbackend.kernel_check import report_view
from vnetbackend.qemu.departures import Departure
from vnetbackend.rss import RssConfig
from vnetbackend.steering.reports import decode_batch

log = logging.getLogger("vnetbackend.daemon")

#: Guest disagreements published per batch of records; the rest are counted.
EVENTS_PER_BATCH = 16
#: How long `LiveCheck.stop` waits, at most, for the guest's recorder to say its buffers
#: are empty (two pass lines after the latest record) before it ends the join.
SETTLE_S = 10.0
CONNECT_TIMEOUT_S = 5.0
#: Records kept while the mirror is out of sync (QEMU not answering); later ones are
#: counted in ``records-dropped`` and not joined.
MAX_WAITING = 1 << 18
#: The least time between two device reads asked for held disagreements.
DOUBT_SYNC_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Hooks:
    """What the check needs of the daemon: read the report rings now (their reports
    reach `LiveCheck.add_reports` through the daemon), read the device again, wait until
    the mirror is in sync, the configurations QEMU may have used since a generation, the
    queue pairs the device serves, how many RSS changes the mirror made, whether QEMU
    detached the program shortly before, and where events go."""

    read_reports: Callable[[], None]
    request_sync: Callable[[], None]
    in_sync: Callable[[], Awaitable[None]]
    configs_since: Callable[[int], Sequence[RssConfig | None]]
    active_pairs: Callable[[], int | None]
    rss_changes: Callable[[], int]
    detached_recently: Callable[[], bool]
    publish: Callable[[str, dict[str, Any]], None]


class LiveCheck:
    """Reads the records port at *socket_path* and joins what it says with the reports.

    *sampled*: reports cover one frame in several (`FlowJoin.sampled`).
    """

    def __init__(self, socket_path: Path, hooks: Hooks, departures: Sequence[Departure],
                 sampled: bool) -> None:
        self.socket_path = socket_path
        self.hooks = hooks
        self.parser = RecordParser()
        self.join = FlowJoin(self._configs_since, departures, hooks.active_pairs, sampled,
                             on_verdict=self._on_verdict, hold_disagreements=True,
                             detached_recently=hooks.detached_recently)
        self.events_suppressed = 0
        self.records_dropped = 0
        #: Set once `stop` ended the join.
        self.stopped = False
        self.port = "connecting"
        self._events_left = EVENTS_PER_BATCH
        self._waiting: list[GuestRecord] = []
        self._greeted = False
        #: A device read was asked for the held pairs (judge them once in sync again).
        self._doubt_asked = False
        self._doubt_timer: asyncio.TimerHandle | None = None
        self._last_doubt_sync = float("-inf")
        self._arrived = asyncio.Event()
        self._changes_at_start = hooks.rss_changes()
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.StreamWriter | None = None

    def _configs_since(self, generation: int) -> Sequence[RssConfig | None]:
        return self.hooks.configs_since(generation)

    async def start(self) -> None:
        """Connect to the port (`OSError` or `TimeoutError` if it cannot be reached) and
        start reading and joining."""
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
        self.port = "open"
        self._tasks = [asyncio.create_task(self._read(reader)),
                       asyncio.create_task(self._join_when_in_sync())]

    def add_reports(self, batch: np.ndarray) -> None:
        """Report records as read from the rings (`RECORD_DTYPE`), in order; a record of
        a report type the specification does not have is the kernel check's to count."""
        self.join.add_reports(decode_batch(batch)[0])

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            await stream_records(reader, self.parser, self._deliver)
            self.port = "closed by QEMU or the guest"
        except OSError as err:
            self.port = f"failed: {err}"
        log.info("records port %s: %s", self.socket_path, self.port)
        self._arrived.set()

    def _deliver(self, records: list[GuestRecord]) -> None:
        if self.parser.header is not None and not self._greeted:
            self._greeted = True
            release, interface, _ = self.parser.header
            self.hooks.publish("VNET_RECORDER_STARTED", {
                "records-port": str(self.socket_path), "guest-kernel": release,
                "interface": interface})
        room = MAX_WAITING - len(self._waiting)
        self.records_dropped += max(0, len(records) - room)
        self._waiting.extend(records[:max(0, room)])
        self._arrived.set()

    async def _join_when_in_sync(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            await self.hooks.in_sync()
            self._join_waiting()

    def _join_waiting(self) -> None:
        """Judge again what was held if the device was read for it since (the caller
        waited for the mirror to be in sync), then join what arrived; held pairs ask for
        a device read (`_ask_doubt_sync`)."""
        self._events_left = EVENTS_PER_BATCH
        if self._doubt_asked:
            self._doubt_asked = False
            self.join.judge_held()
        self.hooks.read_reports()
        records, self._waiting = self._waiting, []
        self.join.add_records(records)
        if self.join.held and not self._doubt_asked and self._doubt_timer is None:
            delay = self._last_doubt_sync + DOUBT_SYNC_INTERVAL_S - time.monotonic()
            self._doubt_timer = asyncio.get_running_loop().call_later(
                max(0.0, delay), self._ask_doubt_sync)

    def _ask_doubt_sync(self) -> None:
        self._doubt_timer = None
        self._last_doubt_sync = time.monotonic()
        self.hooks.request_sync()
        self._doubt_asked = True
        self._arrived.set()  # judge them again once the mirror is in sync

    def _on_verdict(self, verdict: FlowVerdict) -> None:
        if verdict.outcome is not Outcome.DISAGREED:
            return
        if self._events_left <= 0:
            self.events_suppressed += 1
            return
        self._events_left -= 1
        record, report = verdict.record, verdict.report
        configs = [c for c in self.hooks.configs_since(report.generation) if c is not None]
        self.hooks.publish("VNET_HASH_MISMATCH", {
            "source": "guest",
            "frame-class": frame_class(report),
            "generation": report.generation,
            "report": report_view(report),
            "guest": {"queue": record.queue, "hash": f"0x{record.hash:08x}",
                      "l4": record.l4_hash, "seq": record.seq},
            "configs": len(configs),
            "reason": verdict.reason,
        })

    async def _until_in_sync(self, settle: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settle):
                await self.hooks.in_sync()

    def close(self) -> None:
        """Stop reading at once (the daemon is going away); the tallies stay."""
        if self._doubt_timer is not None:
            self._doubt_timer.cancel()
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._writer.close()
        self.stopped = True

    async def stop(self, settle: float = SETTLE_S) -> None:
        """End the check: wait (at most *settle* seconds) for the guest's recorder to say
        it has nothing more, join what arrived, and count every report still waiting for
        its record as unmatched."""
        if self.port == "open":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settle):
                    while self.parser.passes_since_record < 2 and self.port == "open":
                        await self._arrived.wait()
                        self._arrived.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._until_in_sync(settle)
        self._join_waiting()
        if self._doubt_timer is not None:
            self._doubt_timer.cancel()
            self._doubt_timer = None
        if self.join.held:
            self.hooks.request_sync()
            await self._until_in_sync(settle)
        self.join.judge_held()
        self.join.finish()
        self.stopped = True
        if self._writer is not None:
            self._writer.close()
        if self.port == "open":
            self.port = "closed by the daemon"

    def summary(self) -> dict[str, Any]:
        return {**self.join.summary(),
                "rss_changes": self.hooks.rss_changes() - self._changes_at_start,
                "records-port": {"path": str(self.socket_path), "state": self.port,
                                 **self.parser.summary()},
                "records-dropped": self.records_dropped,
                "events-suppressed": self.events_suppressed}
