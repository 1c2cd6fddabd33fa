"""The daemon's commands on its own QMP monitor.

=================  ==========================================================
``query-vnet``     offered and negotiated features, the guest's RSS configuration
                   as last read, the one the program's maps hold, attach
                   state, counters
``vnet-set-reports``  ``{enable: bool, every?: int}``: per-packet reports on/off,
                   one frame in ``every``
``query-vnet-check``  the three-way hash check's totals and per-class tallies
``quit``           shut the daemon down cleanly
=================  ==========================================================

Events: ``VNET_NEGOTIATED``, ``VNET_DRIVER_RESET``, ``VNET_RSS_CHANGED``,
``VNET_STEERING_ATTACHED``, ``VNET_RSS_REFUSED``, ``VNET_GUEST_RSS_REJECTED``,
``VNET_SYNC_FAILED``, ``VNET_SYNC_RECOVERED``, ``VNET_HASH_MISMATCH``, ``VNET_SHUTDOWN``.
"""

from __future__ import annotations

from typing import Any

from vnetbackend import __version__
from vnetbackend.daemon.lifecycle import Daemon
from vnetbackend.daemon.qmp_server import Param, QmpServer, VersionInfo
from vnetbackend.rss import rss_view
from vnetbackend.steering.program import SteeringError

MAX_REPORT_EVERY = 0xFFFFFFFF


def version_info() -> VersionInfo:
    major, minor, micro = (int(part) for part in __version__.split(".")[:3])
    return VersionInfo(major, minor, micro, f"vnetbackend {__version__}")


def vnet_status(daemon: Daemon) -> dict[str, Any]:
    """What ``query-vnet`` returns."""
    mirror = daemon.mirror.status
    counters = daemon.program.counters()
    try:
        maps: dict[str, Any] | str | None = rss_view(daemon.program.read_config())
    except SteeringError as err:  # a map no longer matches the key it was built from
        maps = f"inconsistent: {err}"
    state = mirror.state
    return {
        "tap": daemon.tap_name,
        "queues": daemon.queues,
        "device": {"id": daemon.device.qdev_id, "pci-address": daemon.device.pci_address},
        "qemu-pid": daemon.qemu_pid,
        "qemu_version": ".".join(map(str, daemon.state_reader.qemu_version)),
        "features": daemon.negotiation.view(),
        "rss": rss_view(mirror.rss),
        "rss-state": {
            "enabled": bool(state and state.enabled),
            "redirect": bool(state and state.redirect),
            "populate-hash": bool(state and state.populate_hash),
        },
        "steering": {
            "attached": mirror.attached,
            "rss": maps,
            "report-every": daemon.program.report_every,
            "frames": counters.frames,
            "reports": counters.reports,
            "reports-dropped": counters.reports_dropped,
        },
        "mirror": {
            "syncs": mirror.syncs,
            "changes": mirror.changes,
            "refused": mirror.refused,
            "failed": mirror.failed,
            "last-refusal": mirror.refusal,
            "failure": mirror.failure,
            "active-queue-pairs": mirror.active_queue_pairs,
            "last-latency-ms": mirror.last_latency_ms,
            "following": "trace" if daemon.trace_log else "control-queue",
        },
    }


def register_commands(server: QmpServer, daemon: Daemon) -> None:
    """Put the daemon's commands on *server*."""

    async def query_vnet(_: dict[str, Any]) -> dict[str, Any]:
        return vnet_status(daemon)

    async def set_reports(args: dict[str, Any]) -> dict[str, Any]:
        every = args.get("every", 1) if args["enable"] else 0
        daemon.program.set_reports(every)
        return {"report-every": every}

    async def query_check(_: dict[str, Any]) -> dict[str, Any]:
        return daemon.checker.summary()

    async def quit_(_: dict[str, Any]) -> None:
        daemon.request_stop("quit on the monitor")

    server.register("query-vnet", query_vnet)
    server.register("vnet-set-reports", set_reports, {
        "enable": Param(bool),
        "every": Param(int, required=False, minimum=1, maximum=MAX_REPORT_EVERY),
    })
    server.register("query-vnet-check", query_check)
    server.register("quit", quit_)
