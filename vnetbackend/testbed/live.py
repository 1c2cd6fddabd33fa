"""Ordinary traffic checked live by the daemon, through RSS changes the guest makes.

`check_live_traffic` gives both ends addresses, starts the daemon's check with the
guest's records port (``vnet-check-start {records}``) and the guest's recorder, runs
`vnetbackend.testbed.ordinary.Traffic` and, as the TCP flows pass given amounts, has
the guest change its RSS configuration (`RssChange`), each waited for until the daemon
mirrored it. Once the flows are acknowledged and a last round of pings came back, the
check is stopped (``vnet-check-stop``, which waits for the guest's recorder to have
nothing more) and its tallies are returned: everything is judged by the daemon, over
its monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from vnetbackend.errors import VnetError
from vnetbackend.testbed.agent import GuestAgent
from vnetbackend.testbed.bed import SETTLE_TIMEOUT, wait_mirrored
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.ordinary import (
    GUEST_V4,
    GUEST_V6,
    Traffic,
    address_both_ends,
    host_ping,
    listen_in_guest,
)
from vnetbackend.testbed.recorder import recorder_log, start_in_guest, stop_in_guest

#: How long the guest's recorder may take to greet, and the check to settle at its end.
RECORDER_START_S = 30.0
STOP_SETTLE_S = 60
MIB = 1 << 20


class TrafficEnded(VnetError):
    """The traffic ended before every RSS change could be made during it."""


@dataclass(frozen=True, slots=True)
class RssChange:
    """A guest command, run once the TCP flows have sent *after_tcp_bytes* in all."""

    after_tcp_bytes: int
    describe: str
    apply: Callable[[GuestRss], Awaitable[None]]


#: Three guest commands a few MiB apart: a new key over four queues, UDP over IPv4
#: hashed by addresses only, a weighted table.
STANDARD_CHANGES = [
    RssChange(2 * MIB, "ethtool -X hkey <07..2e> equal 4",
              lambda rss: rss.set_rxfh(bytes(range(7, 47)), equal=4)),
    RssChange(4 * MIB, "ethtool -N rx-flow-hash udp4 sd",
              lambda rss: rss.set_flow_hash("udp4", "sd")),
    RssChange(6 * MIB, "ethtool -X weight 1 3 0 2",
              lambda rss: rss.set_rxfh(weights=[1, 3, 0, 2])),
]
#: TCP bytes sent after the last change.
AFTER_LAST_CHANGE = 14 * MIB


@dataclass
class LiveRun:
    """The daemon's tallies at the end (``vnet-check-stop``), the changes made, and what
    the host sent."""

    live: dict[str, Any]
    kernel: dict[str, Any]
    changes: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)


async def _wait_or_fail(waiting: Awaitable[None], sending: asyncio.Task[None],
                        what: str) -> None:
    task = asyncio.ensure_future(waiting)
    await asyncio.wait({task, sending}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        raise TrafficEnded(f"traffic ended ({sending.exception()!r}) before {what}")
    task.result()


async def check_live_traffic(client: QMPClient, agent: GuestAgent, rss: GuestRss,
                             tap_name: str, records_port: Path, traffic: Traffic,
                             changes: list[RssChange] = STANDARD_CHANGES,
                             after_last: int = AFTER_LAST_CHANGE) -> LiveRun:
    """Run *traffic* through *changes* and *after_last* TCP bytes beyond, checked live
    by the daemon behind *client*; its tallies at the end."""
    await address_both_ends(tap_name, agent)
    await listen_in_guest(agent, traffic.tcp_ports)
    await wait_mirrored(client, await rss.read_config())
    with client.listener("VNET_RECORDER_STARTED") as greeted:
        await client.execute("vnet-check-start", {"records": str(records_port)})
        await start_in_guest(agent)
        try:
            await asyncio.wait_for(greeted.get(), RECORDER_START_S)
        except TimeoutError:
            raise TimeoutError("no greeting from the guest's recorder: "
                               f"{await recorder_log(agent)}") from None
    done: list[str] = []
    stop = asyncio.Event()
    sending = asyncio.create_task(traffic.run(agent, stop))
    try:
        for change in changes:
            await _wait_or_fail(traffic.until_sent(change.after_tcp_bytes), sending,
                                f"change {change.describe!r}")
            await change.apply(rss)
            await wait_mirrored(client, await rss.read_config())
            done.append(change.describe)
        last = (changes[-1].after_tcp_bytes if changes else 0) + after_last
        await _wait_or_fail(traffic.until_sent(last), sending, "the traffic's end")
        stop.set()
        await sending
        # One more round trip on each family: the guest has answered these, so it has
        # taken the frames before them on their queues.
        await host_ping(GUEST_V4, 3, 0.05)
        await host_ping(GUEST_V6, 3, 0.05)
        async with asyncio.timeout(STOP_SETTLE_S + SETTLE_TIMEOUT):
            result = await client.execute("vnet-check-stop", {"settle": STOP_SETTLE_S})
    finally:
        stop.set()
        if not sending.done():
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
        with contextlib.suppress(Exception):
            await stop_in_guest(agent)
    return LiveRun(result["live"], {k: v for k, v in result.items() if k != "live"},
                   done, traffic.sent)
