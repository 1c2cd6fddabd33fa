"""The daemon: one QEMU, one tap, the steering program on it, the mirror and the monitor.

`Daemon.serve` runs until one of these ends it, and says which through its exit status:

* a ``quit`` on the monitor or SIGTERM/SIGINT: clean shutdown, status 0;
* QEMU exits or its QMP connection drops: status `EXIT_QEMU_GONE`;
* the tap is deleted: status `EXIT_TAP_GONE`.

On the way out the program is detached from the tap (where the tap still exists), and
what the caller registered as cleanup (stopping a QEMU it launched, deleting a tap it
created) runs. Everything else (a refused guest configuration, a failed snapshot, a
guest that declines RSS) is published as an event and the daemon keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, Runstate

from vnetbackend.checker import HashChecker
from vnetbackend.link_watch import RemovalWatch
from vnetbackend.mirror import Mirror
from vnetbackend.qemu.device import DeviceStateReader, NetDevice
from vnetbackend.qemu.features import WANTED_FEATURES, VirtioFeatures, query_features
from vnetbackend.qemu.follower import RssTraceEvent, TraceFollower, control_queue_commits
from vnetbackend.steering.program import SteeringProgram

log = logging.getLogger("vnetbackend.daemon")

EXIT_OK = 0
EXIT_QEMU_GONE = 3
EXIT_TAP_GONE = 4
#: How often the device's negotiated features are read again (a guest may reset it).
FEATURE_POLL_S = 0.5


class Ending(enum.Enum):
    """Why `Daemon.serve` returned."""

    REQUESTED = EXIT_OK
    QEMU_GONE = EXIT_QEMU_GONE
    TAP_GONE = EXIT_TAP_GONE


@dataclass
class Daemon:
    """The running parts for one device. Build with `Daemon.start`; run with `serve`.

    *trace_log* is the file QEMU writes its RSS trace events to; None means trace events
    are unavailable and the control queue's index is polled instead. ``negotiated`` is
    set while the guest's driver has completed feature negotiation.
    """

    qmp: QMPClient
    device: NetDevice
    state_reader: DeviceStateReader
    tap_name: str
    queues: int
    program: SteeringProgram
    control_fd: int
    trace_log: Path | None
    publish: Callable[[str, dict[str, Any]], None]
    qemu_exited: Awaitable[str] | None = None
    qemu_pid: int | None = None
    negotiation: VirtioFeatures = field(default_factory=VirtioFeatures)
    checker: HashChecker = field(init=False)
    ending: Ending | None = None
    ending_reason: str = ""
    negotiated: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    mirror: Mirror = field(init=False)

    def __post_init__(self) -> None:
        self.mirror = Mirror(self.state_reader, self.device, self.program, self.control_fd,
                             self.queues, self.publish)
        self.checker = HashChecker(self.publish)

    def request_stop(self, reason: str = "requested") -> None:
        """Ask `serve` to shut down cleanly."""
        self.ending_reason = reason
        self._stop.set()

    async def serve(self) -> Ending:
        """Mirror the guest until something ends it; detach the program on the way out."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        removal = RemovalWatch(self.tap_name)
        watchers = {
            asyncio.create_task(self._stop.wait()): Ending.REQUESTED,
            asyncio.create_task(removal.wait()): Ending.TAP_GONE,
            asyncio.create_task(self._qemu_gone()): Ending.QEMU_GONE,
        }
        workers = [asyncio.create_task(self._follow()),
                   asyncio.create_task(self._watch_negotiation())]
        try:
            done, _ = await asyncio.wait([*watchers, *workers],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task in workers:  # a worker only ends by failing
                    task.result()
            first = next(t for t in watchers if t in done)
            self.ending = watchers[first]
            if self.ending is Ending.QEMU_GONE:
                self.ending_reason = first.result()
            elif self.ending is Ending.TAP_GONE:
                self.ending_reason = f"tap {self.tap_name} was deleted"
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            for task in [*watchers, *workers]:
                task.cancel()
            await asyncio.gather(*watchers, *workers, return_exceptions=True)
            removal.close()
            self._detach()
        log.log(logging.INFO if self.ending is Ending.REQUESTED else logging.ERROR,
                "stopping: %s", self.ending_reason)
        self.publish("VNET_SHUTDOWN", {"reason": self.ending_reason,
                                       "ending": self.ending.name.lower()})
        return self.ending

    def _detach(self) -> None:
        with contextlib.suppress(OSError):
            self.program.detach(self.control_fd)
        os.close(self.control_fd)

    async def _qemu_gone(self) -> str:
        if self.qemu_exited is not None:
            return await self.qemu_exited
        while self.qmp.runstate is Runstate.RUNNING:
            await self.qmp.runstate_changed()
        return "the QMP connection to QEMU closed"

    async def _follow(self) -> None:
        """Mirror now, then again on every change QEMU reports."""
        if self.trace_log is None:
            await self.mirror.sync()
            async for _ in control_queue_commits(self.qmp, self.device.virtio_path,
                                                 2 * self.queues):
                await self._change_noticed(None)
            return
        async with TraceFollower(self.trace_log) as events:
            await self.mirror.sync()
            async for event in events:
                if event.kind == "error":
                    self.publish("VNET_GUEST_RSS_REJECTED", {"qemu-says": event.detail})
                    continue
                await self._change_noticed(event)

    async def _change_noticed(self, event: RssTraceEvent | None) -> None:
        await self.mirror.sync(event)
        # A control command means the driver is up: have its features current too.
        self._note_features(await query_features(self.qmp, self.device))

    async def _watch_negotiation(self) -> None:
        while True:
            features = await query_features(self.qmp, self.device)
            self._note_features(features)
            await asyncio.sleep(FEATURE_POLL_S)

    def _note_features(self, features: VirtioFeatures) -> None:
        before = self.negotiation
        now = self.negotiation = features
        if now.features_ok:
            self.negotiated.set()
        else:
            self.negotiated.clear()
        if now.features_ok and (not before.features_ok or now.negotiated != before.negotiated):
            view = now.view()
            if set(WANTED_FEATURES) - now.negotiated:
                log.warning("the guest did not take %s",
                            ", ".join(sorted(set(WANTED_FEATURES) - now.negotiated)))
            self.publish("VNET_NEGOTIATED", view)
