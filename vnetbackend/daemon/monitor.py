"""The daemon's commands on its own QMP monitor, for each device (VM) it serves.

Each command takes the VM's ``id``; it may be left out while the daemon serves exactly
one VM (``run`` and ``attach`` always do). `vnetbackend.daemon.serve` adds the commands
that add, remove and list VMs.

=================  ==========================================================
``query-vnet``     offered and negotiated features, the guest's RSS configuration
                   as last read, the one the program's maps hold, attach
                   state, counters
``vnet-set-reports``  ``{enable: bool, every?: int}``: per-packet reports on/off,
                   one frame in ``every``
``query-vnet-check``  the three-way hash check's totals and per-class tallies, and the
                   live kernel check's (``kernel``)
``vnet-check-start``  ``{every?: int, reset?: bool, records?: str}``: reports on (one
                   frame in ``every``, default 1), every one judged against the
                   model; the kernel tallies start again unless ``reset`` is
                   false. With ``records`` (the unix socket of the VM's
                   ``org.vnetbackend.records.0`` port) the guest's records are
                   joined with the reports too (``live``)
``vnet-check-stop``   ``{settle?: int}``: waits up to ``settle`` seconds (default 10)
                   for the guest's recorder to have nothing more, then reports
                   off, once the rings are read; returns the kernel tallies and
                   the ``live`` ones
``quit``           shut the daemon down cleanly (every VM it serves)
=================  ==========================================================

Every event carries the VM's id as ``vm``. Events: ``VNET_NEGOTIATED``,
``VNET_DRIVER_RESET``, ``VNET_RSS_CHANGED``,
``VNET_STEERING_ATTACHED``, ``VNET_RSS_REFUSED``, ``VNET_GUEST_RSS_REJECTED``,
``VNET_SYNC_FAILED``, ``VNET_SYNC_RECOVERED``, ``VNET_HASH_MISMATCH``,
``VNET_QUEUES_DIVERGED``, ``VNET_RECORDER_STARTED`` (the guest's recorder greeted on the
records port), ``VNET_SHUTDOWN``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vnetbackend import __version__
from vnetbackend.daemon.lifecycle import Daemon
from vnetbackend.daemon.live_check import SETTLE_S
from vnetbackend.daemon.qmp_server import Param, QmpCommandError, QmpServer, VersionInfo
from vnetbackend.rss import rss_view
from vnetbackend.steering.program import SteeringError

MAX_REPORT_EVERY = 0xFFFFFFFF
#: The VM a command is for: its id, or None when the client named none. Raises
#: `QmpCommandError` for an id the daemon does not serve (or a missing one it needs).
DaemonLookup = Callable[[str | None], Daemon]
VM_ID = Param(str, required=False)


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
            "reports-read": daemon.reports_read,
            "generation": daemon.program.generation,
        },
        "mirror": {
            "syncs": mirror.syncs,
            "changes": mirror.changes,
            "refused": mirror.refused,
            "failed": mirror.failed,
            "last-refusal": mirror.refusal,
            "failure": mirror.failure,
            "active-queue-pairs": mirror.active_queue_pairs,
            "queues": mirror.queues,
            "last-latency-ms": mirror.last_latency_ms,
            "following": "trace" if daemon.trace_log else "control-queue",
        },
    }


def kernel_view(daemon: Daemon) -> dict[str, Any]:
    """The live kernel check's tallies, with what the rings lost."""
    counters = daemon.program.counters()
    return {**daemon.kernel_check.summary(), "report-every": daemon.program.report_every,
            "reports-read": daemon.reports_read, "reports-lost": counters.reports_dropped}


def only(vm_id: str, daemon: Daemon) -> DaemonLookup:
    """The lookup of a daemon serving the one VM *vm_id*."""
    def lookup(asked: str | None) -> Daemon:
        if asked not in (None, vm_id):
            raise QmpCommandError(f"no VM with id '{asked}' (this daemon serves '{vm_id}')",
                                  "DeviceNotFound")
        return daemon
    return lookup


def register_commands(server: QmpServer, daemons: DaemonLookup,
                      quit_: Callable[[str], None]) -> None:
    """Put the per-VM commands and ``quit`` (which calls *quit_* with the reason) on
    *server*."""

    async def query_vnet(args: dict[str, Any]) -> dict[str, Any]:
        return vnet_status(daemons(args.get("id")))

    async def set_reports(args: dict[str, Any]) -> dict[str, Any]:
        every = args.get("every", 1) if args["enable"] else 0
        daemons(args.get("id")).set_reports(every)
        return {"report-every": every}

    async def query_check(args: dict[str, Any]) -> dict[str, Any]:
        daemon = daemons(args.get("id"))
        return {**daemon.checker.summary(), "kernel": kernel_view(daemon),
                "live": daemon.live.summary() if daemon.live else None}

    async def check_start(args: dict[str, Any]) -> dict[str, Any]:
        daemon = daemons(args.get("id"))
        every = args.get("every", 1)
        if daemon.live is not None and not daemon.live.stopped:
            raise QmpCommandError("a check with a records port is running: "
                                  "vnet-check-stop it first")
        daemon.set_reports(every)  # what the rings held is judged before the reset
        if args.get("reset", True):
            daemon.kernel_check.reset()
        if "records" in args:
            try:
                await daemon.start_live_check(Path(args["records"]), every)
            except (OSError, TimeoutError) as err:
                daemon.set_reports(0)
                raise QmpCommandError(f"argument 'records': cannot read the records port "
                                      f"{args['records']}: {err or 'timed out'}") from None
        return {"report-every": every, "generation": daemon.program.generation}

    async def check_stop(args: dict[str, Any]) -> dict[str, Any]:
        daemon = daemons(args.get("id"))
        if daemon.live is not None and not daemon.live.stopped:
            await daemon.live.stop(args.get("settle", SETTLE_S))
        daemon.set_reports(0)
        daemon.program.reports().take_batch()  # what landed while switching off
        return {**kernel_view(daemon), "live": daemon.live.summary() if daemon.live else None}

    async def quit_command(_: dict[str, Any]) -> None:
        quit_("quit on the monitor")

    server.register("query-vnet", query_vnet, {"id": VM_ID})
    server.register("vnet-set-reports", set_reports, {
        "id": VM_ID,
        "enable": Param(bool),
        "every": Param(int, required=False, minimum=1, maximum=MAX_REPORT_EVERY),
    })
    server.register("query-vnet-check", query_check, {"id": VM_ID})
    server.register("vnet-check-start", check_start, {
        "id": VM_ID,
        "every": Param(int, required=False, minimum=1, maximum=MAX_REPORT_EVERY),
        "reset": Param(bool, required=False),
        "records": Param(str, required=False),
    })
    server.register("vnet-check-stop", check_stop, {
        "id": VM_ID, "settle": Param(int, required=False, minimum=0, maximum=600)})
    server.register("quit", quit_command)
