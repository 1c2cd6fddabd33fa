"""Guest driver behaviour (Linux 6.1 and 6.12 virtio_net) that the test bed works around.

Kept as data with the evidence beside it, like QEMU's departures: the bed's defaults
(`vnetbackend.testbed.guest.GuestOptions`) follow from these, and
``tests/guest/test_driver_issues.py`` shows each still happens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DriverIssue:
    """A behaviour of the guest's driver (with QEMU) that the bed must work around."""

    name: str
    description: str
    evidence: str
    workaround: str
    #: The guest kernel series (major, minor) it was seen on.
    seen_on: tuple[tuple[int, int], ...]

    def concerns(self, kernel_release: str) -> bool:
        """Whether a guest running *kernel_release* (``uname -r``) has this issue."""
        return kernel_series(kernel_release) in self.seen_on


def kernel_series(kernel_release: str) -> tuple[int, int] | None:
    """(6, 12) for "6.12.95+deb12-amd64"; None for a release that does not start so."""
    parts = kernel_release.split(".", 2)
    if len(parts) < 2 or not parts[0].isdigit():
        return None
    minor = "".join(itertools.takewhile(str.isdigit, parts[1]))
    return (int(parts[0]), int(minor)) if minor else None


STALE_MAX_TX_VQ = DriverIssue(
    name="linux-6.1-stale-max-tx-vq",
    description="Linux 6.1's virtio_net fills max_tx_vq of every RSS command with the queue "
                "pair count it had at probe time (one per CPU), even after ethtool -L "
                "raised it. QEMU 7.2 takes max_tx_vq as the number of active pairs, so the "
                "guest uses N queues while QEMU serves fewer (A): a frame RSS steers to "
                "queue q >= A arrives on queue q mod A, with the right hash.",
    evidence="2 vCPUs, 4 queue pairs, ethtool -L combined 4, then -X equal 4: frames the "
             "model steers to queues 2 and 3 arrived on queues 0 and 1; QMP "
             "x-query-virtio-queue-status of rx queue 2 kept used-idx 0",
    workaround="boot with as many vCPUs as queue pairs and only lower the count with "
               "ethtool -L (GuestOptions.cpus defaults to queues)",
    seen_on=((6, 1),),
)

SHIFTED_RSS_KEY = DriverIssue(
    name="linux-6.12-shifted-rss-key",
    description="Linux 6.12's virtio_net sends its RSS command's trailer (max_tx_vq, "
                "hash_key_length) with the struct's tail padding byte, and the key after "
                "it: the device reads the key starting at that padding byte (fixed "
                "upstream by 'virtio_net: Fix misalignment bug in struct virtnet_info', "
                "not in Debian's 6.12.95). The device, "
                "and so every hash the guest receives, uses 00 followed by the first 39 "
                "bytes of the key ethtool -x shows.",
    evidence="QEMU 7.2.22 and 10.0.2, guest 6.12.95+deb12: after ethtool -X hkey "
             "31:32:...:58 the device state's RSS key read 00 31 32 ... 57, and so did "
             "the boot-time key (the driver's random key, shifted the same way)",
    workaround="the bed expects the device's key (`device_key`), not the one ethtool -x "
               "shows, for guests with this issue",
    seen_on=((6, 12),),
)


RSS_OFF_AFTER_SET_CHANNELS = DriverIssue(
    name="linux-6.1-rss-off-after-set-channels",
    description="ethtool -L makes Linux 6.1's virtio_net send VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, "
                "on which QEMU switches RSS off, and 6.1 does not send its RSS "
                "configuration again: RSS stays off until the next ethtool -X. Linux 6.12 "
                "sends it again (with a table over the new channel count).",
    evidence="QEMU 7.2.22 with 6.1.192: after ethtool -L combined 2 the device state "
             "holds no RSS subsection; QEMU 10.0.2 with 6.12.95: RSS on, the table over "
             "queues 0 and 1",
    workaround="a test that wants RSS switched off by the guest uses ethtool -L on a "
               "guest with this issue; on others, -L keeps RSS on",
    seen_on=((6, 1),),
)


def device_key(guest_key: bytes, kernel_release: str) -> bytes:
    """The key the device holds when the guest's ethtool shows *guest_key*."""
    if SHIFTED_RSS_KEY.concerns(kernel_release):
        return bytes(1) + guest_key[:-1]
    return guest_key


def folded_queue(queue: int, active_pairs: int) -> int:
    """Where a frame steered to *queue* arrives when QEMU serves *active_pairs* pairs."""
    return queue % active_pairs
