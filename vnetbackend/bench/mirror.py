"""Mirror latency: from QEMU's RSS trace event to the steering program attached again.

Boots the test guest (QEMU started with ``-msg timestamp=on``, so its trace lines carry
wall-clock times), attaches the daemon to it, then has the guest's ethtool change the
RSS key and indirection table ``--changes`` times, each change a separate ``ethtool -X``
(one RSS command to the device). The daemon's mirror records, per change, the time from
the trace line's timestamp to the program being attached with the new configuration;
those are the figures. The benchmark waits on the daemon's own events, and fails if
the mirror did not record exactly one latency per change.

Percentiles are nearest-rank: with fewer than 100 changes ``p99_ms`` would be the
maximum, one sample. The default of 200 changes makes it the second-largest; the
maximum is reported beside it. ``stages_ms`` gives p50 and p99 of each stage of a
change (`vnetbackend.mirror.MirrorStatus`), which add up to its latency: the trace line
seen (``trace-seen``), the snapshot command until QEMU's ``STOP`` (``qmp-request``),
then ``STOP`` until the device's section was read whole from the file while QEMU was
still writing it (``state-written``), or, where the state was read at QEMU's reply, the
VM's pause by QEMU's own times (``vm-pause``) and the reply heard (``qmp-resume``);
reading and parsing the stream (``read``, ``parse``), the validated configuration
(``validate``), the map writes with the Toeplitz tables (``maps``) and the attach
(``attach``). ``syncs`` counts the snapshots taken for the changes: one each.

``split_ms`` parts each change's latency in two, per change, before taking p50 and p99:
``qemu`` is the time QEMU holds the snapshot up after the daemon asked for it
(``qmp-request`` + ``state-written`` or ``vm-pause``: the command received and
dispatched, the vCPUs paused, the device state saved; ``state-written`` also holds the
daemon's noticing the write), ``daemon`` the rest of the latency (the trace line seen,
reading, parsing, validating, the maps and the attach). Percentiles of stages do not
add up; these say which side a slow change's time was on. Changes where QEMU's pause
was not seen (``snapshot`` instead) are left out of the split.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.qmp import QMPClient

from vnetbackend.choices import add_platform_options
from vnetbackend.daemon import launch
from vnetbackend.daemon.lifecycle import Daemon
from vnetbackend.errors import VnetError
from vnetbackend.testbed.ethtool import DEVICE, GuestRss
from vnetbackend.testbed.guest import Guest, GuestOptions, boot_guest
from vnetbackend.testbed.platform import Platform

#: How long the daemon may take to show the effect of one agent call.
EVENT_TIMEOUT = 60.0
KEY_LENGTH = 40
MAX_CHANGES = 999
TARGET_P99_MS = 5.0
#: Daemon events that mean a change was not mirrored.
FAILURE_EVENTS = frozenset({"VNET_RSS_REFUSED", "VNET_SYNC_FAILED",
                            "VNET_GUEST_RSS_REJECTED"})


class MirrorBenchError(VnetError):
    """The mirror did not record one latency per change."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queues", type=int, default=4, help="queue pairs (default: 4)")
    parser.add_argument("--changes", type=_change_count, default=200,
                        help="RSS changes the guest makes (default: %(default)s)")
    parser.add_argument("--per-call", type=int, default=1,
                        help="changes sent back to back in one guest agent call; 1 waits "
                             "for each change to be mirrored before the next "
                             "(default: %(default)s)")
    add_platform_options(parser, guest=True)


def _change_count(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_CHANGES:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_CHANGES}, got {count}")
    return count


