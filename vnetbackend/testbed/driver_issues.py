"""Guest driver behaviour (Linux 6.1 with QEMU 7.2) that the test bed works around.

Kept as data with the evidence beside it, like QEMU's departures: the bed's defaults
(`vnetbackend.testbed.guest.GuestOptions`) follow from these, and
``tests/guest/test_driver_issues.py`` shows each still happens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DriverIssue:
    """A behaviour of the guest's driver (with QEMU) that the bed must work around."""

    name: str
    description: str
    evidence: str
    workaround: str


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
)


def folded_queue(queue: int, active_pairs: int) -> int:
    """Where a frame steered to *queue* arrives when QEMU serves *active_pairs* pairs."""
    return queue % active_pairs
