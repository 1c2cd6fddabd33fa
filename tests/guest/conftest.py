"""Fixtures for tests that boot a real guest: one RSS guest shared by the session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from tests.prereq import need, need_program, need_root, need_tun
from vnetbackend.qemu.installs import choose_qemu
from vnetbackend.rss import RssConfig
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import Guest, GuestOptions, boot_guest
from vnetbackend.testbed.image import find_guest_image
from vnetbackend.testbed.injector import silence_host_stack
from vnetbackend.testbed.observer import RxObserver

RSS_GUEST_QUEUES = 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked ``qemu_series("7.2", why=...)`` runs only on those QEMU series: on
    the others it is deselected (reported as such), because what it sets up cannot
    happen there."""
    marked = [item for item in items if item.get_closest_marker("qemu_series")]
    if not marked:
        return
    series = ".".join(map(str, asyncio.run(choose_qemu()).version[:2]))
    dropped = [item for item in marked
               if series not in item.get_closest_marker("qemu_series").args]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


def need_guest() -> None:
    """Root, a tun device, QEMU and the built guest image (fails under CI=true)."""
    need_root()
    need_tun()
    need_program("qemu-system-x86_64")
    need(find_guest_image() is not None,
         "needs the test guest image (scripts/build-guest)")


@dataclass(frozen=True, slots=True)
class RssBed:
    """The shared guest with rxhash on, the observer started, and its boot-time
    configuration as the guest's ethtool shows it."""

    guest: Guest
    rss: GuestRss
    observer: RxObserver
    boot_config: RssConfig


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def rss_bed() -> AsyncIterator[RssBed]:
    need_guest()
    async with boot_guest(GuestOptions(queues=RSS_GUEST_QUEUES)) as guest:
        silence_host_stack(guest.tap_name)
        rss = GuestRss(guest.agent)
        await rss.enable_rxhash()
        observer = RxObserver(guest.agent)
        await observer.start()
        yield RssBed(guest, rss, observer, await rss.read_guest_view())
