"""A real guest with the daemon attached in-process, for the daemon's guest tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from tests.guest.conftest import need_guest
from tests.prereq import need_bcc
from vnetbackend.daemon import launch
from vnetbackend.rss import RssConfig
from vnetbackend.steering.reports import Report
from vnetbackend.testbed.batch import check_batch, report
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import Guest, GuestOptions, boot_guest
from vnetbackend.testbed.injector import silence_host_stack
from vnetbackend.testbed.observer import RxObserver
from vnetbackend.testbed.traffic import make_batch

EVENT_TIMEOUT = 30.0


def same_rss(view: dict[str, Any] | None, config: RssConfig) -> bool:
    """Whether a query-vnet RSS view holds *config*'s key, table and hash types."""
    return view is not None and (view["key"], view["indirection-table"], view["hash-types"]) == (
        config.key.hex(), list(config.indirection_table), int(config.hash_types))


async def wait_mirrored(client: QMPClient, guest_config: RssConfig) -> dict[str, Any]:
    """Wait (on the daemon's events) until its maps and snapshot equal *guest_config*."""
    async def settled() -> dict[str, Any]:
        while True:
            status = await client.execute("query-vnet")
            if same_rss(status["rss"], guest_config) and same_rss(status["steering"]["rss"],
                                                                   guest_config):
                return status
            await client.events.get()
    return await asyncio.wait_for(settled(), EVENT_TIMEOUT)


@dataclass
class Attached:
    guest: Guest
    rss: GuestRss
    observer: RxObserver
    daemon: Any
    monitor: QMPClient


@contextlib.asynccontextmanager
async def attached_guest(tmp_path: Path, use_trace: bool = True, cpus: int | None = None,
                         rss: bool = True) -> AsyncIterator[Attached]:
    """A 4-pair guest with rxhash on and its observer started, the daemon attached to its
    QEMU and serving, and a client on the daemon's monitor. *rss* False offers hash
    reports without RSS."""
    need_guest()
    need_bcc()
    options = GuestOptions(queues=4, cpus=cpus, rss=rss,
                           extra_args=("-msg", "timestamp=on"))
    async with boot_guest(options) as guest:
        silence_host_stack(guest.tap_name)
        rss = GuestRss(guest.agent)
        await rss.enable_rxhash()
        observer = RxObserver(guest.agent)
        await observer.start()
        monitor_path = tmp_path / "monitor.sock"
        async with launch.attached(guest.qmp_socket, guest.tap_name, tmp_path / "run",
                                   monitor_path, use_trace=use_trace) as daemon:
            serving = asyncio.create_task(daemon.serve())
            client = QMPClient("test")
            await client.connect(str(monitor_path))
            try:
                yield Attached(guest, rss, observer, daemon, client)
            finally:
                daemon.request_stop("test over")
                await serving
                await client.disconnect()


async def check_traffic(bed: Attached, config: RssConfig, seed: int) -> None:
    """Inject a traffic mix: the program's reports must equal the reference model, and the
    guest must see what the model (or a documented QEMU departure) says."""
    probes = make_batch(bed.guest.mac, per_class=1, seed=seed)
    reader = bed.daemon.program.reports()
    reader.drain()
    failed = await check_batch(bed.guest.tap_name, bed.observer, config, probes)
    assert not failed, report(config, failed)
    reports: dict[int, Report] = {}
    while len(reports) < len(probes):
        found = await reader.next(timeout=EVENT_TIMEOUT)
        reports[found.frame_len] = found
    for probe in probes:
        expected = config.steer(probe.frame)
        found = reports[len(probe.frame)]
        assert (found.hash, found.report, found.queue) == (
            expected.hash, expected.report, expected.queue), (
            f"{probe.frame_class}: {probe.frame.hex()}")


async def next_event(client: QMPClient, name: str) -> dict[str, Any]:
    """The next event *name* on the daemon's monitor (others are passed over)."""
    async def wanted() -> dict[str, Any]:
        while (event := await client.events.get())["event"] != name:
            pass
        return event
    return await asyncio.wait_for(wanted(), EVENT_TIMEOUT)
