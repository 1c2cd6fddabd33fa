"""BPF_PROG_TEST_RUN through the bpf(2) system call (bcc 0.26 does not wrap it).

For a socket filter the kernel builds an skb from the frame (pulling the Ethernet header
as a receive path would), runs the program *repeat* times and gives back the last return
value and the mean run time in nanoseconds. It refuses frames shorter than an Ethernet
header, and IPv4/IPv6 frames (by their outer ethertype) too short for the bare IP header:
those reach the program only through a real device (see `runnable`).
"""

from __future__ import annotations

import ctypes as ct
import os
from typing import NamedTuple

from vnetbackend.rss.frame import ETH_HEADER_LEN, ETH_P_IPV4, ETH_P_IPV6, outer_ethertype

SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
#: Shortest test frame the kernel takes, by outer ethertype (IPv4 and IPv6 headers).
_MIN_LEN_BY_ETHERTYPE = {ETH_P_IPV4: ETH_HEADER_LEN + 20, ETH_P_IPV6: ETH_HEADER_LEN + 40}

_libc = ct.CDLL(None, use_errno=True)


class _TestRunAttr(ct.Structure):
    """The ``test`` member of ``union bpf_attr``."""

    _fields_ = [
        ("prog_fd", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("data_in", ct.c_uint64),
        ("data_out", ct.c_uint64),
        ("repeat", ct.c_uint32),
        ("duration", ct.c_uint32),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("ctx_in", ct.c_uint64),
        ("ctx_out", ct.c_uint64),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


class RunResult(NamedTuple):
    """The program's return value (last run) and its mean run time."""

    retval: int
    duration_ns: int


def min_frame_len(frame: bytes) -> int:
    """The shortest frame with *frame*'s outer ethertype that the kernel will test-run."""
    if len(frame) < ETH_HEADER_LEN:
        return ETH_HEADER_LEN
    return _MIN_LEN_BY_ETHERTYPE.get(outer_ethertype(frame), ETH_HEADER_LEN)


def runnable(frame: bytes) -> bool:
    """Whether BPF_PROG_TEST_RUN accepts *frame* (short IP frames it refuses)."""
    return len(frame) >= min_frame_len(frame)


def prog_test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> RunResult:
    """Run program *prog_fd* on *frame* *repeat* times.

    ValueError for a frame the kernel would refuse as too short (see `runnable`),
    OSError if the kernel refuses anything else.
    """
    if not runnable(frame):
        raise ValueError(f"BPF_PROG_TEST_RUN needs at least {min_frame_len(frame)} bytes for "
                         f"this frame, got {len(frame)}")
    data = ct.create_string_buffer(bytes(frame), len(frame))
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(frame),
                        data_in=ct.addressof(data), repeat=repeat)
    if _libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ct.byref(attr), ct.sizeof(attr)) < 0:
        err = ct.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN on prog fd {prog_fd}: {os.strerror(err)}")
    return RunResult(attr.retval, attr.duration)
