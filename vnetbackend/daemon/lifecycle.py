"""The daemon: one QEMU, one tap, the steering program on it, the mirror and the monitor.

`Daemon.serve` runs until one of these ends it, and says which through its exit status:

* `request_stop` (a ``quit`` on the monitor, SIGTERM/SIGINT to the process, the VM
  removed from a daemon serving many): clean shutdown, status 0;
* QEMU exits or its QMP connection drops: status `EXIT_QEMU_GONE`;
* the tap is deleted: status `EXIT_TAP_GONE`;
* the daemon itself cannot go on (a fault in its own code): status `EXIT_FAILED`, with
  the reason.

On the way out the program is detached from the tap (where the tap still exists), and
what the caller registered as cleanup (stopping a QEMU it launched, deleting a tap it
created) runs. Everything QEMU or the guest can cause (a refused guest configuration, a
failed or timed-out QMP call, a QEMU stopped and resumed, a guest that declines RSS) is
published as an event and the daemon keeps going: a failed sync is tried again, with a
growing delay, until QEMU answers.

Trace lines that QEMU stamped before a snapshot paused the VM are covered by that
snapshot (see `DeviceStateReader.covers_until`), so the lines of one guest command cost
one sync, also when the second is read while the snapshot runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qemu.qmp import QMPClient, Runstate

from vnetbackend.checker import HashChecker
from vnetbackend.daemon.live_check import Hooks, LiveCheck
from vnetbackend.kernel_check import KernelCheck
from vnetbackend.link_watch import RemovalWatch
from vnetbackend.mirror import Mirror
from vnetbackend.qemu.departures import departures_for
from vnetbackend.qemu.device import DeviceStateReader, NetDevice
from vnetbackend.qemu.features import WANTED_FEATURES, VirtioFeatures, query_features
from vnetbackend.qemu.follower import RssTraceEvent, TraceFollower, control_queue_commits
from vnetbackend.qemu.qmp import QemuCallFailed
from vnetbackend.rss import RssConfig
from vnetbackend.steering.program import SteeringProgram

log = logging.getLogger("vnetbackend.daemon")

EXIT_OK = 0
EXIT_QEMU_GONE = 3
EXIT_TAP_GONE = 4
EXIT_FAILED = 5
#: How often the device's negotiated features are read again (a guest may reset it).
FEATURE_POLL_S = 0.5
#: Delays before a failed sync is tried again: doubling from the first to the last.
RETRY_FIRST_S = 0.25
RETRY_LAST_S = 4.0
#: How long after QEMU detached the program a guest record without a report is said to
#: be near that detach: frames reach the guest's recorder well within it on a TCG guest.
DETACH_RECENT_S = 2.0


class Ending(enum.Enum):
    """Why `Daemon.serve` returned."""

    REQUESTED = EXIT_OK
    QEMU_GONE = EXIT_QEMU_GONE
    TAP_GONE = EXIT_TAP_GONE
    FAILED = EXIT_FAILED


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
    kernel_check: KernelCheck = field(init=False)
    #: Report records read from the program's rings (and judged) since the start.
    reports_read: int = 0
    #: The guest's side of the check (`vnet-check-start` with a records port), the last
    #: one until another starts.
    live: LiveCheck | None = None
    ending: Ending | None = None
    ending_reason: str = ""
    negotiated: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    mirror: Mirror = field(init=False)
    #: A sync is owed (a notice came, or the last sync failed); its first cause, and the
    #: time of its newest (infinite when one had no time).
    _owed: asyncio.Event = field(default_factory=asyncio.Event)
    _owed_cause: RssTraceEvent | None = None
    _owed_newest: float = float("-inf")
    #: When QEMU last detached the program (time.monotonic()).
    _last_detach: float = float("-inf")
    #: Set while no sync is owed and the last one succeeded.
    _in_sync: asyncio.Event = field(default_factory=asyncio.Event)
    #: Wall-clock time before which QEMU's trace lines are covered by a snapshot taken.
    _covered_until: float = float("-inf")

    def __post_init__(self) -> None:
        # The daemon hears QEMU's events through listeners of its own (the snapshot's
        # STOP/RESUME); the client's default listener would keep every one forever.
        self.qmp.events.event_filter = _no_event
        self.mirror = Mirror(self.state_reader, self.device, self.program, self.control_fd,
                             self.publish, max_queue_pairs=self.queues)
        self.checker = HashChecker(self.publish,
                                   departures_for(self.state_reader.qemu_version))
        self.kernel_check = KernelCheck(self.program.generation_of, self.publish)

    def request_stop(self, reason: str = "requested") -> None:
        """Ask `serve` to shut down cleanly."""
        self.ending_reason = reason
        self._stop.set()

    async def serve(self) -> Ending:
        """Mirror the guest until something ends it; detach the program on the way out.
        Signals are the caller's: a process serving many devices stops them all."""
        # What exists now (bcc, the program, the clients) lives as long as the daemon:
        # the collector's full passes skip it, which keeps them short on the mirror's path.
        gc.freeze()
        removal = RemovalWatch(self.tap_name)
        watchers = {
            asyncio.create_task(self._stop.wait()): Ending.REQUESTED,
            asyncio.create_task(removal.wait()): Ending.TAP_GONE,
            asyncio.create_task(self._qemu_gone()): Ending.QEMU_GONE,
        }
        workers = [asyncio.create_task(self._follow()),
                   asyncio.create_task(self._sync_when_owed()),
                   asyncio.create_task(self._watch_negotiation()),
                   asyncio.create_task(self._read_reports())]
        try:
            done, _ = await asyncio.wait([*watchers, *workers],
                                         return_when=asyncio.FIRST_COMPLETED)
            first = next((t for t in watchers if t in done), None)
            if first is None:  # a worker only ends by a fault of the daemon's own
                failed = next(t for t in workers if t in done)
                self.ending = Ending.FAILED
                self.ending_reason = f"the daemon failed: {_describe(failed)}"
            elif (ending := watchers[first]) is Ending.QEMU_GONE:
                self.ending, self.ending_reason = ending, first.result()
            elif ending is Ending.TAP_GONE:
                self.ending, self.ending_reason = ending, f"tap {self.tap_name} was deleted"
            else:
                self.ending = ending
        finally:
            for task in [*watchers, *workers]:
                task.cancel()
            await asyncio.gather(*watchers, *workers, return_exceptions=True)
            removal.close()
            if self.live is not None:
                self.live.close()
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

    def set_reports(self, every: int) -> None:
        """Report one frame in *every* (0: off); what the rings hold is judged first."""
        self.program.reports().take_batch()
        self.program.set_reports(every)

    def _judge_reports(self, batch: np.ndarray) -> None:
        self.reports_read += len(batch)
        self.kernel_check.judge(batch)
        if self.live is not None and not self.live.stopped:
            self.live.add_reports(batch)

    async def start_live_check(self, records_port: Path, every: int) -> LiveCheck:
        """Join the guest's records from the unix socket *records_port* with the reports
        (one frame in *every*); `OSError`/`TimeoutError` if the port cannot be reached."""
        check = LiveCheck(records_port, Hooks(
            read_reports=self._read_reports_now, request_sync=lambda: self._owe_sync(None),
            in_sync=self._in_sync.wait, configs_since=self._configs_since,
            active_pairs=lambda: self.mirror.status.active_queue_pairs,
            rss_changes=lambda: self.mirror.status.changes,
            detached_recently=self._detached_recently, publish=self.publish),
            self.checker.departures, sampled=every > 1)
        await check.start()
        self.live = check
        return check

    def _detached_recently(self) -> bool:
        return time.monotonic() - self._last_detach < DETACH_RECENT_S

    def _read_reports_now(self) -> None:
        self.program.reports().take_batch()  # through `_judge_reports`

    def _configs_since(self, generation: int) -> list[RssConfig | None]:
        """The configurations of *generation* and every later one still kept (None where
        RSS was off)."""
        found = []
        for number in range(generation, self.program.generation + 1):
            kept = self.program.generation_of(number)
            if kept is not None:
                found.append(kept.state.config if kept.state.enabled else None)
        return found

    async def _read_reports(self) -> None:
        """Read the report rings whenever the program's bell rings (a report landed in a
        ring the daemon had emptied), for as long as the daemon runs, and judge every
        report (`KernelCheck`): with reports off the bell never rings and this costs
        nothing. Each read takes every CPU's ring in one batch."""
        reader = self.program.reports()
        reader.on_batch = self._judge_reports
        await reader.pump()

    async def _qemu_gone(self) -> str:
        if self.qemu_exited is not None:
            return await self.qemu_exited
        while self.qmp.runstate is Runstate.RUNNING:
            await self.qmp.runstate_changed()
        return "the QMP connection to QEMU closed"

    async def _follow(self) -> None:
        """Owe a sync now, then on every change QEMU reports (following first, so that
        no change between the first sync and the start of following is missed)."""
        if self.trace_log is None:
            await self._follow_control_queue()
            return
        async with TraceFollower(self.trace_log) as events:
            self._owe_sync(None)
            async for event in events:
                if event.kind == "error":
                    self.publish("VNET_GUEST_RSS_REJECTED", {"qemu-says": event.detail})
                else:
                    self._notice(event)

    async def _follow_control_queue(self) -> None:
        """Owe a sync when polling starts and whenever the control queue moves; a failed
        poll is an event, and polling starts again after the retry delay."""
        retry = _Backoff()
        while True:
            try:
                commits = control_queue_commits(self.qmp, self.device.virtio_path,
                                                2 * self.queues)
                await anext(commits)  # the index as polling starts
                self._owe_sync(None)
                retry.reset()
                async for _ in commits:
                    self._notice(None)
            except QemuCallFailed as err:
                self.mirror.note_failure("control-queue", err)
                await retry.wait()

    def _notice(self, event: RssTraceEvent | None) -> None:
        """A guest command was committed: QEMU has detached the program (the mirror
        attaches it again at once, maps as they are) and a sync is owed, unless a
        snapshot taken after QEMU wrote *event* covers it: one synced already, or the one
        of the sync under way once QEMU has paused the VM for it (that sync attaches the
        program after its snapshot, so *event* changes nothing more)."""
        self.mirror.qemu_detached()
        self._last_detach = time.monotonic()
        covered = max(self._covered_until, self.state_reader.covers_until)
        if event is not None and event.at is not None and event.at <= covered:
            return
        self._owe_sync(event)

    def _owe_sync(self, cause: RssTraceEvent | None) -> None:
        """Have the device read again (the first cause dates the change)."""
        at = cause.at if cause is not None and cause.at is not None else float("inf")
        self._in_sync.clear()
        if not self._owed.is_set():
            self._owed_cause, self._owed_newest = cause, at
            self._owed.set()
        else:
            self._owed_newest = max(self._owed_newest, at)

    async def _sync_when_owed(self) -> None:
        """Sync each time one is owed; after a failure, again after a growing delay."""
        retry = _Backoff()
        while True:
            await self._owed.wait()
            self._owed.clear()
            cause, self._owed_cause = self._owed_cause, None
            self._covered_until = time.time()
            synced = await self.mirror.sync(cause)
            if synced:
                self._covered_until = max(self._covered_until, self.state_reader.covers_until)
                if self._owed.is_set() and self._owed_newest <= self._covered_until:
                    self._owed.clear()  # what QEMU wrote while the snapshot ran is in it
            # A control command means the driver is up: have its features current too.
            if synced and await self._read_features():
                retry.reset()
                if not self._owed.is_set():
                    self._in_sync.set()
                continue
            await retry.wait()
            self._owe_sync(cause)

    async def _watch_negotiation(self) -> None:
        """Read the features every `FEATURE_POLL_S`; once QEMU answers again after a
        failed read, read the device again too (whatever happened in between)."""
        failing = False
        while True:
            answered = await self._read_features()
            if answered and failing:
                self._owe_sync(None)
            failing = not answered
            await asyncio.sleep(FEATURE_POLL_S)

    async def _read_features(self) -> bool:
        """Read the device's features now; False (and an event) if QEMU did not answer."""
        try:
            features = await query_features(self.qmp, self.device)
        except QemuCallFailed as err:
            self.mirror.note_failure("features", err)
            return False
        self._note_features(features)
        return True

    def _note_features(self, features: VirtioFeatures) -> None:
        """Keep *features*; a driver that finished negotiating is ``VNET_NEGOTIATED``, one
        that lost it (the device was reset, e.g. the driver unbound) ``VNET_DRIVER_RESET``.
        """
        before = self.negotiation
        now = self.negotiation = features
        if now.features_ok:
            self.negotiated.set()
        else:
            self.negotiated.clear()
            if before.features_ok:
                self.publish("VNET_DRIVER_RESET", now.view())
        if now.features_ok and (not before.features_ok or now.negotiated != before.negotiated):
            view = now.view()
            if set(WANTED_FEATURES) - now.negotiated:
                log.warning("the guest did not take %s",
                            ", ".join(sorted(set(WANTED_FEATURES) - now.negotiated)))
            self.publish("VNET_NEGOTIATED", view)


class _Backoff:
    """The delay before trying again: `RETRY_FIRST_S`, doubling to `RETRY_LAST_S` with
    each failure in a row, back to the first after a success (`reset`)."""

    def __init__(self) -> None:
        self._delay = RETRY_FIRST_S

    def reset(self) -> None:
        self._delay = RETRY_FIRST_S

    async def wait(self) -> None:
        await asyncio.sleep(self._delay)
        self._delay = min(2 * self._delay, RETRY_LAST_S)


def _no_event(_event: object) -> bool:
    return False


def _describe(task: asyncio.Task[Any]) -> str:
    """How a worker task ended, in words, with its traceback in the log."""
    if task.cancelled():
        return "a worker was cancelled"
    err = task.exception()
    if err is None:
        return "a worker returned"
    log.error("worker failed", exc_info=err)
    return f"{type(err).__name__}: {err}"
