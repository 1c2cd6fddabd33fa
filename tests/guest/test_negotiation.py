"""Feature negotiation as QMP reports it, with RSS and hash reports offered or not."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.guest.conftest import RssBed, need_guest
from vnetbackend import tap
from vnetbackend.qemu.command import DEVICE_ID
from vnetbackend.qemu.device import NetDevice, find_net_device
from vnetbackend.qemu.features import (
    CTRL_VQ,
    HASH_REPORT,
    MQ,
    RSS,
    Negotiation,
    VirtioFeatures,
    query_features,
)
from vnetbackend.testbed.guest import GuestOptions, boot_guest, unique_tap_name
from vnetbackend.testbed.image import find_guest_image
from vnetbackend.testbed.vm import QemuProcess, VmSpec

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="session")]


async def _features_over(socket: Path) -> tuple[NetDevice, VirtioFeatures]:
    """The device and its features, asked over a QMP connection of our own to *socket*."""
    qmp = QMPClient("negotiation-test")
    await qmp.connect(str(socket))
    try:
        device = await find_net_device(qmp, DEVICE_ID)
        return device, await query_features(qmp, device)
    finally:
        await qmp.disconnect()


async def test_rss_and_hash_report_negotiated(rss_bed: RssBed):
    need_guest()
    device, features = await _features_over(rss_bed.guest.qmp_socket)
    assert device.virtio_path == "/machine/peripheral/vnet0/virtio-backend"
    assert features.driver_ok
    assert {RSS, HASH_REPORT, MQ, CTRL_VQ} <= features.negotiated
    assert features.state(RSS) is Negotiation.NEGOTIATED
    assert features.state(HASH_REPORT) is Negotiation.NEGOTIATED


async def test_rss_and_hash_report_absent_when_switched_off():
    need_guest()
    # Eight queue pairs on two vCPUs: also shows the device takes the largest queue count.
    options = GuestOptions(queues=8, cpus=2, rss=False, hash_report=False)
    async with boot_guest(options) as guest:
        device = await find_net_device(guest.control, DEVICE_ID)
        features = await query_features(guest.control, device)
        status = await guest.control.execute("x-query-virtio-status",
                                             {"path": device.virtio_path})
    assert status["num-vqs"] == 2 * 8 + 1
    assert features.driver_ok
    assert {MQ, CTRL_VQ} <= features.negotiated
    assert RSS not in features.offered | features.negotiated
    assert HASH_REPORT not in features.offered | features.negotiated
    assert features.state(RSS) is Negotiation.NOT_OFFERED


async def test_driver_not_ready_is_a_state(tmp_path: Path):
    """Before the guest runs, RSS is offered and negotiation is simply not done yet."""
    need_guest()
    image = find_guest_image()
    assert image is not None
    name = unique_tap_name()
    await asyncio.to_thread(tap.create_tap, name)
    fd = await asyncio.to_thread(tap.open_queue, name)
    qemu = None
    try:
        spec = VmSpec(kernel=image.kernel, initrd=image.initrd, tap_fds=(fd,),
                      run_dir=tmp_path, paused=True, agent_port=False)
        qemu = await QemuProcess.start(spec)
        _, features = await _features_over(spec.paths.qmp_socket)
    finally:
        if qemu is not None:
            await qemu.stop()
        os.close(fd)
        await asyncio.to_thread(tap.delete_tap, name)
    assert {RSS, HASH_REPORT} <= features.offered
    assert not features.negotiated
    assert not features.features_ok
    assert features.state(RSS) is Negotiation.DRIVER_NOT_READY
