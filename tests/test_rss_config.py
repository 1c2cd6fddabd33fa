"""RssConfig validation and steering decisions."""

from __future__ import annotations

import pytest

from vnetbackend.rss import HashReport, InvalidRssConfig, RssConfig, parse_hash_types
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.testbed import frames as f

GOOD = {"hash_types": 0x3F, "key": MICROSOFT_KEY, "indirection_table": [0, 1, 2, 3],
        "queues": 4, "unclassified_queue": 0}


@pytest.mark.parametrize(("field", "value", "named"), [
    ("key", b"", "key"),
    ("key", bytes(41), "key"),
    ("key", "6d5a", "key"),
    ("indirection_table", [0, 1, 2], "indirection_table"),
    ("indirection_table", [], "indirection_table"),
    ("indirection_table", [0] * 256, "indirection_table"),
    ("indirection_table", [0, 1, 2, 4], "indirection_table[3]"),
    ("indirection_table", [0, -1], "indirection_table[1]"),
    ("indirection_table", [0, "1"], "indirection_table[1]"),
    ("indirection_table", 5, "indirection_table"),
    ("unclassified_queue", 4, "unclassified_queue"),
    ("unclassified_queue", -1, "unclassified_queue"),
    ("hash_types", 0x200, "hash_types"),
    ("hash_types", -1, "hash_types"),
    ("hash_types", 1 << 31, "hash_types"),
    ("hash_types", True, "hash_types"),
    ("queues", 0, "queues"),
    ("queues", 0x8001, "queues"),
])
def test_out_of_spec_values_are_refused_by_name(field: str, value: object, named: str) -> None:
    with pytest.raises(InvalidRssConfig) as caught:
        RssConfig(**{**GOOD, field: value})
    assert caught.value.field == named
    assert named in str(caught.value)


def test_limits_themselves_are_accepted() -> None:
    config = RssConfig(hash_types=0x1FF, key=bytes(40), indirection_table=[7] * 128,
                       queues=8, unclassified_queue=7)
    assert len(config.indirection_table) == 128
    assert RssConfig(**{**GOOD, "key": b"\x01", "indirection_table": [3]}).key == b"\x01"


def test_config_is_immutable_and_comparable() -> None:
    config = RssConfig(**GOOD)
    assert config == RssConfig(**{**GOOD, "indirection_table": (0, 1, 2, 3)})
    with pytest.raises(AttributeError):
        config.queues = 8  # type: ignore[misc]


def test_unclassified_frames_go_to_the_unclassified_queue() -> None:
    config = RssConfig(**{**GOOD, "unclassified_queue": 3})
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    assert config.steer(arp) == (0, HashReport.NONE, 3, b"")


def test_queue_comes_from_the_table_by_the_low_hash_bits() -> None:
    frame = f.frame(f.ipv4("66.9.149.187", "161.142.100.80", f.tcp(2794, 1766)))
    table = [3, 2, 1, 0] * 4
    result = RssConfig(**{**GOOD, "indirection_table": table}).steer(frame)
    assert result.hash == 0x51CCC178
    assert result.queue == table[0x51CCC178 & 15]


def test_parse_hash_types_names_and_masks() -> None:
    assert parse_hash_types("ipv4,tcpv4,udpv4") == 0x7
    assert parse_hash_types("IPv6, tcp_ex") == 0x88
    assert parse_hash_types("0x1ff") == 0x1FF
    with pytest.raises(ValueError, match="sctp"):
        parse_hash_types("ipv4,sctp")
    with pytest.raises(ValueError, match="unknown bits"):
        parse_hash_types("0x400")


def test_report_names_follow_the_specification() -> None:
    assert HashReport.TCPV4.virtio_name == "VIRTIO_NET_HASH_REPORT_TCPv4"
    assert HashReport.UDPV6_EX.virtio_name == "VIRTIO_NET_HASH_REPORT_UDPv6_EX"
    assert HashReport.IPV6_EX.virtio_name == "VIRTIO_NET_HASH_REPORT_IPv6_EX"
    assert HashReport.NONE.virtio_name == "VIRTIO_NET_HASH_REPORT_NONE"
    assert [r.is_l4 for r in (HashReport.IPV4, HashReport.TCPV6_EX)] == [False, True]
