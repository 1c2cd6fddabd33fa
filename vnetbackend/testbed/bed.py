"""A test guest under the daemon: the unit the pytest plugin's ``vnet_guest`` hands out.

`guest_under_daemon` boots the test guest (its own tap, QEMU with RSS and hash reports
offered), attaches the daemon in-process to that QEMU, serves it, and connects a client
to the daemon's monitor. The result, `VnetGuest`, carries the guest's agent and ethtool
(`GuestRss`), an observer of what its driver receives, the daemon and the monitor, and
the two checks a test needs: `VnetGuest.wait_mirrored` (the daemon holds the guest's
configuration) and `VnetGuest.check_traffic` (a traffic mix through the tap, judged
three ways by the daemon's checker).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from vnetbackend.checker import Verdict
from vnetbackend.daemon import launch
from vnetbackend.daemon.lifecycle import Daemon
from vnetbackend.rss import RssConfig
from vnetbackend.steering.reports import collect_reports
from vnetbackend.testbed.agent import GuestAgent
from vnetbackend.testbed.batch import observe_batch
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import Guest, GuestOptions, boot_guest
from vnetbackend.testbed.injector import silence_host_stack
from vnetbackend.testbed.observer import RxObserver
from vnetbackend.testbed.platform import Platform
from vnetbackend.testbed.traffic import make_batch

#: How long the daemon may take to mirror a guest command, or a report to arrive.
SETTLE_TIMEOUT = 30.0


def same_rss(view: dict[str, Any] | None, config: RssConfig) -> bool:
    """Whether a query-vnet RSS view holds *config*'s key, table and hash types."""
    return view is not None and (view["key"], view["indirection-table"], view["hash-types"]) == (
        config.key.hex(), list(config.indirection_table), int(config.hash_types))


async def wait_mirrored(client: QMPClient, config: RssConfig, vm_id: str | None = None,
                        timeout: float = SETTLE_TIMEOUT) -> dict[str, Any]:
    """``query-vnet`` once the daemon's snapshot and maps both hold *config* (those of VM
    *vm_id*, for a daemon serving many); waits on the daemon's events in between."""
    async def settled() -> dict[str, Any]:
        while True:
            status: dict[str, Any] = await client.execute(
                "query-vnet", {"id": vm_id} if vm_id else None)
            if same_rss(status["rss"], config) and same_rss(status["steering"]["rss"], config):
                return status
            await client.events.get()
    async with asyncio.timeout(timeout):
        return await settled()


@dataclass
class VnetGuest:
    """A booted test guest with the daemon attached to its QEMU (see the module)."""

    guest: Guest
    rss: GuestRss
    observer: RxObserver
    daemon: Daemon
    monitor: QMPClient

    async def wait_mirrored(self) -> RssConfig:
        """The guest's RSS configuration, once the daemon has mirrored it into the
        steering program (`SETTLE_TIMEOUT`)."""
        config = await self.rss.read_config()
        await wait_mirrored(self.monitor, config)
        return config

    async def check_traffic(self, per_class: int = 1, seed: int = 0) -> list[Verdict]:
        """Send the traffic mix (every frame class, *per_class* frames each) into the tap
        and judge each frame by the daemon's checker: the specification's answer, the
        steering program's report and the guest's record. Waits for the mirror first."""
        config = await self.wait_mirrored()
        probes = make_batch(self.guest.mac, per_class=per_class, seed=seed)
        reader = self.daemon.program.reports()
        sampling = self.daemon.program.report_every
        self.daemon.program.set_reports(1)
        try:
            reader.drain()
            records = await observe_batch(self.guest.tap_name, self.observer, probes)
            reports = await collect_reports(reader, [len(p.frame) for p in probes],
                                            SETTLE_TIMEOUT)
        finally:
            self.daemon.program.set_reports(sampling)
        return self.daemon.checker.check(config, [(p.frame_class, p.frame) for p in probes],
                                         reports, records)


async def _prepare(agent: GuestAgent) -> None:
    """rxhash on and the observer started, as part of the boot: resizing the trace buffer
    runs work on every CPU of the guest, so a vCPU that QEMU stopped serving shows here."""
    await GuestRss(agent).enable_rxhash()
    await RxObserver(agent).start()


@contextlib.asynccontextmanager
async def guest_under_daemon(work_dir: Path, *, queues: int = 4,
                             platform: Platform | None = None, cpus: int | None = None,
                             rss: bool = True, use_trace: bool = True,
                             ) -> AsyncIterator[VnetGuest]:
    """Boot the test guest on *platform* with *queues* queue pairs (RSS offered unless
    *rss* is False; hash reports always), rxhash on and its observer started; attach the
    daemon (following QEMU's trace events, or with *use_trace* False the control queue)
    and serve it; connect a client to its monitor in *work_dir*. Everything is ended
    after, whatever happens."""
    qemu, image = await (platform or Platform()).resolve()
    options = GuestOptions(queues=queues, cpus=cpus, rss=rss, image=image, qemu=qemu.binary,
                           extra_args=("-msg", "timestamp=on"))
    async with boot_guest(options, prepare=_prepare) as guest:
        silence_host_stack(guest.tap_name)
        guest_rss = GuestRss(guest.agent)
        observer = RxObserver(guest.agent)
        monitor_path = work_dir / "monitor.sock"
        async with launch.attached(guest.qmp_socket, guest.tap_name, work_dir / "run",
                                   monitor_path, use_trace=use_trace) as daemon:
            serving = asyncio.create_task(daemon.serve())
            client = QMPClient("vnet-guest")
            try:
                await client.connect(str(monitor_path))
                yield VnetGuest(guest, guest_rss, observer, daemon, client)
            finally:
                daemon.request_stop("test over")
                await serving
                with contextlib.suppress(EOFError, ConnectionError):
                    await client.disconnect()
