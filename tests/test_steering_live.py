"""The steering program on a real 4-queue tap: host -> tap -> program -> queue.

The test holds the tap's queue fds itself, as QEMU would, and injects frames through an
AF_PACKET socket bound to the tap. Each frame must come out of exactly the queue the
reference model predicts, and the program's report for it must match the model.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import select
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.prereq import need_bcc, need_tun
from tests.test_steering_conformance import EDGE_CASES, MS_IPV4, MS_IPV6, TRUNCATED_BASES
from vnetbackend import tap
from vnetbackend.rss import HashReport, HashType, RssConfig
from vnetbackend.rss.frame import outer_ethertype
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.steering import Report, SteeringProgram, SteeringState
from vnetbackend.steering.conformance import expected_report
from vnetbackend.steering.testrun import runnable
from vnetbackend.testbed import frames as f

QUEUES = 4
V6S, V6D = "2001:db8:7::1", "2001:db8:7::2"
WAIT_S = 2.0
_serial = itertools.count()


@dataclass
class LiveTap:
    name: str
    queues: list[int]
    control: int
    sender: socket.socket
    hdr_len: int


def _open_live_tap(name: str) -> LiveTap:
    # No IPv6 on the tap: the host would send its own frames (MLD, DAD) into the queues.
    # The tap has no carrier until a queue is attached, so nothing left before this.
    knob_path = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    if os.path.exists(knob_path):  # absent when the host has no IPv6 at all
        with open(knob_path, "w") as knob:
            knob.write("1")
    queues = [tap.open_queue(name) for _ in range(QUEUES)]
    for fd in queues:
        os.set_blocking(fd, False)
    control = tap.open_control_queue(name)
    sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sender.bind((name, 0))
    return LiveTap(name, queues, control, sender, tap.vnet_hdr_size(queues[0]))


def _close_live_tap(live: LiveTap) -> None:
    live.sender.close()
    for fd in [*live.queues, live.control]:
        os.close(fd)


@pytest.fixture(scope="module")
def program() -> Iterator[SteeringProgram]:
    need_bcc()
    with SteeringProgram() as loaded:
        yield loaded


@pytest.fixture(scope="module")
def live(program: SteeringProgram) -> Iterator[LiveTap]:
    need_tun()
    name = f"vs{os.getpid() % 100000}n{next(_serial)}"
    with tap.TapDevice(name):
        opened = _open_live_tap(name)
        try:
            program.attach(opened.control)
            yield opened
        finally:
            _close_live_tap(opened)


def _receive(live: LiveTap, until: bytes) -> list[tuple[int, bytes]]:
    """(queue, frame) for every frame read until *until* shows up; fails after WAIT_S."""
    got: list[tuple[int, bytes]] = []
    while True:
        readable, _, _ = select.select(live.queues, [], [], WAIT_S)
        assert readable, f"frame {until.hex()} never came out of any queue"
        for fd in readable:
            data = os.read(fd, 65536)
            assert len(data) >= live.hdr_len
            got.append((live.queues.index(fd), data[live.hdr_len:]))
        if any(frame == until for _, frame in got):
            return got


def _send_and_check(live: LiveTap, program: SteeringProgram, state: SteeringState,
                    frames: list[bytes],
                    arrives_as: Callable[[bytes], bytes] = lambda frame: frame,
                    protocol: Callable[[bytes], int] | None = None) -> int:
    """Send each frame; returns how many frames came out (strays included, all checked).

    *arrives_as* gives the frame as the queue delivers it (e.g. with a VLAN tag added).
    *protocol* gives the skb protocol to send a frame with (by default the kernel takes
    the frame's own ethertype).
    """
    reader = program.reports()
    reader.drain()
    seen = 0
    for frame in frames:
        if protocol is None:
            assert live.sender.send(frame) == len(frame)
        else:
            assert live.sender.sendto(frame, (live.name, protocol(frame))) == len(frame)
        received = _receive(live, arrives_as(frame))
        reports = collections.Counter(reader.drain())
        for queue, got in received:
            expected: Report = expected_report(state, got)
            assert queue == expected.queue, (got.hex(), queue, expected)
            assert reports[expected] > 0, (got.hex(), expected, reports)
            reports[expected] -= 1
        assert not +reports, f"reports without a frame: {+reports}"
        seen += len(received)
    return seen


def _states() -> list[SteeringState]:
    table = [0, 1, 2, 3, 3, 2, 1, 0, 1, 1, 2, 2, 0, 3, 0, 3]
    return [
        SteeringState(True, True, RssConfig(
            hash_types=HashType(0x1FF), key=MICROSOFT_KEY, indirection_table=table,
            queues=QUEUES, unclassified_queue=2)),
        SteeringState(True, True, RssConfig(
            hash_types=HashType.IPV4 | HashType.TCPV6 | HashType.UDP_EX,
            key=bytes(range(40, 0, -1)), indirection_table=[3, 1], queues=QUEUES,
            unclassified_queue=1)),
        SteeringState(True, False, RssConfig(
            hash_types=HashType(0x1FF), key=MICROSOFT_KEY, indirection_table=table,
            queues=QUEUES, unclassified_queue=3)),
    ]


def _corpus() -> list[bytes]:
    frames = [frame for _, frame, _ in EDGE_CASES]
    for src, sport, dst, dport, *_ in MS_IPV4:
        frames.append(f.frame(f.ipv4(src, dst, f.tcp(sport, dport))))
    for src, sport, dst, dport, *_ in MS_IPV6:
        frames.append(f.frame(f.ipv6(src, dst, f.udp(sport, dport))))
    return frames


def _apply(program: SteeringProgram, state: SteeringState) -> None:
    assert state.config is not None
    program.apply(state.config, redirect=state.redirect)
    program.set_reports(1)


@pytest.mark.parametrize("state_index", range(len(_states())))
def test_frames_leave_by_the_predicted_queue(live: LiveTap, program: SteeringProgram,
                                             state_index: int) -> None:
    state = _states()[state_index]
    _apply(program, state)
    program.reset_counters()
    frames = _corpus()
    seen = _send_and_check(live, program, state, frames)
    counters = program.counters()
    assert counters.frames == counters.reports == seen >= len(frames)
    assert counters.reports_dropped == 0
    used = {expected_report(state, frame).queue for frame in frames}
    assert len(used) > 1 if state.redirect else used == {state.config.unclassified_queue}  # type: ignore[union-attr]


def test_every_truncation_and_frames_a_test_run_cannot_take(live: LiveTap,
                                                            program: SteeringProgram) -> None:
    state = _states()[0]
    _apply(program, state)
    frames = [frame[:n] for frame in TRUNCATED_BASES.values() for n in range(14, len(frame))]
    assert any(not runnable(frame) for frame in frames)
    assert any(not runnable(frame) for _, frame, _ in EDGE_CASES)
    _send_and_check(live, program, state, frames)


def test_the_skb_protocol_does_not_decide(live: LiveTap, program: SteeringProgram) -> None:
    """The sender sets skb->protocol, which the program uses only to skip a look at the
    frame: frames sent with a protocol their bytes contradict (IP frames as ARP, frames
    that are not IP as IPv4 or IPv6) are steered and reported by their bytes."""
    state = _states()[0]
    _apply(program, state)
    frames = [*_corpus(), f.BROADCAST_MAC + f.HOST_MAC + b"\x08\x06" + bytes(28),
              f.BROADCAST_MAC + f.HOST_MAC + b"\x88\xcc" + bytes(40)]
    ip_like = {0x0800, 0x86DD, 0x8100, 0x88A8}
    assert sum(outer_ethertype(frame) not in ip_like for frame in frames) >= 3

    def contradicting(frame: bytes) -> int:
        return 0x86DD if outer_ethertype(frame) not in ip_like else 0x0806

    def agreeing(frame: bytes) -> int:
        return outer_ethertype(frame)

    program.reset_counters()
    seen = _send_and_check(live, program, state, frames, protocol=contradicting)
    seen += _send_and_check(live, program, state, frames, protocol=agreeing)
    assert program.counters().reports == seen >= 2 * len(frames)


def test_detached_program_sees_nothing_until_attached_again(live: LiveTap,
                                                            program: SteeringProgram) -> None:
    state = _states()[0]
    _apply(program, state)
    frame = f.frame(f.ipv4("10.0.0.1", "10.0.0.2", f.udp(1, 2)))
    program.detach(live.control)
    try:
        program.reset_counters()
        live.sender.send(frame)
        _receive(live, frame)
        assert program.counters().frames == 0
    finally:
        program.attach(live.control)
    _send_and_check(live, program, state, [frame])
    assert program.counters().frames == 1


async def test_reports_wake_the_asyncio_loop(live: LiveTap, program: SteeringProgram) -> None:
    state = _states()[0]
    _apply(program, state)
    reader = program.reports()
    reader.drain()
    frame = f.frame(f.ipv6("2001:db8::1", "2001:db8::2", f.tcp(4242, 80)))
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(reader.next(timeout=WAIT_S))
    # Callbacks run in FIFO order: the task starts waiting on the ring before the send.
    loop.call_soon(live.sender.send, frame)
    report = await waiting
    assert report == expected_report(state, frame)
    assert _receive(live, frame)[-1] == (report.queue, frame)


_PUSH_TAG = b"""
int push_tag(struct __sk_buff *skb)
{
	bpf_skb_vlan_push(skb, bpf_htons(TPID), VLAN_ID);
	return 0; /* TC_ACT_OK */
}
"""
CLSACT_EGRESS = "ffff:fff3"


@pytest.mark.parametrize("tpid", [0x8100, 0x88A8])
def test_an_out_of_band_vlan_tag_counts(live: LiveTap, program: SteeringProgram,
                                        tpid: int) -> None:
    """A tag the stack keeps out of band (a VLAN device on the tap, here a tc program
    pushing one on egress) is written into the frame by tun after the program ran; the
    program must count it as the guest will see it."""
    from bcc import BPF
    from pyroute2 import IPRoute

    state = _states()[0]
    _apply(program, state)
    vlan_id = 7
    pusher = BPF(text=_PUSH_TAG, cflags=[f"-DTPID={tpid}", f"-DVLAN_ID={vlan_id}"])
    push_fd = pusher.load_func(b"push_tag", BPF.SCHED_CLS).fd
    frames = [
        f.frame(f.ipv4("10.7.0.1", "10.7.0.2", f.tcp(1111, 2222))),
        f.frame(f.ipv6(V6S, V6D, f.udp(3333, 4444))),
        f.frame(f.ipv4("10.7.0.1", "10.7.0.2", f.udp(5, 6)), vlans=[(0x8100, 9)]),
        f.frame(f.ipv4("10.7.0.1", "10.7.0.2", f.udp(5, 6)), vlans=[(0x8100, 9), (0x8100, 10)]),
        f.BROADCAST_MAC + f.HOST_MAC + b"\x08\x06" + bytes(28),
    ]

    def tagged(frame: bytes) -> bytes:
        return frame[:12] + struct.pack("!HH", tpid, vlan_id) + frame[12:]

    reports = [expected_report(state, tagged(frame)).report for frame in frames]
    assert reports[2] is not HashReport.NONE and reports[3] is HashReport.NONE
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=live.name)[0]
        ipr.tc("add", "clsact", index)
        try:
            ipr.tc("add-filter", "bpf", index, ":1", fd=push_fd, name="push_tag",
                   parent=CLSACT_EGRESS, classid=1, direct_action=True)
            _send_and_check(live, program, state, frames, arrives_as=tagged)
        finally:
            ipr.tc("del", "clsact", index)
            pusher.cleanup()


def test_attach_to_a_deleted_tap_fails_clearly(program: SteeringProgram) -> None:
    need_tun()
    name = f"vs{os.getpid() % 100000}d{next(_serial)}"
    with tap.TapDevice(name):
        control = tap.open_control_queue(name)
    try:
        with pytest.raises(tap.TapError, match="gone"):
            program.attach(control)
    finally:
        os.close(control)
