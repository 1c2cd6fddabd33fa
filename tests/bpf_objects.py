"""Reading a steering program's counters through a map fd the test holds itself.

A test that dups the ``counters`` map's fd keeps the map readable after the program's
owner has closed it; frames a still-attached program steers would count there.
"""

from __future__ import annotations

import ctypes as ct
import os

from bcc.libbcc import lib
from bcc.utils import get_possible_cpus

from vnetbackend.steering.layout import SteeringCounters


def counted_frames(counters_fd: int) -> int:
    """Frames the program ran on, over all CPUs, as its ``counters`` map says."""
    per_cpu = (SteeringCounters * len(get_possible_cpus()))()
    key = ct.c_uint32(0)
    if lib.bpf_lookup_elem(counters_fd, ct.byref(key), ct.byref(per_cpu)) < 0:
        err = ct.get_errno()
        raise OSError(err, f"counters lookup: {os.strerror(err)}")
    return sum(cpu.frames for cpu in per_cpu)
