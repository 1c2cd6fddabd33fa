"""The mirror: keep the steering program in step with the guest's RSS configuration.

One direction only: a change notice (trace event or control-queue movement) ->
device-state snapshot -> validated `RssConfig` -> program maps -> attach on the tap.
QEMU 7.2 detaches any tap steering program on every RSS commit of a guest that asked for
hash reports, so the program is attached again after every snapshot. The snapshot runs
under QEMU's big lock, after the guest's control command (and QEMU's detach) completed,
so attaching after it cannot be undone by that same commit.

While the device's RSS is off the program is switched off and detached, so the tap
steers as it does without RSS. What cannot be read or validated keeps the previous
configuration in force and is published as an event; nothing is guessed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vnetbackend.qemu.device import DeviceStateReader, NetDevice
from vnetbackend.qemu.follower import RssTraceEvent
from vnetbackend.qemu.snapshot import RssState, SnapshotError
from vnetbackend.rss import InvalidRssConfig, RssConfig, rss_view
from vnetbackend.steering.program import SteeringError, SteeringProgram

log = logging.getLogger("vnetbackend.mirror")

EventSink = Callable[[str, dict[str, Any]], None]


@dataclass
class MirrorStatus:
    """What the mirror last did, for ``query-vnet``."""

    rss: RssConfig | None = None
    state: RssState | None = None
    attached: bool = False
    changes: int = 0
    syncs: int = 0
    refused: int = 0
    last_error: str | None = None
    last_latency_ms: float | None = None


class Mirror:
    """Reads the device's RSS state on each notice and makes the program follow it."""

    def __init__(self, reader: DeviceStateReader, device: NetDevice,
                 program: SteeringProgram, control_fd: int, queues: int,
                 publish: EventSink) -> None:
        self._reader = reader
        self._device = device
        self._program = program
        self._control_fd = control_fd
        self._queues = queues
        self._publish = publish
        self.status = MirrorStatus()

    async def sync(self, cause: RssTraceEvent | None = None) -> None:
        """Bring the program in line with the device now; *cause* dates the change."""
        self.status.syncs += 1
        try:
            state = await self._reader.read(self._device)
            config = state.to_config(self._queues) if state and state.enabled else None
        except (SnapshotError, InvalidRssConfig) as err:
            self._refuse(err, cause)
            return
        try:
            if config is None:
                self._program.disable()
                self._program.detach(self._control_fd)
            else:
                self._program.apply(config, redirect=state.redirect)
                self._program.attach(self._control_fd)
        except (SteeringError, OSError) as err:
            self.status.attached = False
            self.status.last_error = f"steering: {err}"
            log.error("cannot update the steering program: %s", err)
            self._publish("VNET_STEERING_FAILED", {"reason": str(err)})
            return
        self.status.attached = config is not None
        self._record(state, config, cause)

    def _refuse(self, err: Exception, cause: RssTraceEvent | None) -> None:
        self.status.refused += 1
        self.status.last_error = str(err)
        log.warning("guest RSS state refused, previous configuration stays: %s", err)
        self._publish("VNET_RSS_REFUSED", {
            "reason": str(err),
            "field": getattr(err, "field", None),
            "trace": cause.detail if cause else None,
        })

    def _record(self, state: RssState | None, config: RssConfig | None,
                cause: RssTraceEvent | None) -> None:
        latency = None
        if cause is not None and cause.at is not None:
            latency = round((time.time() - cause.at) * 1000, 3)
            self.status.last_latency_ms = latency
        changed = config != self.status.rss or state != self.status.state
        self.status.state, self.status.rss = state, config
        self.status.last_error = None
        if changed:
            self.status.changes += 1
            self._publish("VNET_RSS_CHANGED", {
                "enabled": config is not None,
                "populate-hash": bool(state and state.populate_hash),
                "redirect": bool(state and state.redirect),
                "rss": rss_view(config),
                "latency-ms": latency,
            })
        if config is not None:
            self._publish("VNET_STEERING_ATTACHED", {"latency-ms": latency})
