"""The live check on ordinary traffic: guest records joined with the kernel's reports.

`check_ordinary_traffic` runs `vnetbackend.testbed.ordinary.Traffic` through a guest
under the daemon while the guest changes its RSS configuration (`RssChange`, each once
the guest has recorded a given number of frames), collects the steering program's
reports (every frame) and the guest recorder's records, and judges every frame with
`vnetbackend.flowjoin.check_flows`.

Which configuration was in force. Until reports carry a configuration generation, a
change is bracketed on both streams:

* kernel: reports drained before the guest's ethtool command were taken under the old
  configuration (the daemon had mirrored it, and nothing changes the maps but the
  daemon); reports drained after the daemon's ``query-vnet`` shows a new configuration
  in its program, attached again, were taken under the new one; those in between under
  either. (The new configuration is then read from the guest and must be the one the
  daemon holds.)
* guest: records that arrived before the ethtool command are of frames QEMU handled under
  the old configuration; after the daemon mirrored the new one, frames QEMU handled under
  the old one can still be on their way: at most a full receive virtqueue per queue
  (`VIRTQUEUE_SIZE`) plus what the recorder had not read yet, so the span runs
  `VIRTQUEUE_SIZE` x queues records beyond the count at that moment. This bound is the
  test bed's reading of QEMU's pipeline, not a guarantee: a frame QEMU handled under the
  old configuration and recorded later would show as disagreed, never as agreed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from qemu.qmp import QMPClient

from vnetbackend.errors import VnetError
from vnetbackend.flowjoin import ConfigTimeline, FlowCheck, check_flows
from vnetbackend.guest_records import GuestRecord
from vnetbackend.rss import RssConfig
from vnetbackend.steering.reports import Report, ReportReader
from vnetbackend.testbed.bed import SETTLE_TIMEOUT, VnetGuest, same_rss, wait_mirrored
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.ordinary import (
    GUEST_V4,
    GUEST_V6,
    Traffic,
    address_both_ends,
    host_ping,
    listen_in_guest,
)
from vnetbackend.testbed.recorder import GuestRecorder

#: QEMU's default receive virtqueue size (entries): frames QEMU may have handled but the
#: guest not yet taken, per queue.
VIRTQUEUE_SIZE = 256


class TrafficEnded(VnetError):
    """The traffic ended before every RSS change could be made during it."""


@dataclass(frozen=True, slots=True)
class RssChange:
    """A guest command, run once the guest has recorded *after_records* frames (and the
    previous change's spans have closed)."""

    after_records: int
    describe: str
    apply: Callable[[GuestRss], Awaitable[None]]


@dataclass
class LiveRun:
    records: list[GuestRecord]
    reports: list[Report]
    kernel: ConfigTimeline
    guest: ConfigTimeline
    check: FlowCheck
    changes: list[str] = field(default_factory=list)
    recorder: dict[str, object] = field(default_factory=dict)


#: How often the report ring is emptied while traffic runs (it holds a few thousand).
DRAIN_PERIOD = 0.02


async def _collect(reader: ReportReader, into: list[Report]) -> None:
    while True:
        into.extend(reader.drain())
        await asyncio.sleep(DRAIN_PERIOD)


async def _moved_on(client: QMPClient, old: RssConfig) -> None:
    """Until the daemon holds a configuration other than *old* in its program, attached
    (waits on the daemon's events in between)."""
    async def moved() -> None:
        while True:
            status = await client.execute("query-vnet")
            steering = status["steering"]
            if steering["attached"] and not same_rss(steering["rss"], old):
                return
            await client.events.get()
    async with asyncio.timeout(SETTLE_TIMEOUT):
        await moved()


async def check_ordinary_traffic(vnet: VnetGuest, traffic: Traffic,
                                 changes: list[RssChange], after_last: int = 2000) -> LiveRun:
    """Run *traffic* through the changes and *after_last* records beyond; judge it all."""
    guest = vnet.guest
    await address_both_ends(guest.tap_name, guest.agent)
    await listen_in_guest(guest.agent, traffic.tcp_ports)
    config: RssConfig = await vnet.wait_mirrored()
    program = vnet.daemon.program
    reader = program.reports()
    sampling = program.report_every
    program.set_reports(1)
    reader.drain()
    reports: list[Report] = []
    recorder = GuestRecorder(guest.agent, guest.paths.records_socket)
    await recorder.start()
    kernel, guest_side = ConfigTimeline(config), ConfigTimeline(config)
    collecting = asyncio.create_task(_collect(reader, reports))
    done: list[str] = []
    try:
        stop = asyncio.Event()
        sending = asyncio.create_task(traffic.run(guest.agent, stop))
        guest_span_end = 0
        for change in changes:
            # A change starts once the previous one's spans have closed.
            wanted = max(change.after_records, guest_span_end)
            waiting = asyncio.ensure_future(recorder.wait_for(wanted, timeout=600))
            await asyncio.wait({waiting, sending}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                waiting.cancel()
                raise TrafficEnded(f"traffic ended ({sending.exception()!r}) after "
                                   f"{recorder.parser.records} records, before change "
                                   f"{change.describe!r} (due after {wanted})")
            waiting.result()
            reports.extend(reader.drain())
            report_start, record_start = len(reports), recorder.parser.records
            await change.apply(vnet.rss)
            await _moved_on(vnet.monitor, config)
            reports.extend(reader.drain())
            report_end = len(reports)
            guest_span_end = recorder.parser.records + VIRTQUEUE_SIZE * config.queues
            config = await vnet.rss.read_config()
            await wait_mirrored(vnet.monitor, config)
            kernel.change(report_start, report_end, config)
            guest_side.change(record_start, guest_span_end, config)
            done.append(change.describe)
        # As much traffic again after the last change's spans closed, then stop.
        await recorder.wait_for(guest_span_end + after_last, timeout=600)
        stop.set()
        await sending
        # One more round trip on each family: the guest has answered these, so it has
        # taken the frames before them on their queues.
        await host_ping(GUEST_V4, 3, 0.05)
        await host_ping(GUEST_V6, 3, 0.05)
        await recorder.wait_quiet(SETTLE_TIMEOUT)
        reports.extend(reader.drain())
        # What the guest records from now on has no report to find (reports go off).
        records = list(recorder.records)
    finally:
        collecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collecting
        program.set_reports(sampling)
        await recorder.stop()
    return LiveRun(records, reports, kernel, guest_side,
                   check_flows(records, reports, kernel, guest_side), done,
                   recorder.parser.summary())
