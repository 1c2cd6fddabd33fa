"""Feature negotiation as QMP reports it, with RSS and hash reports offered or not."""

from __future__ import annotations

import pytest
from qemu.qmp import QMPClient

from tests.guest.conftest import RssBed, need_guest
from vnetbackend.qemu.features import (
    CTRL_VQ,
    HASH_REPORT,
    MQ,
    RSS,
    Negotiation,
    query_features,
)
from vnetbackend.testbed.guest import GuestOptions, boot_guest

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="session")]


async def test_rss_and_hash_report_negotiated(rss_bed: RssBed):
    need_guest()
    qmp = QMPClient("negotiation-test")
    await qmp.connect(str(rss_bed.guest.qmp_socket))
    try:
        features = await query_features(qmp)
    finally:
        await qmp.disconnect()
    assert features.path == "/machine/peripheral/vnet0/virtio-backend"
    assert features.driver_ok
    assert {RSS, HASH_REPORT, MQ, CTRL_VQ} <= features.negotiated
    assert features.state(RSS) is Negotiation.NEGOTIATED
    assert features.state(HASH_REPORT) is Negotiation.NEGOTIATED


async def test_rss_and_hash_report_absent_when_switched_off():
    need_guest()
    # Eight queue pairs on two vCPUs: also shows the device takes the largest queue count.
    options = GuestOptions(queues=8, cpus=2, rss=False, hash_report=False)
    async with boot_guest(options) as guest:
        features = await query_features(guest.control)
        status = await guest.control.execute("x-query-virtio-status", {"path": features.path})
    assert status["num-vqs"] == 2 * 8 + 1
    assert features.driver_ok
    assert {MQ, CTRL_VQ} <= features.negotiated
    assert RSS not in features.offered | features.negotiated
    assert HASH_REPORT not in features.offered | features.negotiated
    assert features.state(RSS) is Negotiation.NOT_OFFERED
