"""One daemon serving several real guests: each mirrored and checked on its own, and a
fault in one VM (its QEMU killed, hung, or its tap deleted) ends or holds up that VM only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.guest.conftest import need_guest
from tests.guest.daemon_bed import (
    EVENT_TIMEOUT,
    check_traffic,
)
from tests.prereq import need_bcc
from vnetbackend import tap
from vnetbackend.daemon.serve import Served, ServeOptions, serving
from vnetbackend.qemu.qmp import QMP_TIMEOUT_S
from vnetbackend.testbed.bed import VnetGuest, same_rss, wait_mirrored
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import Guest, GuestOptions, boot_guest
from vnetbackend.testbed.injector import silence_host_stack
from vnetbackend.testbed.observer import RxObserver

pytestmark = pytest.mark.guest


class Beds:
    """The guests under one serving daemon, each with a monitor client of its own (so
    that waiting on one VM's events takes none of another's)."""

    def __init__(self, served: Served, control: QMPClient) -> None:
        self.served = served
        self.control = control
        self.beds: dict[str, VnetGuest] = {}

    def __getitem__(self, vm_id: str) -> VnetGuest:
        return self.beds[vm_id]

    async def status(self, vm_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.control.execute("query-vnet", {"id": vm_id})
        return result

    async def vms(self) -> dict[str, dict[str, Any]]:
        return {vm["id"]: vm for vm in await self.control.execute("query-vnet-vms")}

    async def mirror_and_check(self, vm_id: str, seed: int) -> dict[str, Any]:
        """Wait until VM *vm_id*'s maps hold its guest's configuration, then check a
        traffic mix through its tap against the model and its guest."""
        bed = self[vm_id]
        config = await bed.rss.read_config()
        status = await wait_mirrored(bed.monitor, config, vm_id)
        assert status["steering"]["attached"]
        bed.daemon = self.served.registry.daemon(vm_id)
        await check_traffic(bed, config, seed)
        return status


async def _ready_guest(stack: contextlib.AsyncExitStack) -> tuple[Guest, GuestRss, RxObserver]:
    guest = await stack.enter_async_context(boot_guest(GuestOptions(
        queues=4, extra_args=("-msg", "timestamp=on"))))  # timestamps date the latency
    stack.callback(_resume, guest.qemu.pid)  # a test may leave it stopped
    silence_host_stack(guest.tap_name)
    rss = GuestRss(guest.agent)
    await rss.enable_rxhash()
    observer = RxObserver(guest.agent)
    await observer.start()
    return guest, rss, observer


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def served_guests(tmp_path: Path, ids: tuple[str, ...]) -> AsyncIterator[Beds]:
    """A guest per id, booted one after the other, all added to one serving daemon (in
    this process) by their QMP sockets and taps, reports on."""
    need_guest()
    need_bcc()
    async with contextlib.AsyncExitStack() as stack:
        guests = [await _ready_guest(stack) for _ in ids]
        options = ServeOptions(monitor=tmp_path / "monitor.sock", run_root=tmp_path / "run")
        served = await stack.enter_async_context(serving(options))
        beds = Beds(served, await _client(stack, options.monitor))
        for vm_id, (guest, rss, observer) in zip(ids, guests, strict=True):
            added = await beds.control.execute("vnet-add-vm", {
                "id": vm_id, "tap": guest.tap_name, "qmp": str(guest.qmp_socket)})
            assert (added["id"], added["state"], added["mode"]) == (vm_id, "running",
                                                                     "attached")
            await beds.control.execute("vnet-set-reports", {"id": vm_id, "enable": True})
            beds.beds[vm_id] = VnetGuest(guest, rss, observer,
                                        served.registry.daemon(vm_id),
                                        await _client(stack, options.monitor))
        yield beds


async def _client(stack: contextlib.AsyncExitStack, path: Path) -> QMPClient:
    client = QMPClient("test")
    await client.connect(str(path))
    stack.push_async_callback(_disconnect, client)
    return client


async def _disconnect(client: QMPClient) -> None:
    with contextlib.suppress(EOFError, ConnectionError):
        await client.disconnect()


async def _next_event(client: QMPClient, name: str, vm_id: str | None = None,
                      ) -> dict[str, Any]:
    """The next event *name* (of VM *vm_id*, if given) on *client*."""
    async def wanted() -> dict[str, Any]:
        while True:
            event = await client.events.get()
            if event["event"] == name and vm_id in (None, event["data"]["vm"]):
                return event
    return await asyncio.wait_for(wanted(), EVENT_TIMEOUT)


async def _ended(beds: Beds, vm_id: str) -> dict[str, Any]:
    """The list entry of *vm_id* once it has ended and been cleaned up (VNET_VM_ENDED),
    which must say what the event said."""
    event = await _next_event(beds[vm_id].monitor, "VNET_VM_ENDED", vm_id)
    entry = (await beds.vms())[vm_id]
    assert entry["state"] == "ended"
    assert (entry["ending"], entry["reason"]) == (event["data"]["ending"],
                                                  event["data"]["reason"])
    return entry


async def test_two_guests_are_mirrored_and_checked_each_on_its_own(tmp_path: Path) -> None:
    async with served_guests(tmp_path, ("left", "right")) as beds:
        for vm_id in ("left", "right"):
            await beds.mirror_and_check(vm_id, seed=0)
        assert (await beds.status("left"))["tap"] == beds["left"].guest.tap_name
        changes = [
            (lambda rss: rss.set_rxfh(key=bytes(range(7, 47)), equal=2),
             lambda rss: rss.set_rxfh(weights=[1, 2, 3, 2])),
            (lambda rss: rss.set_flow_hash("udp4", "sd"),
             lambda rss: rss.set_rxfh(key=bytes(range(40)), equal=3)),
            (lambda rss: rss.set_rxfh(weights=[0, 1, 0, 1]),
             lambda rss: rss.set_flow_hash("tcp6", "sd")),
        ]
        for seed, (left_change, right_change) in enumerate(changes, start=1):
            # Both guests change at once; each VM's maps follow its own guest only.
            await asyncio.gather(left_change(beds["left"].rss), right_change(beds["right"].rss))
            await asyncio.gather(beds.mirror_and_check("left", seed),
                                 beds.mirror_and_check("right", seed + 100))
        left, right = await beds.status("left"), await beds.status("right")
        assert left["steering"]["rss"] != right["steering"]["rss"]
        for status in (left, right):
            assert status["mirror"]["refused"] == 0 and status["mirror"]["failed"] == 0
            assert status["mirror"]["changes"] >= len(changes)
        removed = await beds.control.execute("vnet-remove-vm", {"id": "left"})
        assert (removed["state"], removed["ending"], removed["reason"]) == (
            "ended", "requested", "removed on the monitor")
        assert (await _next_event(beds["right"].monitor, "VNET_SHUTDOWN"))["data"] == {
            "vm": "left", "ending": "requested", "reason": "removed on the monitor"}
        assert list(await beds.vms()) == ["right"]
        await beds["right"].rss.set_rxfh(key=bytes(range(50, 90)), equal=4)
        await beds.mirror_and_check("right", seed=200)


async def test_every_event_names_its_vm(tmp_path: Path) -> None:
    async with served_guests(tmp_path, ("one", "two")) as beds:
        for vm_id in ("one", "two"):
            await beds.mirror_and_check(vm_id, seed=3)
        await beds["two"].rss.set_rxfh(key=bytes(range(11, 51)), equal=2)
        seen: list[dict[str, Any]] = []

        async def until_two_changed() -> None:
            while True:
                event = await beds["one"].monitor.events.get()
                seen.append(event)
                if event["event"] == "VNET_STEERING_ATTACHED" and event["data"]["vm"] == "two":
                    return
        await asyncio.wait_for(until_two_changed(), EVENT_TIMEOUT)
        assert all(event["data"]["vm"] in ("one", "two") for event in seen)
        await beds.mirror_and_check("two", seed=4)
        assert same_rss((await beds.status("one"))["steering"]["rss"],
                        await beds["one"].rss.read_config())


async def test_a_hung_qemu_holds_up_its_own_vm_only(tmp_path: Path) -> None:
    """SIGSTOP on one QEMU: its calls time out (an event naming it); the other VM's
    mirror follows its guest in less than one QMP time limit, its traffic checks; the
    hung VM can be removed while hung."""
    async with served_guests(tmp_path, ("hung", "live")) as beds:
        for vm_id in ("hung", "live"):
            await beds.mirror_and_check(vm_id, seed=5)
        pid = beds["hung"].guest.qemu.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            failed = await _next_event(beds["hung"].monitor, "VNET_SYNC_FAILED", "hung")
            assert "no answer within" in failed["data"]["reason"]
            for seed, key in enumerate((bytes(range(33, 73)), bytes(range(44, 84))), start=6):
                await beds["live"].rss.set_rxfh(key=key, equal=3)
                status = await beds.mirror_and_check("live", seed)
                assert status["mirror"]["last-latency-ms"] < QMP_TIMEOUT_S * 1000
                assert status["mirror"]["failure"] is None
            hung = (await beds.vms())["hung"]
            assert hung["state"] == "running"
            assert (await beds.status("hung"))["mirror"]["failure"] is not None
            removed = await beds.control.execute("vnet-remove-vm", {"id": "hung"})
            assert removed["ending"] == "requested"
        finally:
            _resume(pid)
        assert list(await beds.vms()) == ["live"]
        await beds["live"].rss.set_rxfh(weights=[2, 1, 1, 0])
        await beds.mirror_and_check("live", seed=9)


async def test_a_killed_qemu_or_a_deleted_tap_ends_its_own_vm_only(tmp_path: Path) -> None:
    async with served_guests(tmp_path, ("killed", "untapped", "kept")) as beds:
        for vm_id in ("killed", "untapped", "kept"):
            await beds.mirror_and_check(vm_id, seed=10)
        os.kill(beds["killed"].guest.qemu.pid, signal.SIGKILL)
        killed = await _ended(beds, "killed")
        assert killed["ending"] == "qemu_gone"
        assert "QMP connection to QEMU closed" in killed["reason"]
        await beds["kept"].rss.set_rxfh(key=bytes(range(60, 100)), equal=2)
        await beds.mirror_and_check("kept", seed=11)

        untapped_tap = beds["untapped"].guest.tap_name
        await asyncio.to_thread(tap.delete_tap, untapped_tap)
        untapped = await _ended(beds, "untapped")
        assert (untapped["ending"], untapped["reason"]) == (
            "tap_gone", f"tap {untapped_tap} was deleted")
        await beds["kept"].rss.set_rxfh(weights=[1, 0, 2, 1])
        await beds.mirror_and_check("kept", seed=12)

        vms = await beds.vms()
        assert {vm_id: vm["state"] for vm_id, vm in vms.items()} == {
            "killed": "ended", "untapped": "ended", "kept": "running"}
        with pytest.raises(Exception, match="VM 'killed' is ended: the QMP connection"):
            await beds.status("killed")
        # An ended VM's id and tap can be served again once it is removed.
        await beds.control.execute("vnet-remove-vm", {"id": "killed"})
        assert set(await beds.vms()) == {"untapped", "kept"}
