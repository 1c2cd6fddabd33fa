"""Noticing that a tap was deleted, from netlink."""

from __future__ import annotations

import asyncio
import os

from tests.prereq import need_tun
from vnetbackend.link_watch import RemovalWatch
from vnetbackend.tap import create_tap, delete_tap, tap_exists


async def test_deletion_is_noticed() -> None:
    need_tun()
    name = f"vnbw{os.getpid() % 100000}"
    await asyncio.to_thread(create_tap, name)  # pyroute2's sync API wants its own loop
    try:
        watch = RemovalWatch(name)
        waiting = asyncio.create_task(watch.wait())
        done, _ = await asyncio.wait([waiting], timeout=0.2)
        assert not done, "reported removed while the tap still exists"
        await asyncio.to_thread(delete_tap, name)
        await asyncio.wait_for(waiting, 10)
        watch.close()
    finally:
        await asyncio.to_thread(delete_tap, name)
    assert not tap_exists(name)


async def test_a_missing_interface_counts_as_removed() -> None:
    watch = RemovalWatch("vnb-nonexistent")
    await asyncio.wait_for(watch.wait(), 5)
    watch.close()
