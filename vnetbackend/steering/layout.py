"""The steering program's map values and report record, mirrored from bpf/steering.bpf.c.

Each class here is the ctypes twin of the C struct of the same name; the tests compare
them field by field with the types bcc derives from the compiled program.
"""

from __future__ import annotations

import ctypes as ct

from vnetbackend.rss.types import MAX_HASH_INPUT, MAX_KEY_SIZE, MAX_TABLE_LENGTH

#: Slots of `rss_slots`: the program reads the active one, the loader writes the other.
SLOT_COUNT = 2

REPORT_FLAG_EXT_HEADERS = 1
REPORT_FLAG_FRAGMENT = 2


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


class SteeringReport(ct.Structure):
    """One ring-buffer record (``struct steering_report``)."""

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
    ]


#: C struct name -> its mirror.
MIRRORS: dict[str, type[ct.Structure]] = {
    "rss_slot": RssSlot,
    "steering_control": SteeringControl,
    "steering_counters": SteeringCounters,
    "steering_report": SteeringReport,
}


def layout_defines() -> list[str]:
    """Compiler flags that hand the mirrors' sizes and offsets to the C static asserts."""
    flags = []
    for c_name, mirror in MIRRORS.items():
        flags.append(f"-DLAYOUT_{c_name}_size={ct.sizeof(mirror)}")
        for field_name, *_ in mirror._fields_:
            offset = getattr(mirror, field_name).offset
            flags.append(f"-DLAYOUT_{c_name}_{field_name}={offset}")
    return flags
