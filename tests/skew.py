"""Skewing a loaded steering program's live configuration in place, as a fault would.

Tests use this to show that a wrong map entry is caught (by the read-back check or by
the hash check), frame by frame. It writes the live slot through the map's fd, beside
the loader, which never writes a live slot.
"""

from __future__ import annotations

import ctypes as ct
import os

from bcc.libbcc import lib

from vnetbackend.steering.layout import SLOT_COUNT, RssSlot, SteeringControl
from vnetbackend.steering.program import SteeringProgram


def _call(result: int, what: str) -> None:
    if result < 0:
        raise OSError(ct.get_errno(), f"{what}: {os.strerror(ct.get_errno())}")


def live_slot(program: SteeringProgram) -> tuple[int, RssSlot]:
    """(index, contents) of the live slot, read through the maps' fds."""
    fds = program.map_fds
    zero, control = ct.c_uint32(0), SteeringControl()
    _call(lib.bpf_lookup_elem(fds["control"], ct.byref(zero), ct.byref(control)), "control")
    index, slot = ct.c_uint32(control.active_slot % SLOT_COUNT), RssSlot()
    _call(lib.bpf_lookup_elem(fds["rss_slots"], ct.byref(index), ct.byref(slot)), "rss_slots")
    return index.value, slot


def _write_slot(program: SteeringProgram, index: int, slot: RssSlot) -> None:
    key = ct.c_uint32(index)
    _call(lib.bpf_update_elem(program.map_fds["rss_slots"], ct.byref(key), ct.byref(slot), 0),
          "rss_slots update")


def skew_indirection_entry(program: SteeringProgram, index: int, queue: int) -> None:
    """Overwrite indirection entry *index* of the live slot with *queue*."""
    slot_index, slot = live_slot(program)
    if not 0 <= index < slot.table_length:
        raise IndexError(f"indirection entry {index} outside 0..{slot.table_length - 1}")
    slot.indirection[index] = queue
    _write_slot(program, slot_index, slot)


def skew_toeplitz_entry(program: SteeringProgram, position: int, byte: int, value: int) -> None:
    """Overwrite the live slot's Toeplitz table entry for *byte* at input *position*."""
    slot_index, slot = live_slot(program)
    slot.toeplitz[position][byte] = value
    _write_slot(program, slot_index, slot)
