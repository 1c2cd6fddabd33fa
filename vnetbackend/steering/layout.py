"""The steering program's map values and report record, mirrored from bpf/steering.bpf.c.

Each class here is the ctypes twin of the C struct of the same name; the tests compare
them field by field with the types bcc derives from the compiled program. The program
checks these layouts, and every constant it shares with the Python side, at compile time
against the flags `layout_defines` gives the loader.
"""

from __future__ import annotations

import ctypes as ct

from vnetbackend.rss.frame import (
    ETH_HEADER_LEN,
    ETH_P_IPV4,
    ETH_P_IPV6,
    HOME_ADDRESS_OPTION,
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MAX_VLAN_TAGS,
    VLAN_TPIDS,
)
from vnetbackend.rss.types import (
    MAX_HASH_INPUT,
    MAX_KEY_SIZE,
    MAX_TABLE_LENGTH,
    HashReport,
    HashType,
)

#: Slots of `rss_slots`: the program reads the active one, the loader writes the other.
SLOT_COUNT = 2

REPORT_FLAG_EXT_HEADERS = 1
REPORT_FLAG_FRAGMENT = 2
#: The hash took the home address option's address (``ex_src``) for the source.
REPORT_FLAG_EX_SRC = 4
#: The hash took the type 2 routing header's address (``ex_dst``) for the destination.
REPORT_FLAG_EX_DST = 8


class RssSlot(ct.Structure):
    """One complete RSS configuration (``struct rss_slot``)."""

    _fields_ = [
        ("enabled", ct.c_uint32),
        ("redirect", ct.c_uint32),
        ("hash_types", ct.c_uint32),
        ("table_length", ct.c_uint32),
        ("unclassified_queue", ct.c_uint32),
        ("queues", ct.c_uint32),
        ("key_length", ct.c_uint32),
        ("generation", ct.c_uint32),
        ("key", ct.c_uint8 * MAX_KEY_SIZE),
        ("indirection", ct.c_uint16 * MAX_TABLE_LENGTH),
        ("toeplitz", (ct.c_uint32 * 256) * MAX_HASH_INPUT),
    ]


class SteeringControl(ct.Structure):
    """Which slot is live and how often to report (``struct steering_control``)."""

    _fields_ = [
        ("active_slot", ct.c_uint32),
        ("report_every", ct.c_uint32),
    ]


class SteeringCounters(ct.Structure):
    """Per-CPU counters (``struct steering_counters``)."""

    _fields_ = [
        ("frames", ct.c_uint64),
        ("reports", ct.c_uint64),
        ("reports_dropped", ct.c_uint64),
        ("until_report", ct.c_uint64),
    ]


class ReportCursor(ct.Structure):
    """Where one CPU's report ring stands (``struct report_cursor``): the program writes
    ``head``, the reader ``tail``, each on its own cache line."""

    _fields_ = [
        ("head", ct.c_uint64),
        ("head_line", ct.c_uint64 * 7),
        ("tail", ct.c_uint64),
        ("tail_line", ct.c_uint64 * 7),
    ]


class SteeringReport(ct.Structure):
    """One report record (``struct steering_report``). Only the address bytes the IP
    version uses are written; the rest of ``src`` and ``dst`` is undefined, and so are
    ``ex_src``/``ex_dst`` unless the flags `REPORT_FLAG_EX_SRC`/`REPORT_FLAG_EX_DST` say
    the hash took them. ``generation`` is that of the slot that steered the frame."""

    _fields_ = [
        ("hash", ct.c_uint32),
        ("queue", ct.c_uint16),
        ("report_type", ct.c_uint8),
        ("ip_version", ct.c_uint8),
        ("l4_proto", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("l3_offset", ct.c_uint16),
        ("frame_len", ct.c_uint32),
        ("l3_len", ct.c_uint32),
        ("src_port", ct.c_uint16),
        ("dst_port", ct.c_uint16),
        ("src", ct.c_uint8 * 16),
        ("dst", ct.c_uint8 * 16),
        ("ex_src", ct.c_uint8 * 16),
        ("ex_dst", ct.c_uint8 * 16),
        ("generation", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


#: C struct name -> its mirror.
MIRRORS: dict[str, type[ct.Structure]] = {
    "rss_slot": RssSlot,
    "steering_control": SteeringControl,
    "steering_counters": SteeringCounters,
    "report_cursor": ReportCursor,
    "steering_report": SteeringReport,
}


def _virtio_spelling(name: str) -> str:
    """The specification's spelling of a member name: ``TCPv4`` for ``TCPV4``."""
    return name.replace("V4", "v4").replace("V6", "v6")


_TPID_8021Q, _TPID_8021AD = VLAN_TPIDS

#: The C name of each constant the program shares with the Python side -> the Python
#: value. Where a kernel uapi header defines the number, the C name is that header's macro
#: and the program compares it with the header's value.
SHARED_VALUES: dict[str, int] = {
    "MAX_KEY_SIZE": MAX_KEY_SIZE,
    "MAX_TABLE_LENGTH": MAX_TABLE_LENGTH,
    "MAX_HASH_INPUT": MAX_HASH_INPUT,
    "MAX_VLAN_TAGS": MAX_VLAN_TAGS,
    "SLOT_COUNT": SLOT_COUNT,
    "REPORT_FLAG_EXT_HEADERS": REPORT_FLAG_EXT_HEADERS,
    "REPORT_FLAG_FRAGMENT": REPORT_FLAG_FRAGMENT,
    "REPORT_FLAG_EX_SRC": REPORT_FLAG_EX_SRC,
    "REPORT_FLAG_EX_DST": REPORT_FLAG_EX_DST,
    "ETH_HLEN": ETH_HEADER_LEN,
    "ETH_P_IP": ETH_P_IPV4,
    "ETH_P_IPV6": ETH_P_IPV6,
    "ETH_P_8021Q": _TPID_8021Q,
    "ETH_P_8021AD": _TPID_8021AD,
    "IPPROTO_HOPOPTS": IPPROTO_HOPOPTS,
    "IPPROTO_TCP": IPPROTO_TCP,
    "IPPROTO_UDP": IPPROTO_UDP,
    "IPPROTO_ROUTING": IPPROTO_ROUTING,
    "IPPROTO_FRAGMENT": IPPROTO_FRAGMENT,
    "IPPROTO_AH": IPPROTO_AH,
    "IPPROTO_DSTOPTS": IPPROTO_DSTOPTS,
    "IPV6_TLV_HAO": HOME_ADDRESS_OPTION,
    **{f"VIRTIO_NET_RSS_HASH_TYPE_{_virtio_spelling(name)}": int(member)
       for name, member in HashType.__members__.items()},
    **{member.virtio_name: int(member) for member in HashReport},
}


def layout_defines() -> list[str]:
    """Compiler flags for the program's static asserts.

    ``LAYOUT_<struct>_<field>`` and ``LAYOUT_<struct>_size`` give the mirrors' offsets and
    sizes, ``PY_<name>`` each of `SHARED_VALUES`.
    """
    flags = []
    for c_name, mirror in MIRRORS.items():
        flags.append(f"-DLAYOUT_{c_name}_size={ct.sizeof(mirror)}")
        for field_name, *_ in mirror._fields_:
            offset = getattr(mirror, field_name).offset
            flags.append(f"-DLAYOUT_{c_name}_{field_name}={offset}")
    flags.extend(f"-DPY_{name}={value}" for name, value in SHARED_VALUES.items())
    return flags
