"""Noticing that a tap was deleted, from netlink."""

from __future__ import annotations

import asyncio
import os

from tests.prereq import need_tun
from vnetbackend.link_watch import wait_until_removed
from vnetbackend.tap import create_tap, delete_tap, tap_exists


async def test_deletion_is_noticed() -> None:
    need_tun()
    name = f"vnbw{os.getpid() % 100000}"
    await asyncio.to_thread(create_tap, name)  # pyroute2's sync API wants its own loop
    try:
        watcher = asyncio.create_task(wait_until_removed(name))
        await asyncio.sleep(0)  # let the watcher subscribe before the link goes away
        assert not watcher.done()
        await asyncio.to_thread(delete_tap, name)
        await asyncio.wait_for(watcher, 10)
    finally:
        await asyncio.to_thread(delete_tap, name)
    assert not tap_exists(name)


async def test_a_missing_interface_counts_as_removed() -> None:
    await asyncio.wait_for(wait_until_removed("vnb-nonexistent"), 5)
