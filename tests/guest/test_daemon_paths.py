"""The daemon's less travelled paths against a real guest: RSS switched off and on,
hash reports without RSS, a failed attach, the program gone when an attached daemon
exits, QEMU's rejection of a guest command, a driver reset, a key the guest cannot set."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.bpf_objects import counted_frames
from tests.guest.conftest import need_guest
from tests.guest.daemon_bed import (
    check_traffic,
    next_event,
)
from tests.prereq import need_bcc
from vnetbackend.daemon import launch
from vnetbackend.testbed.agent import GuestCommandError
from vnetbackend.testbed.batch import observe_batch
from vnetbackend.testbed.bed import VnetGuest, same_rss, wait_mirrored
from vnetbackend.testbed.driver_issues import RSS_OFF_AFTER_SET_CHANNELS
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import GuestOptions, boot_guest
from vnetbackend.testbed.injector import Injector, silence_host_stack
from vnetbackend.testbed.traffic import make_batch

pytestmark = pytest.mark.guest
EVENT_TIMEOUT = 30.0
SOME_CLASSES = ["ipv4_tcp", "ipv4_udp", "ipv6_tcp", "ipv6_udp"]


async def status_when(client: QMPClient, holds: Any) -> dict[str, Any]:
    """query-vnet once *holds(status)* is true, read again after each of the daemon's
    events."""
    async def settled() -> dict[str, Any]:
        while not holds(status := await client.execute("query-vnet")):
            await client.events.get()
        return status
    return await asyncio.wait_for(settled(), EVENT_TIMEOUT)


async def steered_frames(bed: VnetGuest, seed: int) -> int:
    """Inject a few frames; how many of them the steering program ran on."""
    before = (await bed.monitor.execute("query-vnet"))["steering"]["frames"]
    probes = make_batch(bed.guest.mac, per_class=1, seed=seed, classes=SOME_CLASSES)
    await observe_batch(bed.guest.tap_name, bed.observer, probes)
    after: int = (await bed.monitor.execute("query-vnet"))["steering"]["frames"]
    return after - before


async def test_rss_switched_off_detaches_the_program_and_on_attaches_it(
        vnet_guest: VnetGuest) -> None:
    """ethtool -L sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, on which QEMU switches RSS off
    (and Linux 6.1 leaves it off: driver_issues.RSS_OFF_AFTER_SET_CHANNELS)."""
    bed = vnet_guest
    await bed.rss.set_rxfh(key=bytes(range(5, 45)), equal=4)
    await wait_mirrored(bed.monitor, await bed.rss.read_config())
    assert await steered_frames(bed, seed=1) == len(SOME_CLASSES)
    # ethtool refuses fewer channels than a table the user set names: reset it first.
    await bed.guest.agent.check("ethtool -X eth0 default")
    await bed.rss.set_channels(2)
    if not RSS_OFF_AFTER_SET_CHANNELS.concerns(bed.guest.kernel_release):
        # Linux 6.12 sends its RSS configuration again after VQ_PAIRS_SET.
        again = await wait_mirrored(bed.monitor, await bed.rss.read_config())
        assert again["steering"]["attached"] and again["rss"]["queues"] == 2
        assert await steered_frames(bed, seed=2) == len(SOME_CLASSES)
        return
    off = await status_when(bed.monitor, lambda s: s["rss"] is None)
    assert not off["steering"]["attached"] and off["steering"]["rss"] is None
    assert not off["rss-state"]["enabled"]
    assert await steered_frames(bed, seed=2) == 0, "a detached program runs on nothing"
    await bed.rss.set_rxfh(equal=2)
    on = await wait_mirrored(bed.monitor, await bed.rss.read_config())
    assert on["steering"]["attached"]
    assert await steered_frames(bed, seed=3) == len(SOME_CLASSES)


@pytest.mark.vnet_guest(rss=False)
async def test_hash_reports_without_rss_hash_every_frame_and_steer_none(
        vnet_guest: VnetGuest) -> None:
    """A device offering hash reports but not RSS: the driver sends
    VIRTIO_NET_CTRL_MQ_HASH_CONFIG; frames are hashed and reported, all to the default
    queue."""
    bed = vnet_guest
    status = await status_when(bed.monitor, lambda s: s["rss"] is not None)
    assert status["rss-state"] == {"enabled": True, "redirect": False,
                                   "populate-hash": True}
    assert "VIRTIO_NET_F_RSS" not in status["features"]["negotiated"]
    assert "VIRTIO_NET_F_HASH_REPORT" in status["features"]["negotiated"]
    config = bed.daemon.mirror.status.rss
    assert config.indirection_table == (config.unclassified_queue,)
    await bed.monitor.execute("vnet-set-reports", {"enable": True})
    await check_traffic(bed, config, seed=4)


async def test_a_failed_attach_is_an_event_and_query_vnet_says_detached(
        vnet_guest: VnetGuest) -> None:
    bed = vnet_guest
    await wait_mirrored(bed.monitor, await bed.rss.read_config())
    # The control queue's fd now names something that takes no steering program.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, bed.daemon.control_fd)
    os.close(devnull)
    await bed.rss.set_rxfh(key=bytes(range(9, 49)))
    failed = await next_event(bed.monitor, "VNET_SYNC_FAILED")
    assert failed["data"]["stage"] == "steering"
    status = await bed.monitor.execute("query-vnet")
    assert not status["steering"]["attached"]
    assert status["mirror"]["failure"]["stage"] == "steering"


async def test_an_attached_daemon_detaches_its_program_on_exit(tmp_path: Path) -> None:
    """The tap outlives the daemon. The test keeps the program's counters map open: frames
    sent into the tap count there while the program is attached, and no longer once the
    daemon has gone."""
    need_guest()
    need_bcc()
    async with boot_guest(GuestOptions(queues=2, extra_args=("-msg", "timestamp=on"))) as guest:
        silence_host_stack(guest.tap_name)
        rss = GuestRss(guest.agent)
        await rss.enable_rxhash()
        await rss.set_rxfh(equal=2)
        frames = [p.frame for p in make_batch(guest.mac, per_class=1, seed=6,
                                              classes=SOME_CLASSES)]
        monitor_path = tmp_path / "monitor.sock"
        async with launch.attached(guest.qmp_socket, guest.tap_name, tmp_path / "run",
                                   monitor_path) as daemon:
            serving = asyncio.create_task(daemon.serve())
            client = QMPClient("test")
            await client.connect(str(monitor_path))
            await wait_mirrored(client, await rss.read_config())
            counters = os.dup(daemon.program.map_fds["counters"])
            try:
                before = counted_frames(counters)
                with Injector(guest.tap_name) as injector:
                    injector.send_all(frames)
                assert counted_frames(counters) == before + len(frames)
                daemon.request_stop("test over")
                await serving
                await client.disconnect()
            except BaseException:
                os.close(counters)
                raise
        try:
            before = counted_frames(counters)
            with Injector(guest.tap_name) as injector:
                injector.send_all(frames)
            assert counted_frames(counters) == before, "the tap still runs the program"
        finally:
            os.close(counters)
        assert guest.qemu.returncode is None


async def test_qemu_rejecting_a_guest_command_is_an_event(vnet_guest: VnetGuest) -> None:
    """QEMU writes virtio_net_rss_error for a command it refuses. A stock Linux guest
    sends none (its driver checks first), so the line is appended to the trace log as
    QEMU would write it."""
    bed = vnet_guest
    await wait_mirrored(bed.monitor, await bed.rss.read_config())
    line = (f"{bed.guest.qemu.pid}@{time.time():.6f}:virtio_net_rss_error "
            "Invalid key size, value 0x00000050\n")
    with open(bed.daemon.trace_log, "a") as log:
        log.write(line)
    rejected = await next_event(bed.monitor, "VNET_GUEST_RSS_REJECTED")
    assert rejected["data"]["qemu-says"] == "Invalid key size, value 0x00000050"


async def test_a_driver_reset_is_seen_and_renegotiated(vnet_guest: VnetGuest) -> None:
    bed = vnet_guest
    await wait_mirrored(bed.monitor, await bed.rss.read_config())
    device = (await bed.guest.agent.check(
        "basename $(readlink /sys/class/net/eth0/device)")).strip()
    driver = "/sys/bus/virtio/drivers/virtio_net"
    await bed.guest.agent.check(f"echo {device} > {driver}/unbind")
    reset = await next_event(bed.monitor, "VNET_DRIVER_RESET")
    assert reset["data"]["driver-ready"] is False
    await bed.guest.agent.check(f"echo {device} > {driver}/bind && ip link set eth0 up")
    negotiated = await next_event(bed.monitor, "VNET_NEGOTIATED")
    assert {"VIRTIO_NET_F_RSS", "VIRTIO_NET_F_HASH_REPORT"} <= set(
        negotiated["data"]["negotiated"])
    await bed.rss.enable_rxhash()
    await bed.rss.set_rxfh(key=bytes(range(13, 53)), equal=3)
    status = await wait_mirrored(bed.monitor, await bed.rss.read_config())
    assert status["steering"]["attached"]


async def test_a_key_shorter_than_the_device_takes_is_refused_by_the_guest(
        vnet_guest: VnetGuest) -> None:
    """The device offers 40-byte keys; ethtool in the guest refuses a 20-byte one, so
    nothing reaches QEMU and the mirror stays as it was."""
    bed = vnet_guest
    config = await bed.rss.read_config()
    before = await wait_mirrored(bed.monitor, config)
    with pytest.raises(GuestCommandError):
        await bed.rss.set_rxfh(key=bytes(range(20)))
    after = await bed.monitor.execute("query-vnet")
    assert same_rss(after["rss"], config) and after["steering"]["attached"]
    assert after["mirror"]["syncs"] == before["mirror"]["syncs"]
    assert await bed.rss.read_config() == config
