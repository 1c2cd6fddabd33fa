"""Hypothesis-generated frames and configurations: the program must equal the model on all.

Frames are built from `vnetbackend.frames` (VLAN tags, IPv4 options and fragments, IPv6
extension chains with home address and routing headers, chains of up to 64 headers and
option lists of up to 2000 bytes, any transport) or are raw bytes, then sometimes mutated
(bytes overwritten) and truncated. One program load serves every
example; each example applies a random configuration and test-runs a batch of frames.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.oracle import toeplitz_oracle
from tests.prereq import need_bcc
from vnetbackend.rss import HashReport, RssConfig
from vnetbackend.steering import SteeringProgram, SteeringState
from vnetbackend.steering.conformance import expected_report, run_frames
from vnetbackend.steering.testrun import min_frame_len
from vnetbackend.testbed import frames as f

FRAMES_PER_EXAMPLE = 25
EXAMPLES = 420
MIN_FRAMES = 10_000
#: Frames are cut to this length: BPF_PROG_TEST_RUN takes a page less some headroom.
MAX_TEST_FRAME = 3500

ipv4_addr = st.binary(min_size=4, max_size=4)
ipv6_addr = st.binary(min_size=16, max_size=16)
port = st.integers(0, 65535)
payload = st.binary(max_size=24)

transport = st.one_of(
    st.builds(f.tcp, port, port, payload),
    st.builds(f.udp, port, port, payload),
    st.builds(f.raw, st.sampled_from([0, 1, 6, 17, 43, 44, 47, 51, 58, 59, 60, 255]),
              st.binary(max_size=24)),
)

_pad1 = st.just(b"\x00")
_padn = st.integers(0, 6).map(lambda n: bytes([1, n]) + bytes(n))
_home = ipv6_addr.map(lambda a: bytes([0xC9, 16]) + a)
_bad_home = st.integers(0, 20).map(lambda n: bytes([0xC9, n]) + bytes(n))
_other_option = st.tuples(st.integers(2, 255), st.binary(max_size=8)).map(
    lambda t: bytes([t[0], len(t[1])]) + t[1])
dest_option_area = st.lists(st.one_of(_pad1, _padn, _home, _bad_home, _other_option),
                            max_size=10).map(b"".join)
_pad1_run = st.integers(1, 300).map(lambda n: b"\0" * n)
#: Many options, the home address option anywhere or nowhere; cut to fit one header.
long_option_area = st.lists(st.one_of(_pad1_run, _padn, _home, _bad_home, _other_option),
                            min_size=8, max_size=40).map(lambda parts: b"".join(parts)[:2000])


class AuthHeader(f.Ext):
    """An authentication header (its length counts 4-byte units minus 2)."""

    def render(self, next_header: int) -> bytes:
        return bytes([next_header, (2 + len(self.body)) // 4 - 2]) + self.body


extension = st.one_of(
    st.builds(f.hop_by_hop, st.binary(max_size=14)),
    st.builds(f.dest_options, dest_option_area),
    st.builds(f.home_address, ipv6_addr),
    st.builds(f.routing_type2, ipv6_addr),
    st.builds(f.routing, st.lists(ipv6_addr, max_size=2), st.sampled_from([0, 2, 3])),
    st.builds(f.fragment, st.sampled_from([0, 0, 1, 8191]), st.booleans()),
    st.integers(0, 3).map(lambda n: AuthHeader(51, bytes(10 + 4 * n))),
)

# (fragment offset, more fragments): mostly whole packets, then first/middle/last fragments.
_ipv4_fragmenting = st.sampled_from([(0, False)] * 7 + [(0, True), (185, True), (8191, False)])
ipv4_packet = st.builds(
    lambda src, dst, l4, options, frag: f.ipv4(src, dst, l4, options=options,
                                               fragment_offset=frag[0], more_fragments=frag[1]),
    ipv4_addr, ipv4_addr, transport, st.one_of(st.just(b""), st.binary(max_size=40)),
    _ipv4_fragmenting,
)
ipv6_packet = st.builds(f.ipv6, ipv6_addr, ipv6_addr, transport,
                        ext=st.one_of(st.just([]), st.lists(extension, max_size=3),
                                      st.lists(extension, max_size=10),
                                      st.lists(extension, min_size=9, max_size=64),
                                      st.lists(st.builds(f.dest_options, long_option_area),
                                               min_size=1, max_size=2)))
_tag = st.tuples(st.sampled_from([0x8100, 0x88A8]), st.integers(0, 4095))
vlan_tags = st.one_of(st.just([]), st.just([]), st.lists(_tag, max_size=2),
                      st.lists(_tag, max_size=3))
structured = st.builds(f.frame, st.one_of(ipv4_packet, ipv6_packet), vlans=vlan_tags)
raw_frame = st.tuples(
    st.sampled_from([0x0800, 0x86DD, 0x8100, 0x88A8, 0x0806, 0x88CC]),
    st.binary(min_size=0, max_size=80),
).map(lambda t: bytes(12) + t[0].to_bytes(2, "big") + t[1])


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(raw_frame if draw(st.integers(0, 9)) == 5 else structured))
    del frame[MAX_TEST_FRAME:]
    if draw(st.integers(0, 3)) == 0:
        for _ in range(draw(st.integers(1, 3))):
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    shortest = min_frame_len(bytes(frame))
    if len(frame) < shortest:
        frame += bytes(shortest - len(frame))
    elif draw(st.integers(0, 3)) == 0:
        frame = frame[: draw(st.integers(shortest, len(frame)))]
    return bytes(frame)


@st.composite
def states(draw: st.DrawFn) -> SteeringState:
    if draw(st.integers(0, 15)) == 0:
        return SteeringState(False, False, None)
    queues = draw(st.one_of(st.integers(1, 8), st.integers(1, 0x8000)))
    length = 1 << draw(st.integers(0, 7))
    table = draw(st.lists(st.integers(0, queues - 1), min_size=length, max_size=length))
    config = RssConfig(hash_types=draw(st.one_of(st.just(0x1FF), st.integers(0, 0x1FF))),
                       key=draw(st.binary(min_size=1, max_size=40)), indirection_table=table,
                       queues=queues, unclassified_queue=draw(st.integers(0, queues - 1)))
    return SteeringState(True, draw(st.integers(0, 7)) > 0, config)


@pytest.fixture(scope="module")
def program() -> Iterator[SteeringProgram]:
    need_bcc()
    with SteeringProgram() as loaded:
        yield loaded


def test_random_frames_and_configurations(program: SteeringProgram) -> None:
    checked: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(state=states(), batch=st.lists(frames(), min_size=FRAMES_PER_EXAMPLE,
                                          max_size=FRAMES_PER_EXAMPLE))
    def check(state: SteeringState, batch: list[bytes]) -> None:
        if state.config is None:
            program.disable()
        else:
            program.apply(state.config, redirect=state.redirect)
        for frame, (retval, report) in zip(batch, run_frames(program, batch), strict=True):
            expected = expected_report(state, frame)
            assert (retval, report) == (expected.queue, expected), frame.hex()
            if state.config is not None and report.report is not HashReport.NONE:
                hash_input = state.config.steer(frame).hash_input
                assert report.hash == toeplitz_oracle(state.config.key, hash_input)
        checked.append(len(batch))

    check()
    assert sum(checked) >= MIN_FRAMES
