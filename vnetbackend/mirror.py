"""The mirror: keep the steering program in step with the guest's RSS configuration.

One direction only: a change notice (trace event or control-queue movement) ->
device-state snapshot -> validated `RssConfig` -> program maps -> attach on the tap.
QEMU 7.2 detaches any tap steering program on every RSS commit of a guest that asked for
hash reports, so the program is attached again after every snapshot. The snapshot runs
under QEMU's big lock, after the guest's control command (and QEMU's detach) completed,
so attaching after it cannot be undone by that same commit.

While the device's RSS is off the program is switched off and detached, so the tap
steers as it does without RSS. Nothing is guessed, and nothing QEMU, the guest or the tap
does makes `Mirror.sync` raise:

* a state QEMU holds but that is out of specification is refused
  (``VNET_RSS_REFUSED``, with the field and value): the configuration in force stays
  in the maps and the program is attached again, since QEMU detached it on the commit.
  Queue indices are checked against the queue pairs the device has active
  (``curr_queue_pairs``, the tap queues QEMU keeps attached and among which tun picks
  by the program's answer): the specification asks the driver to name only enabled
  queues in the indirection table, and "enabled" is read here as active in the device.
  QEMU 7.2 accepts a table naming queues beyond them and folds those frames onto the
  active ones;
* a snapshot that fails (QEMU not answering, an error reply, an unreadable stream) or
  a steering update that fails is ``VNET_SYNC_FAILED`` with the stage and the reason;
  the configuration in force stays, attached where the tap lets it, and the caller
  syncs again later (``VNET_SYNC_RECOVERED`` when that works).

Queues: the program is told how many queues the tap delivers among (the device's active
pairs) and answers the queue a frame really reaches (`SteeringProgram.apply`), also for a
configuration kept in force after a refusal while the active pairs changed. Where the
guest's table names queues the device does not serve, `vnetbackend.queue_account` says
how (``VNET_QUEUES_DIVERGED``, and ``queues`` in the status).

`MirrorStatus` says what the tap holds: ``attached`` turns false as soon as a notice
says QEMU has detached the program (`qemu_detached`) and true only once the mirror has
attached it again.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vnetbackend.qemu.device import DeviceStateReader, NetDevice
from vnetbackend.qemu.follower import RssTraceEvent
from vnetbackend.qemu.qmp import QemuCallFailed
from vnetbackend.qemu.snapshot import RssState, SnapshotError
from vnetbackend.queue_account import account
from vnetbackend.rss import InvalidRssConfig, RssConfig, rss_view
from vnetbackend.steering.program import SteeringError, SteeringProgram

log = logging.getLogger("vnetbackend.mirror")

EventSink = Callable[[str, dict[str, Any]], None]


@dataclass
class MirrorStatus:
    """What the mirror last did, for ``query-vnet``.

    ``rss`` is the configuration in force (the one the maps hold; None while RSS is
    off), ``state`` the device state it came from, ``active_queue_pairs`` the pairs the
    device served at the last snapshot. ``last_stages_ms`` says where the last good sync
    spent its time: ``trace-seen`` (QEMU's trace line to the sync's start), the
    reader's stages (`DeviceStateReader.last_stages_ms`), ``validate`` (the
    `RssConfig`, its Toeplitz tables included), ``maps`` (writing them) and ``attach``.
    ``refusal`` describes the last state refused, ``failure`` the last failed sync while
    it has not been recovered from.
    """

    rss: RssConfig | None = None
    state: RssState | None = None
    attached: bool = False
    changes: int = 0
    syncs: int = 0
    refused: int = 0
    failed: int = 0
    refusal: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    last_latency_ms: float | None = None
    last_stages_ms: dict[str, float] | None = None
    active_queue_pairs: int | None = None
    #: `vnetbackend.queue_account.account` at the last snapshot.
    queues: dict[str, Any] | None = None
    #: The queues the program's maps fold onto (the active pairs when they were written).
    delivered_queues: int | None = None


class Mirror:
    """Reads the device's RSS state on each notice and makes the program follow it."""

    def __init__(self, reader: DeviceStateReader, device: NetDevice,
                 program: SteeringProgram, control_fd: int, publish: EventSink,
                 max_queue_pairs: int | None = None) -> None:
        self._max_queue_pairs = max_queue_pairs
        self._reader = reader
        self._device = device
        self._program = program
        self._control_fd = control_fd
        self._publish = publish
        self.status = MirrorStatus()

    def qemu_detached(self) -> None:
        """QEMU committed a guest RSS command, and with it detached the program: attach
        it again at once with the configuration its maps hold, until the sync brings the
        device's. Frames in between keep their reports (under that configuration's
        generation) instead of going unreported and steered by tun's own choice; the
        guest's side is judged under that configuration or a later one anyway, since
        QEMU steers by what it holds when it takes a frame from the tap."""
        self.status.attached = False
        if self.status.rss is None:
            return
        try:
            self._program.attach(self._control_fd)
        except OSError as err:
            self.note_failure("steering", err)
            return
        self.status.attached = True

    async def sync(self, cause: RssTraceEvent | None = None) -> bool:
        """Bring the program in line with the device now; *cause* dates the change.

        True when the program holds what the device holds, or the configuration in force
        after a refusal; False when the sync failed and should be tried again. The
        program may be attached before QEMU's reply to the snapshot command arrives
        (see `DeviceStateReader`); a sync is only done once that reply is a success and
        the whole stream holds the state the program was given.
        """
        self.status.syncs += 1
        # No collection on the mirror's path: one of the collector's passes costs
        # ~0.5-2 ms here (measured), so it waits until the program is attached (or, with
        # a QEMU that does not answer, at most the QMP time limit).
        collecting = gc.isenabled()
        gc.disable()
        try:
            done = await self._sync(cause)
        finally:
            if collecting:
                gc.enable()
        try:
            await self._reader.confirm()
        except (QemuCallFailed, SnapshotError) as err:
            self.note_failure("snapshot", err)
            return False
        return done

    async def _sync(self, cause: RssTraceEvent | None) -> bool:
        started = time.time()
        try:
            device = await self._reader.read(self._device)
        except (QemuCallFailed, SnapshotError) as err:
            self.note_failure("snapshot", err)
            return False
        state = device.rss
        self.status.active_queue_pairs = device.curr_queue_pairs
        self._account(state, device.curr_queue_pairs)
        validated = time.perf_counter()
        try:
            config = (state.to_config(device.curr_queue_pairs) if state and state.enabled
                      else None)
        except InvalidRssConfig as err:
            self._refuse(err, cause)
            return self._keep_in_force(device.curr_queue_pairs)
        stages = {**self._reader.last_stages_ms,
                  "validate": _ms(time.perf_counter() - validated)}
        if cause is not None and cause.at is not None:
            stages = {"trace-seen": _ms(started - cause.at), **stages}
        try:
            mapped = time.perf_counter()
            if config is None:
                self._program.disable()
            else:
                self._program.apply(config, redirect=state.redirect,
                                    delivered_queues=device.curr_queue_pairs)
            attached = time.perf_counter()
            stages["maps"] = _ms(attached - mapped)
            if config is None:
                self._program.detach(self._control_fd)
            else:
                self._program.attach(self._control_fd)
            stages["attach"] = _ms(time.perf_counter() - attached)
        except (SteeringError, OSError) as err:
            self.note_failure("steering", err)
            return False
        self.status.attached = config is not None
        self.status.delivered_queues = device.curr_queue_pairs if config else None
        self.status.last_stages_ms = stages
        self._recovered()
        self._record(state, config, cause)
        return True

    def _keep_in_force(self, active_pairs: int) -> bool:
        """Attach the program again with the configuration the maps still hold, folded
        onto the queues the tap now delivers among if those changed."""
        if self.status.rss is None:
            return True
        try:
            if self.status.delivered_queues != active_pairs:
                self._program.apply(self.status.rss,
                                    redirect=bool(self.status.state and self.status.state.redirect),
                                    delivered_queues=active_pairs)
                self.status.delivered_queues = active_pairs
            self._program.attach(self._control_fd)
        except (SteeringError, OSError) as err:
            self.note_failure("steering", err)
            return False
        self.status.attached = True
        self._recovered()
        return True

    def note_failure(self, stage: str, err: Exception) -> None:
        """A query at *stage* failed: an event now, ``VNET_SYNC_RECOVERED`` once a sync
        works again."""
        self.status.failed += 1
        self.status.failure = {"stage": stage, "reason": str(err)}
        log.warning("sync failed at the %s, the configuration in force stays: %s", stage, err)
        self._publish("VNET_SYNC_FAILED", {
            "stage": stage, "reason": str(err), "in-force": rss_view(self.status.rss),
            "attached": self.status.attached,
        })

    def _account(self, state: RssState | None, active_pairs: int) -> None:
        """Keep the queue account; a new divergence is ``VNET_QUEUES_DIVERGED``."""
        found = account(state, active_pairs, self._max_queue_pairs)
        if found["causes"] and found != self.status.queues:
            log.warning("the guest's table names queues the device does not serve: %s",
                        ", ".join(found["causes"]))
            self._publish("VNET_QUEUES_DIVERGED", found)
        self.status.queues = found

    def _recovered(self) -> None:
        if self.status.failure is not None:
            self._publish("VNET_SYNC_RECOVERED", {"after": self.status.failure})
            self.status.failure = None

    def _refuse(self, err: InvalidRssConfig, cause: RssTraceEvent | None) -> None:
        self.status.refused += 1
        self.status.refusal = {"reason": str(err), "field": err.field,
                               "value": _json_value(err.value)}
        log.warning("guest RSS state refused, the configuration in force stays: %s", err)
        self._publish("VNET_RSS_REFUSED", {
            **self.status.refusal,
            "in-force": rss_view(self.status.rss),
            "trace": cause.detail if cause else None,
        })

    def _record(self, state: RssState | None, config: RssConfig | None,
                cause: RssTraceEvent | None) -> None:
        latency = None
        if cause is not None and cause.at is not None:
            latency = _ms(time.time() - cause.at)
            self.status.last_latency_ms = latency
        changed = config != self.status.rss or state != self.status.state
        self.status.state, self.status.rss = state, config
        if changed:
            self.status.changes += 1
            self._publish("VNET_RSS_CHANGED", {
                "enabled": config is not None,
                "populate-hash": bool(state and state.populate_hash),
                "redirect": bool(state and state.redirect),
                "rss": rss_view(config),
                "latency-ms": latency,
                "stages-ms": self.status.last_stages_ms,
            })
        if config is not None:
            self._publish("VNET_STEERING_ATTACHED", {"latency-ms": latency})


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _json_value(value: object) -> object:
    """*value* as a JSON-ready value for an event (what cannot be is given as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        return list(value)
    return repr(value)
