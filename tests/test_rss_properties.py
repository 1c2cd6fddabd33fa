"""Properties of the reference model over generated inputs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vnetbackend.rss import (
    HashReport,
    HashType,
    RssConfig,
    parse_frame,
    select_hash_input,
    toeplitz,
    toeplitz_bitwise,
)
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


@given(key=keys, a=st.binary(min_size=1, max_size=36), b=st.binary(min_size=1, max_size=36))
def test_toeplitz_is_linear(key: bytes, a: bytes, b: bytes) -> None:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    xored = bytes(x ^ y for x, y in zip(a, b, strict=True))
    assert toeplitz(key, xored) == toeplitz(key, a) ^ toeplitz(key, b)


@given(key=keys, data=st.binary(max_size=48))
def test_tables_equal_the_bitwise_definition(key: bytes, data: bytes) -> None:
    assert toeplitz(key, data) == toeplitz_bitwise(key, data)


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