def rxfh_command(index: int, queues: int) -> str:
    """The *index*-th change: a key of its own, and a table spread over 1..queues queues
    evenly or by weight in turn, so no change repeats the one before."""
    key = ":".join(f"{(index * 11 + 3 * byte) % 256:02x}" for byte in range(KEY_LENGTH))
    spread = index % queues + 1
    if index % 2:
        table = "weight " + " ".join(str((index + queue) % 3 + 1) for queue in range(queues))
    else:
        table = f"equal {spread}"
    return f"ethtool -X {DEVICE} hkey {key} {table}"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of *values* (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


#: QEMU's stages after ``qmp-request`` (the command until the VM paused): the state
#: written (an early read) or the whole pause (a read at the reply); a change has one.
QEMU_SAVE_STAGES = ("state-written", "vm-pause")


async def next_latencies(daemon: Daemon, monitor: QMPClient, count: int,
                         stages: dict[str, list[float]],
                         split: dict[str, list[float]]) -> list[float]:
    """The trace-to-attached latencies of the next *count* configurations the daemon
    mirrors, from its ``VNET_RSS_CHANGED`` events; each one's stages are added to
    *stages*, and its latency parted into QEMU's and the daemon's to *split*."""
    latencies: list[float] = []

    async def changed() -> None:
        while len(latencies) < count:
            event = await monitor.events.get()
            if event["event"] in FAILURE_EVENTS:
                raise MirrorBenchError(f"the daemon published {event['event']}: "
                                       f"{event.get('data')}")
            data = event.get("data", {})
            if event["event"] == "VNET_RSS_CHANGED" and data.get("latency-ms") is not None:
                latencies.append(data["latency-ms"])
                changed = data.get("stages-ms") or {}
                for stage, ms in changed.items():
                    stages.setdefault(stage, []).append(ms)
                saving = next((changed[s] for s in QEMU_SAVE_STAGES if s in changed), None)
                if "qmp-request" in changed and saving is not None:
                    qemu = changed["qmp-request"] + saving
                    split.setdefault("qemu", []).append(qemu)
                    split.setdefault("daemon", []).append(data["latency-ms"] - qemu)
    try:
        await asyncio.wait_for(changed(), EVENT_TIMEOUT)
    except TimeoutError:
        raise MirrorBenchError(
            f"the daemon mirrored {len(latencies)} of {count} changes within "
            f"{EVENT_TIMEOUT:g} s (mirror: {daemon.mirror.status})") from None
    return latencies


async def wait_attached(daemon: Daemon, monitor: QMPClient) -> None:
    """Wait, on the daemon's events, for its first sync to attach the program."""
    async def attached() -> None:
        while not daemon.mirror.status.attached:
            await monitor.events.get()
    try:
        await asyncio.wait_for(attached(), EVENT_TIMEOUT)
    except TimeoutError:
        raise MirrorBenchError(f"the daemon did not attach its program within {EVENT_TIMEOUT:g} "
                               f"s: {daemon.mirror.status}") from None


@contextlib.asynccontextmanager
async def serving_daemon(guest: Guest, scratch: Path) -> AsyncIterator[tuple[Daemon, QMPClient]]:
    """The daemon attached to *guest* and serving, with a client on its monitor."""
    monitor_path = scratch / "monitor.sock"
    async with launch.attached(guest.qmp_socket, guest.tap_name, scratch / "run",
                               monitor_path) as daemon:
        serving = asyncio.create_task(daemon.serve())
        monitor = QMPClient("bench-mirror")
        try:
            await monitor.connect(str(monitor_path))
            try:
                yield daemon, monitor
            finally:
                await monitor.disconnect()
        finally:
            daemon.request_stop("benchmark over")
            await serving


async def _run(args: argparse.Namespace) -> dict[str, object]:
    if args.per_call < 1:
        raise MirrorBenchError(f"--per-call must be at least 1, got {args.per_call}")
    qemu, image = await Platform.from_args(args).resolve()
    options = GuestOptions(queues=args.queues, extra_args=("-msg", "timestamp=on"),
                           qemu=qemu.binary, image=image)
    with tempfile.TemporaryDirectory(prefix=f"vnet-bench-mirror-{os.getpid()}-") as scratch:
        async with boot_guest(options) as guest:
            # With rxhash on the driver has sent its first RSS command: the program attaches.
            await GuestRss(guest.agent).enable_rxhash()
            async with serving_daemon(guest, Path(scratch)) as (daemon, monitor):
                await wait_attached(daemon, monitor)
                status = daemon.mirror.status
                changes_before, syncs_before = status.changes, status.syncs
                latencies: list[float] = []
                stages: dict[str, list[float]] = {}
                split: dict[str, list[float]] = {}
                started = time.perf_counter()
                for first in range(0, args.changes, args.per_call):
                    batch = range(first, min(first + args.per_call, args.changes))
                    await guest.agent.check("; ".join(rxfh_command(i, args.queues) for i in batch))
                    latencies += await next_latencies(daemon, monitor, len(batch), stages,
                                                      split)
                elapsed = time.perf_counter() - started
                mirrored = status.changes - changes_before
                if mirrored != args.changes or status.refused:
                    raise MirrorBenchError(f"{args.changes} changes, but the mirror counted "
                                           f"{mirrored} and refused {status.refused}")
                syncs = status.syncs - syncs_before
    return {
        "benchmark": "mirror",
        "qemu_version": qemu.version_text,
        "guest_kernel": guest.kernel_release,
        "queues": args.queues,
        "boot_s": round(guest.boot_seconds, 2),
        "changes": len(latencies),
        "per_call": args.per_call,
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p90_ms": round(percentile(latencies, 0.90), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "min_ms": round(min(latencies), 3),
        "max_ms": round(max(latencies), 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
        "changes_per_s": round(len(latencies) / elapsed, 1),
        "syncs": syncs,
        "stages_ms": {stage: {"p50": round(percentile(values, 0.50), 3),
                              "p99": round(percentile(values, 0.99), 3)}
                      for stage, values in stages.items()},
        "split_ms": {part: {"p50": round(percentile(values, 0.50), 3),
                            "p99": round(percentile(values, 0.99), 3)}
                     for part, values in split.items()},
        "target_p99_ms": TARGET_P99_MS,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    return asyncio.run(_run(args))
