"""Queues as the device really uses them, beside the guest's view of them.

tun hands a frame to the steering program's answer modulo the number of queues attached
to the tap, and QEMU keeps as many attached as the device's active queue pairs
(``curr_queue_pairs``). The guest's RSS table, though, can name queues the device has not
made active: a driver that sends a stale ``max_tx_vq`` (Linux 6.1 keeps its probe-time
count, `vnetbackend.testbed.driver_issues`), or a table set before ``ethtool -L`` lowered
the channels. The specification asks the driver to name only enabled queues; where the
two views part, `account` says how, naming the cause, and which queue each named queue
really reaches (``folded``: the queue modulo the active pairs, tun's rule).

What the host cannot see: the guest's own channel count. The device learns it only as the
``max_tx_vq`` of the guest's RSS command, which QEMU turns into the active pairs; so the
account compares the guest's table with those pairs and with the pairs the device
offers.
"""

from __future__ import annotations

from typing import Any

from vnetbackend.qemu.snapshot import RssState

#: Causes `account` names.
TABLE_NAMES_INACTIVE = "table-names-inactive-queues"
DEFAULT_QUEUE_INACTIVE = "default-queue-inactive"
BEYOND_DEVICE = "table-names-queues-beyond-the-device"


def account(state: RssState | None, active_pairs: int, max_pairs: int | None,
            ) -> dict[str, Any]:
    """How the guest's RSS *state* and the device's queues agree.

    ``causes`` is empty when every queue the guest names is one the device serves.
    """
    named = set(state.indirection_table) | {state.default_queue} if (
        state is not None and state.enabled) else set()
    inactive = sorted(q for q in named if q >= active_pairs)
    causes = []
    if state is not None and state.enabled:
        if any(q >= active_pairs for q in state.indirection_table):
            causes.append(TABLE_NAMES_INACTIVE)
        if state.default_queue >= active_pairs:
            causes.append(DEFAULT_QUEUE_INACTIVE)
        if max_pairs is not None and any(q >= max_pairs for q in named):
            causes.append(BEYOND_DEVICE)
    return {
        "active-queue-pairs": active_pairs,
        "max-queue-pairs": max_pairs,
        "named-queues": sorted(named),
        "inactive-queues": inactive,
        "folded": {str(q): q % active_pairs for q in inactive} if active_pairs else {},
        "causes": causes,
    }
