"""Hash types, report types and device limits from the virtio-net specification."""

from __future__ import annotations

import enum

#: Largest RSS key the device accepts (virtio-net config `rss_max_key_size` as QEMU offers it).
MAX_KEY_SIZE = 40
#: Largest indirection table (config `rss_max_indirection_table_length` as QEMU offers it).
MAX_TABLE_LENGTH = 128
#: Most receive queues a driver may use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX).
MAX_QUEUES = 0x8000
#: Longest hash input: IPv6 source and destination addresses plus two ports.
MAX_HASH_INPUT = 36


class HashType(enum.IntFlag):
    """Bits of `hash_types` (VIRTIO_NET_RSS_HASH_TYPE_*)."""

    IPV4 = 1 << 0
    TCPV4 = 1 << 1
    UDPV4 = 1 << 2
    IPV6 = 1 << 3
    TCPV6 = 1 << 4
    UDPV6 = 1 << 5
    IP_EX = 1 << 6
    TCP_EX = 1 << 7
    UDP_EX = 1 << 8


ALL_HASH_TYPES = HashType(0x1FF)

_TYPE_NAMES = {
    "ipv4": HashType.IPV4,
    "tcpv4": HashType.TCPV4,
    "udpv4": HashType.UDPV4,
    "ipv6": HashType.IPV6,
    "tcpv6": HashType.TCPV6,
    "udpv6": HashType.UDPV6,
    "ip_ex": HashType.IP_EX,
    "tcp_ex": HashType.TCP_EX,
    "udp_ex": HashType.UDP_EX,
}


class HashReport(enum.IntEnum):
    """Values of `hash_report` in the received packet's header (VIRTIO_NET_HASH_REPORT_*)."""

    NONE = 0
    IPV4 = 1
    TCPV4 = 2
    UDPV4 = 3
    IPV6 = 4
    TCPV6 = 5
    UDPV6 = 6
    IPV6_EX = 7
    TCPV6_EX = 8
    UDPV6_EX = 9

    @property
    def virtio_name(self) -> str:
        """The name the specification uses, e.g. ``VIRTIO_NET_HASH_REPORT_TCPv4``."""
        return "VIRTIO_NET_HASH_REPORT_" + self.name.replace("V4", "v4").replace("V6", "v6")

    @property
    def is_l4(self) -> bool:
        """Whether the hash covers transport ports."""
        return self in _L4_REPORTS


_L4_REPORTS = frozenset(
    {HashReport.TCPV4, HashReport.UDPV4, HashReport.TCPV6, HashReport.UDPV6,
     HashReport.TCPV6_EX, HashReport.UDPV6_EX}
)


def parse_hash_types(text: str) -> HashType:
    """Read a hash-type mask: a hex number (``0x3f``) or comma-separated virtio names.

    Raises ValueError naming the first word it does not know.
    """
    text = text.strip()
    if text.lower().startswith("0x"):
        try:
            mask = int(text, 16)
        except ValueError:
            raise ValueError(f"hash types: {text!r} is not a hex mask") from None
        unknown = mask & ~int(ALL_HASH_TYPES)
        if unknown:
            raise ValueError(f"hash types: unknown bits 0x{unknown:x} in {text}")
        return HashType(mask)
    mask = HashType(0)
    for word in filter(None, (w.strip().lower() for w in text.split(","))):
        if word not in _TYPE_NAMES:
            known = ",".join(_TYPE_NAMES)
            raise ValueError(f"hash types: unknown name {word!r} (known: {known})")
        mask |= _TYPE_NAMES[word]
    return mask


def format_hash_types(mask: int) -> list[str]:
    """The virtio names of the bits set in *mask*, in bit order."""
    return [name for name, bit in _TYPE_NAMES.items() if mask & bit]
