"""Evidence for the guest driver behaviour the bed works around (see driver_issues.py)."""

from __future__ import annotations

import pytest

from tests.guest.conftest import need_guest
from vnetbackend.checker import expectation
from vnetbackend.qemu.command import DEVICE_ID
from vnetbackend.qemu.device import find_net_device
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.testbed.batch import observe_batch
from vnetbackend.testbed.driver_issues import STALE_MAX_TX_VQ, folded_queue
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import GuestOptions, boot_guest
from vnetbackend.testbed.injector import silence_host_stack
from vnetbackend.testbed.observer import RxObserver
from vnetbackend.testbed.traffic import make_batch

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="session")]


async def test_stale_max_tx_vq_folds_queues_beyond_the_boot_count():
    """On a guest with the issue (Linux 6.1), frames for queues 2 and 3 arrive on 0 and 1
    and rx queue 2 stays unused; on one without it (6.12), every queue serves its own."""
    need_guest()
    async with boot_guest(GuestOptions(queues=4, cpus=2)) as guest:
        silence_host_stack(guest.tap_name)
        rss, observer = GuestRss(guest.agent), RxObserver(guest.agent)
        await rss.set_channels(4)
        await rss.enable_rxhash()
        await rss.set_rxfh(MICROSOFT_KEY, equal=4)
        await observer.start()
        config = await rss.read_config()
        assert config.queues == 4
        probes = make_batch(guest.mac, per_class=6, seed=2,
                            classes=["ipv4_tcp", "ipv4_udp", "ipv6_tcp", "ipv6_udp"])
        records = {(r.l3_len, r.protocol): r
                   for r in await observe_batch(guest.tap_name, observer, probes)}
        device = await find_net_device(guest.control, DEVICE_ID)
        rx2 = await guest.control.execute("x-query-virtio-queue-status",
                                          {"path": device.virtio_path, "queue": 4})
    expected = [expectation(config, p.frame) for p in probes]
    assert {e.queue for e in expected} == {0, 1, 2, 3}
    seen = [records[p.l3_len, p.ethertype] for p in probes]
    served = 2 if STALE_MAX_TX_VQ.concerns(guest.kernel_release) else 4
    assert [(r.queue, r.hash) for r in seen] == [
        (folded_queue(e.queue, served), e.hash) for e in expected]
    assert (rx2["used-idx"] == 0) == (served == 2)
