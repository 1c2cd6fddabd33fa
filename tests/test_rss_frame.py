"""Every branch of the frame reading and hash-input selection, against hand-built frames."""

from __future__ import annotations

import pytest

from vnetbackend.rss import HashReport, HashType, parse_frame, select_hash_input
from vnetbackend.testbed import frames as f

ALL = 0x1FF
V4S, V4D = "10.0.0.1", "10.0.0.2"
V6S, V6D = "2001:db8::1", "2001:db8::2"
HOME, CARE = "2001:db8:aaaa::1", "2001:db8:bbbb::2"
PORTS = (1234).to_bytes(2, "big") + (80).to_bytes(2, "big")


def ip4(a: str) -> bytes:
    return f.ip_bytes(a, 4)


def ip6(a: str) -> bytes:
    return f.ip_bytes(a, 6)


def choose(frame: bytes, types: int = ALL) -> tuple[HashReport, bytes]:
    return select_hash_input(parse_frame(frame), types)


def test_ipv4_tcp_udp_and_other() -> None:
    assert choose(f.frame(f.ipv4(V4S, V4D, f.tcp(1234, 80)))) == (
        HashReport.TCPV4, ip4(V4S) + ip4(V4D) + PORTS)
    assert choose(f.frame(f.ipv4(V4S, V4D, f.udp(1234, 80)))) == (
        HashReport.UDPV4, ip4(V4S) + ip4(V4D) + PORTS)
    assert choose(f.frame(f.ipv4(V4S, V4D, f.raw(1, b"\x08\0" + bytes(6))))) == (
        HashReport.IPV4, ip4(V4S) + ip4(V4D))


@pytest.mark.parametrize(("types", "expected"), [
    (HashType.TCPV4, HashReport.TCPV4),
    (HashType.UDPV4 | HashType.IPV4, HashReport.IPV4),
    (HashType.IPV4, HashReport.IPV4),
    (HashType.UDPV4, HashReport.NONE),
    (HashType.IPV6 | HashType.TCPV6, HashReport.NONE),
])
def test_ipv4_tcp_under_each_mask(types: int, expected: HashReport) -> None:
    assert choose(f.frame(f.ipv4(V4S, V4D, f.tcp(1234, 80))), types)[0] is expected


def test_ipv4_options_are_skipped() -> None:
    frame = f.frame(f.ipv4(V4S, V4D, f.udp(1234, 80), options=b"\x94\x04\0\0" * 3))
    assert parse_frame(frame).l3_offset == 14
    assert choose(frame) == (HashReport.UDPV4, ip4(V4S) + ip4(V4D) + PORTS)


@pytest.mark.parametrize(("offset", "more"), [(0, True), (3, True), (3, False)])
def test_ipv4_fragments_hash_addresses_only(offset: int, more: bool) -> None:
    frame = f.frame(f.ipv4(V4S, V4D, f.tcp(1234, 80), fragment_offset=offset,
                           more_fragments=more))
    assert parse_frame(frame).fragment
    assert choose(frame) == (HashReport.IPV4, ip4(V4S) + ip4(V4D))
    assert choose(frame, HashType.TCPV4) == (HashReport.NONE, b"")


@pytest.mark.parametrize("ihl", [0, 4])
def test_ipv4_bad_ihl_is_unclassified(ihl: int) -> None:
    frame = bytearray(f.frame(f.ipv4(V4S, V4D, f.tcp(1234, 80))))
    frame[14] = 0x40 | ihl
    assert choose(bytes(frame)) == (HashReport.NONE, b"")


def test_ipv4_wrong_version_is_unclassified() -> None:
    frame = bytearray(f.frame(f.ipv4(V4S, V4D, f.tcp(1234, 80))))
    frame[14] = 0x65
    assert choose(bytes(frame)) == (HashReport.NONE, b"")


def test_ipv4_options_past_the_end_are_unclassified() -> None:
    frame = f.frame(f.ipv4(V4S, V4D, f.raw(253, b""), options=bytes(8)))
    assert choose(frame[:14 + 24]) == (HashReport.NONE, b"")
    assert choose(frame[:14 + 28])[0] is HashReport.IPV4


