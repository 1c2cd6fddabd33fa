"""Properties of the reference model over generated inputs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.oracle import toeplitz_oracle
from vnetbackend.rss import (
    HashReport,
    HashType,
    RssConfig,
    parse_frame,
    select_hash_input,
    toeplitz,
    toeplitz_bitwise,
)
from vnetbackend.rss.frame import plain_ipv4_flow
from vnetbackend.testbed import frames as f

keys = st.binary(min_size=1, max_size=40)
masks = st.integers(min_value=0, max_value=0x1FF)


@settings(max_examples=2000)
@given(frame=st.binary(max_size=200), types=masks)
def test_any_byte_string_is_steered_without_raising(frame: bytes, types: int) -> None:
    config = RssConfig(hash_types=types, key=bytes(range(40)), indirection_table=[0, 1],
                       queues=2)
    result = config.steer(frame)
    assert 0 <= result.queue < 2
    assert (result.report is HashReport.NONE) == (result.hash_input == b"")


@settings(max_examples=500)
@given(key=keys, data=st.binary(max_size=48))
def test_tables_and_the_bitwise_definition_equal_the_oracle(key: bytes, data: bytes) -> None:
    """For every key, not only Microsoft's: the oracle shares no code with the model."""
    expected = toeplitz_oracle(key, data)
    assert toeplitz(key, data) == expected
    assert toeplitz_bitwise(key, data) == expected


ipv4_addrs = st.ip_addresses(v=4).map(lambda a: a.packed)
ipv6_addrs = st.ip_addresses(v=6).map(lambda a: a.packed)
ports = st.integers(min_value=0, max_value=0xFFFF)


@st.composite
def ip_frames(draw: st.DrawFn) -> bytes:
    l4 = draw(st.sampled_from([f.tcp, f.udp]))(draw(ports), draw(ports))
    if draw(st.booleans()):
        packet = f.ipv4(draw(ipv4_addrs), draw(ipv4_addrs), l4)
    else:
        ext = draw(st.lists(st.sampled_from([f.hop_by_hop(), f.dest_options(),
                                             f.fragment()]), max_size=3))
        packet = f.ipv6(draw(ipv6_addrs), draw(ipv6_addrs), l4, ext=ext)
    return f.frame(packet)


L4_TYPES = HashType.TCPV4 | HashType.UDPV4 | HashType.TCPV6 | HashType.UDPV6 | \
    HashType.TCP_EX | HashType.UDP_EX


@given(frame=ip_frames(), types=masks)
def test_disabled_transport_types_never_contribute_ports(frame: bytes, types: int) -> None:
    report, data = select_hash_input(parse_frame(frame), types & ~L4_TYPES)
    assert not report.is_l4
    assert len(data) in (0, 8, 32)


@given(frame=ip_frames(), types=masks)
def test_the_hash_input_is_addresses_then_ports_from_the_frame(frame: bytes, types: int) -> None:
    parsed = parse_frame(frame)
    report, data = select_hash_input(parsed, types)
    if report is HashReport.NONE:
        assert data == b""
        return
    ex = report in (HashReport.IPV6_EX, HashReport.TCPV6_EX, HashReport.UDPV6_EX)
    addresses = parsed.ex_src + parsed.ex_dst if ex else parsed.src + parsed.dst
    assert data == addresses + (parsed.ports if report.is_l4 else b"")
    assert parsed.src in frame and parsed.dst in frame


def _plain_ipv4(payload: bytes = b"", **kw: object) -> bytes:
    return f.frame(f.ipv4("10.1.2.3", "10.4.5.6", f.tcp(1000, 2000, payload), **kw))  # type: ignore[arg-type]


@st.composite
def near_plain_ipv4(draw: st.DrawFn) -> bytes:
    """Frames at and around the fast path's class: plain IPv4 TCP/UDP, then bytes of the
    headers overwritten (ethertype, version, IHL, flags, offset, protocol) and cut."""
    build = draw(st.sampled_from([f.tcp, f.udp]))
    l4 = build(draw(ports), draw(ports), draw(st.binary(max_size=8)))
    frame = bytearray(f.frame(f.ipv4(draw(ipv4_addrs), draw(ipv4_addrs), l4)))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.sampled_from([12, 13, 14, 20, 21, 23, 24, 33, 34, 40]))
        if at < len(frame):
            frame[at] = draw(st.sampled_from([0, 1, 6, 8, 17, 0x20, 0x40, 0x45, 0x46, 0x81, 0xFF]))
    return bytes(frame[: draw(st.integers(0, len(frame)))])


@settings(max_examples=3000)
@given(frame=st.one_of(near_plain_ipv4(), ip_frames(), st.binary(max_size=80)), types=masks)
def test_the_fast_path_steers_as_the_general_path(frame: bytes, types: int) -> None:
    config = RssConfig(hash_types=types, key=bytes(range(1, 41)), indirection_table=range(8),
                       queues=8, unclassified_queue=5)
    assert config.steer(frame) == config.steer_parsed(parse_frame(frame))
    flow = plain_ipv4_flow(frame)
    if flow is not None:
        parsed = parse_frame(frame)
        assert flow == (parsed.l4_proto, parsed.src + parsed.dst + parsed.ports)


@pytest.mark.parametrize(("frame", "plain"), [
    (_plain_ipv4(), True),
    (f.frame(f.ipv4("10.1.2.3", "10.4.5.6", f.udp(1, 2))), True),
    (_plain_ipv4()[: 14 + 20 + 20], True),
    (_plain_ipv4()[: 14 + 20 + 19], False),                     # TCP header cut
    (f.frame(f.ipv4("10.1.2.3", "10.4.5.6", f.udp(1, 2)))[: 14 + 27], False),
    (_plain_ipv4(options=b"\x01" * 4), False),                  # IHL 6
    (_plain_ipv4(more_fragments=True), False),
    (_plain_ipv4(fragment_offset=3), False),
    (_plain_ipv4()[:20] + b"\x40" + _plain_ipv4()[21:], True),  # DF only
    (f.frame(f.ipv4("10.1.2.3", "10.4.5.6", f.raw(1, bytes(20)))), False),
    (f.frame(f.ipv4("10.1.2.3", "10.4.5.6", f.tcp(1, 2)), vlans=[(0x8100, 1)]), False),
    (f.frame(f.ipv6("2001:db8::1", "2001:db8::2", f.tcp(1, 2))), False),
])
def test_the_fast_path_takes_only_plain_ipv4(frame: bytes, plain: bool) -> None:
    assert (plain_ipv4_flow(frame) is not None) == plain
    config = RssConfig(hash_types=0x1FF, key=bytes(range(1, 41)), indirection_table=range(8),
                       queues=8)
    assert config.steer(frame) == config.steer_parsed(parse_frame(frame))
