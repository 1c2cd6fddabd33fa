"""The queue account: the guest's table against the queues the device serves."""

from __future__ import annotations

from vnetbackend.qemu.snapshot import RssState
from vnetbackend.queue_account import (
    BEYOND_DEVICE,
    DEFAULT_QUEUE_INACTIVE,
    TABLE_NAMES_INACTIVE,
    account,
)


def _state(table: tuple[int, ...], default: int = 0, enabled: bool = True) -> RssState:
    return RssState(enabled=enabled, redirect=True, populate_hash=True, hash_types=0x3F,
                    default_queue=default, key=bytes(40), indirection_table=table)


def test_a_table_within_the_active_pairs_agrees() -> None:
    found = account(_state((0, 1, 0, 1)), active_pairs=2, max_pairs=4)
    assert found["causes"] == [] and found["inactive-queues"] == [] and found["folded"] == {}
    assert found["named-queues"] == [0, 1]


def test_a_stale_max_tx_vq_table_is_named_and_folded_as_tun_does() -> None:
    # Linux 6.1 with 4 channels on 2 vCPUs: the table names 0..3, the device serves 2.
    found = account(_state((0, 1, 2, 3)), active_pairs=2, max_pairs=4)
    assert found["causes"] == [TABLE_NAMES_INACTIVE]
    assert found["inactive-queues"] == [2, 3]
    assert found["folded"] == {"2": 0, "3": 1}


def test_every_cause_is_named() -> None:
    found = account(_state((0, 5), default=3), active_pairs=3, max_pairs=4)
    assert found["causes"] == [TABLE_NAMES_INACTIVE, DEFAULT_QUEUE_INACTIVE, BEYOND_DEVICE]
    assert found["folded"] == {"3": 0, "5": 2}


def test_rss_off_names_nothing() -> None:
    assert account(None, 1, 4)["causes"] == []
    assert account(_state((3,), enabled=False), 1, 4)["causes"] == []