@pytest.mark.parametrize(("proto", "cut", "expected"), [
    (f.tcp, 19, HashReport.IPV4), (f.tcp, 20, HashReport.TCPV4),
    (f.udp, 7, HashReport.IPV4), (f.udp, 8, HashReport.UDPV4),
])
def test_transport_header_must_be_whole(proto, cut: int, expected: HashReport) -> None:
    frame = f.frame(f.ipv4(V4S, V4D, proto(1234, 80, b"payload")))
    assert choose(frame[: 14 + 20 + cut])[0] is expected


@pytest.mark.parametrize("cut", [0, 5, 13, 14, 33])
def test_short_frames_are_unclassified(cut: int) -> None:
    assert choose(f.frame(f.ipv4(V4S, V4D, f.tcp(1, 2)))[:cut]) == (HashReport.NONE, b"")


@pytest.mark.parametrize("vlans", [
    [(0x8100, 5)], [(0x88A8, 5)], [(0x88A8, 5), (0x8100, 7)], [(0x8100, 5), (0x8100, 6)],
])
def test_vlan_tags_are_skipped(vlans: list[tuple[int, int]]) -> None:
    frame = f.frame(f.ipv4(V4S, V4D, f.tcp(1234, 80)), vlans=vlans)
    assert parse_frame(frame).l3_offset == 14 + 4 * len(vlans)
    assert choose(frame) == (HashReport.TCPV4, ip4(V4S) + ip4(V4D) + PORTS)


def test_three_vlan_tags_are_not_ip() -> None:
    frame = f.frame(f.ipv4(V4S, V4D, f.tcp(1234, 80)), vlans=[(0x8100, 1)] * 3)
    assert choose(frame) == (HashReport.NONE, b"")


def test_truncated_vlan_tag_is_unclassified() -> None:
    frame = f.frame(f.ipv4(V4S, V4D, f.tcp(1234, 80)), vlans=[(0x8100, 5)])
    assert choose(frame[:16]) == (HashReport.NONE, b"")


@pytest.mark.parametrize("ethertype", [b"\x08\x06", b"\x88\xcc", b"\x00\x2e"])
def test_non_ip_frames_are_unclassified(ethertype: bytes) -> None:
    assert choose(bytes(12) + ethertype + bytes(46)) == (HashReport.NONE, b"")


def test_ipv6_without_extension_headers() -> None:
    assert choose(f.frame(f.ipv6(V6S, V6D, f.tcp(1234, 80)))) == (
        HashReport.TCPV6, ip6(V6S) + ip6(V6D) + PORTS)
    assert choose(f.frame(f.ipv6(V6S, V6D, f.udp(1234, 80)))) == (
        HashReport.UDPV6, ip6(V6S) + ip6(V6D) + PORTS)
    assert choose(f.frame(f.ipv6(V6S, V6D, f.raw(58, bytes(8))))) == (
        HashReport.IPV6, ip6(V6S) + ip6(V6D))


def test_ex_types_ignore_packets_without_extension_headers() -> None:
    frame = f.frame(f.ipv6(V6S, V6D, f.tcp(1234, 80)))
    ex_only = HashType.IP_EX | HashType.TCP_EX | HashType.UDP_EX
    assert choose(frame, ex_only) == (HashReport.NONE, b"")
    assert choose(frame, ex_only | HashType.IPV6) == (HashReport.IPV6, ip6(V6S) + ip6(V6D))


@pytest.mark.parametrize("ext", [
    [f.hop_by_hop()], [f.dest_options()], [f.routing([CARE])], [f.fragment()],
    [f.hop_by_hop(), f.dest_options(), f.routing([CARE, HOME])],
])
def test_ipv6_extension_chains_reach_the_transport(ext: list[f.Ext]) -> None:
    frame = f.frame(f.ipv6(V6S, V6D, f.udp(1234, 80), ext=ext))
    parsed = parse_frame(frame)
    assert parsed.has_ext_headers and parsed.l4_proto == 17
    assert choose(frame) == (HashReport.UDPV6_EX, ip6(V6S) + ip6(V6D) + PORTS)
    plain = HashType.UDPV6 | HashType.IPV6
    assert choose(frame, plain) == (HashReport.UDPV6, ip6(V6S) + ip6(V6D) + PORTS)
    assert choose(frame, HashType.IP_EX | HashType.UDPV6) == (
        HashReport.IPV6_EX, ip6(V6S) + ip6(V6D))


def test_authentication_header_length_is_in_words() -> None:
    ah = bytes([6, 4, 0, 0]) + bytes(20)  # next=TCP, (4+2)*4 = 24 bytes
    packet = f.ipv6(V6S, V6D, f.raw(51, ah + f.tcp(1234, 80).header))
    assert choose(f.frame(packet)) == (HashReport.TCPV6_EX, ip6(V6S) + ip6(V6D) + PORTS)


def test_home_address_and_type2_routing_replace_addresses() -> None:
    frame = f.frame(f.ipv6(V6S, V6D, f.tcp(1234, 80),
                           ext=[f.routing_type2(CARE), f.home_address(HOME)]))
    assert choose(frame) == (HashReport.TCPV6_EX, ip6(HOME) + ip6(CARE) + PORTS)
    assert choose(frame, HashType.IP_EX) == (HashReport.IPV6_EX, ip6(HOME) + ip6(CARE))
    assert choose(frame, HashType.TCPV6) == (HashReport.TCPV6, ip6(V6S) + ip6(V6D) + PORTS)


def test_routing_type0_does_not_replace_destination() -> None:
    frame = f.frame(f.ipv6(V6S, V6D, f.tcp(1234, 80), ext=[f.routing([CARE], 0)]))
    assert choose(frame) == (HashReport.TCPV6_EX, ip6(V6S) + ip6(V6D) + PORTS)


def test_home_address_option_behind_pad1_and_padn() -> None:
    option = b"\x00\x00" + bytes([1, 0]) + bytes([0xC9, 16]) + ip6(HOME)
    frame = f.frame(f.ipv6(V6S, V6D, f.udp(1234, 80), ext=[f.dest_options(option)]))
    assert choose(frame, HashType.IP_EX) == (HashReport.IPV6_EX, ip6(HOME) + ip6(V6D))


@pytest.mark.parametrize("padding", [bytes([1, 0]) * 8, b"\0" * 200, bytes([1, 253]) + bytes(253)])
def test_home_address_option_after_any_number_of_options(padding: bytes) -> None:
    option = padding + bytes([0xC9, 16]) + ip6(HOME)
    frame = f.frame(f.ipv6(V6S, V6D, f.udp(1234, 80), ext=[f.dest_options(option)]))
    assert choose(frame, HashType.IP_EX) == (HashReport.IPV6_EX, ip6(HOME) + ip6(V6D))


@pytest.mark.parametrize(("offset", "more"), [(0, True), (5, False)])
def test_ipv6_fragments_hash_addresses_only(offset: int, more: bool) -> None:
    frame = f.frame(f.ipv6(V6S, V6D, f.tcp(1234, 80), ext=[f.fragment(offset, more)]))
    assert parse_frame(frame).fragment
    assert choose(frame) == (HashReport.IPV6_EX, ip6(V6S) + ip6(V6D))
    assert choose(frame, HashType.TCPV6 | HashType.IPV6) == (
        HashReport.IPV6, ip6(V6S) + ip6(V6D))


@pytest.mark.parametrize("count", [8, 9, 12, 64, 200])
def test_extension_chains_of_any_length_reach_the_transport(count: int) -> None:
    frame = f.frame(f.ipv6(V6S, V6D, f.tcp(1234, 80), ext=[f.dest_options()] * count))
    assert choose(frame) == (HashReport.TCPV6_EX, ip6(V6S) + ip6(V6D) + PORTS)


def test_truncated_extension_header_has_no_transport() -> None:
    frame = f.frame(f.ipv6(V6S, V6D, f.tcp(1, 2), ext=[f.hop_by_hop(bytes(12))]))
    cut = frame[: 14 + 40 + 10]
    assert choose(cut) == (HashReport.IPV6_EX, ip6(V6S) + ip6(V6D))
    assert choose(cut, HashType.TCPV6 | HashType.IPV6)[0] is HashReport.IPV6


def test_short_ipv6_header_is_unclassified() -> None:
    frame = f.frame(f.ipv6(V6S, V6D, f.tcp(1, 2)))
    assert choose(frame[: 14 + 39]) == (HashReport.NONE, b"")


def test_l3_len_counts_from_the_ip_header() -> None:
    frame = f.frame(f.ipv4(V4S, V4D, f.udp(1, 2, b"x" * 10)), vlans=[(0x8100, 3)])
    assert parse_frame(frame).l3_len == 20 + 8 + 10
    assert parse_frame(b"\0" * 60).l3_len == 0
