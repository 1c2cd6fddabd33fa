"""The steering program against the reference model through BPF_PROG_TEST_RUN.

For every frame the program's return value must be the reference queue and its report
must equal the reference's hash, report type and frame fields. Corpus: the Microsoft RSS
verification vectors and a hand-written case per parser branch, each under many
configurations, plus every truncation of a few rich frames.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from tests.oracle import toeplitz_oracle
from tests.prereq import need_bcc
from vnetbackend.rss import HashReport, HashType, RssConfig
from vnetbackend.rss.vectors import (
    MICROSOFT_IPV4_VECTORS,
    MICROSOFT_IPV6_VECTORS,
    MICROSOFT_KEY,
)
from vnetbackend.steering import SteeringProgram, SteeringState, prog_test_run
from vnetbackend.steering.conformance import expected_report, run_frames
from vnetbackend.steering.testrun import runnable
from vnetbackend.testbed import frames as f

ALL = HashType(0x1FF)
V6S, V6D = "2001:db8:1::10", "2001:db8:2::20"
HOME, ROUTED = "2001:db8:aaaa::1", "2001:db8:bbbb::2"


@pytest.fixture(scope="module")
def program() -> Iterator[SteeringProgram]:
    need_bcc()
    with SteeringProgram() as loaded:
        yield loaded


def _patch(frame: bytes, offset: int, value: int) -> bytes:
    return frame[:offset] + bytes([value]) + frame[offset + 1:]


def _v4(l4: f.L4 | None = None, **kw: object) -> bytes:
    return f.frame(f.ipv4("10.1.2.3", "10.4.5.6", l4 or f.tcp(1000, 2000), **kw))  # type: ignore[arg-type]


def _v6(l4: f.L4 | None = None, ext: list[f.Ext] | None = None) -> bytes:
    return f.frame(f.ipv6(V6S, V6D, l4 or f.tcp(1000, 2000), ext=ext or []))


class AH(f.Ext):
    """An authentication header: its length counts 4-byte units minus 2."""

    def __init__(self, body_len: int = 10) -> None:
        super().__init__(51, bytes(range(body_len)))

    def render(self, next_header: int) -> bytes:
        return bytes([next_header, (2 + len(self.body)) // 4 - 2]) + self.body


def _dstopts_raw(options: bytes) -> f.Ext:
    """A destination options header with exactly *options* (the caller pads to 8n+6)."""
    return f.Ext(60, options)


_PAD1, _PADN2 = b"\x00", b"\x01\x00"
_HOME_OPT = bytes([0xC9, 16]) + bytes.fromhex("20010db8aaaa00000000000000000001")

# (name, frame, report under all hash types) -- the expectation says which branch it hits.
EDGE_CASES: list[tuple[str, bytes, HashReport]] = [
    ("eth_only_ipv4_type", f.BROADCAST_MAC + f.HOST_MAC + b"\x08\x00", HashReport.NONE),
    ("eth_only_ipv6_type", f.BROADCAST_MAC + f.HOST_MAC + b"\x86\xdd", HashReport.NONE),
    ("arp", f.BROADCAST_MAC + f.HOST_MAC + b"\x08\x06" + bytes(28), HashReport.NONE),
    ("unknown_ethertype", f.BROADCAST_MAC + f.HOST_MAC + b"\x88\xb5" + bytes(40),
     HashReport.NONE),
    ("all_zero_60", bytes(60), HashReport.NONE),
    # VLAN tags
    ("vlan_8021q_tcp4", f.frame(f.ipv4("10.0.0.1", "10.0.0.2", f.tcp(1, 2)),
                                vlans=[(0x8100, 5)]), HashReport.TCPV4),
    ("vlan_8021ad_udp4", f.frame(f.ipv4("10.0.0.1", "10.0.0.2", f.udp(1, 2)),
                                 vlans=[(0x88A8, 7)]), HashReport.UDPV4),
    ("qinq_udp6", f.frame(f.ipv6(V6S, V6D, f.udp(53, 5353)),
                          vlans=[(0x88A8, 100), (0x8100, 200)]), HashReport.UDPV6),
    ("qinq_both_8021q_tcp4", f.frame(f.ipv4("1.1.1.1", "2.2.2.2", f.tcp(3, 4)),
                                     vlans=[(0x8100, 1), (0x8100, 2)]), HashReport.TCPV4),
    ("three_vlan_tags", f.frame(f.ipv4("1.1.1.1", "2.2.2.2", f.tcp(3, 4)),
                                vlans=[(0x8100, 1), (0x8100, 2), (0x8100, 3)]),
     HashReport.NONE),
    ("vlan_truncated_tag", f.BROADCAST_MAC + f.HOST_MAC + b"\x81\x00\x00", HashReport.NONE),
    ("vlan_then_arp", f.BROADCAST_MAC + f.HOST_MAC + b"\x81\x00\x00\x05\x08\x06" + bytes(28),
     HashReport.NONE),
    ("second_vlan_truncated", f.BROADCAST_MAC + f.HOST_MAC + b"\x88\xa8\x00\x05\x81\x00",
     HashReport.NONE),
    # IPv4
    ("tcp4", _v4(), HashReport.TCPV4),
    ("udp4", _v4(f.udp(5000, 53)), HashReport.UDPV4),
    ("icmp4", _v4(f.raw(1, b"\x08\x00" + bytes(30))), HashReport.IPV4),
    ("gre4", _v4(f.raw(47, bytes(24))), HashReport.IPV4),
    ("tcp4_options_4", _v4(options=b"\x01\x01\x01\x00"), HashReport.TCPV4),
    ("tcp4_options_40", _v4(options=bytes([1] * 39 + [0])), HashReport.TCPV4),
    ("udp4_options_20", _v4(f.udp(7, 9), options=bytes(20)), HashReport.UDPV4),
    ("tcp4_fragment_first", _v4(more_fragments=True), HashReport.IPV4),
    ("tcp4_fragment_middle", _v4(fragment_offset=10, more_fragments=True), HashReport.IPV4),
    ("tcp4_fragment_last", _v4(fragment_offset=10), HashReport.IPV4),
    ("udp4_fragment_first", _v4(f.udp(1, 2), more_fragments=True), HashReport.IPV4),
    ("tcp4_dont_fragment", _patch(_v4(), 14 + 6, 0x40), HashReport.TCPV4),
    ("tcp4_reserved_flag", _patch(_v4(), 14 + 6, 0x80), HashReport.TCPV4),
    ("ipv4_ihl_4", _patch(_v4(), 14, 0x44), HashReport.NONE),
    ("ipv4_ihl_0", _patch(_v4(), 14, 0x40), HashReport.NONE),
    ("ipv4_ihl_past_end", _patch(_v4(f.raw(6, b"")), 14, 0x4F), HashReport.NONE),
    ("ipv4_ihl_15_fits_no_tcp", _patch(_v4(f.raw(6, bytes(40))), 14, 0x4F), HashReport.IPV4),
    ("ipv4_version_6", _patch(_v4(), 14, 0x65), HashReport.NONE),
    ("ipv4_header_19_bytes", _v4()[:14 + 19], HashReport.NONE),
    ("vlan_ipv4_header_19_bytes", f.frame(f.ipv4("1.2.3.4", "5.6.7.8", f.tcp(1, 2)),
                                          vlans=[(0x8100, 1)])[:18 + 19], HashReport.NONE),
    ("ipv4_header_only", _v4()[:14 + 20], HashReport.IPV4),
    ("tcp4_header_19_bytes", _v4()[:14 + 20 + 19], HashReport.IPV4),
    ("tcp4_header_20_bytes", _v4()[:14 + 20 + 20], HashReport.TCPV4),
    ("udp4_header_7_bytes", _v4(f.udp(1, 2))[:14 + 20 + 7], HashReport.IPV4),
    ("udp4_header_8_bytes", _v4(f.udp(1, 2))[:14 + 20 + 8], HashReport.UDPV4),
    ("tcp4_with_payload", _v4(f.tcp(80, 443, b"x" * 500)), HashReport.TCPV4),
    # IPv6 without extension headers
    ("tcp6", _v6(), HashReport.TCPV6),
    ("udp6", _v6(f.udp(1, 2)), HashReport.UDPV6),
    ("icmp6", _v6(f.raw(58, b"\x80\x00" + bytes(10))), HashReport.IPV6),
    ("no_next_header6", _v6(f.raw(59, b"")), HashReport.IPV6),
    ("ipv6_header_39_bytes", _v6()[:14 + 39], HashReport.NONE),
    ("vlan_ipv6_header_39_bytes", f.frame(f.ipv6(V6S, V6D, f.tcp(1, 2)),
                                          vlans=[(0x88A8, 1)])[:18 + 39], HashReport.NONE),
    ("ipv6_header_only", _v6()[:14 + 40], HashReport.IPV6),
    ("ipv6_version_4", _patch(_v6(), 14, 0x45), HashReport.NONE),
    ("tcp6_header_19_bytes", _v6()[:14 + 40 + 19], HashReport.IPV6),
    ("udp6_header_8_bytes", _v6(f.udp(1, 2))[:14 + 40 + 8], HashReport.UDPV6),
    # IPv6 extension headers
    ("hop_by_hop_tcp6", _v6(ext=[f.hop_by_hop()]), HashReport.TCPV6_EX),
    ("hop_by_hop_long_udp6", _v6(f.udp(1, 2), [f.hop_by_hop(bytes([1, 20]) + bytes(20))]),
     HashReport.UDPV6_EX),
    ("dest_options_no_home", _v6(ext=[f.dest_options()]), HashReport.TCPV6_EX),
    ("home_address", _v6(ext=[f.home_address(HOME)]), HashReport.TCPV6_EX),
    ("home_address_pad1s", _v6(ext=[_dstopts_raw(_PAD1 * 4 + _HOME_OPT)]),
     HashReport.TCPV6_EX),
    ("home_address_padn_pad1", _v6(ext=[_dstopts_raw(_PADN2 + _PAD1 * 2 + _HOME_OPT)]),
     HashReport.TCPV6_EX),
    ("home_address_as_8th_option", _v6(ext=[_dstopts_raw(_PAD1 * 7 + _HOME_OPT + bytes(7))]),
     HashReport.TCPV6_EX),
    ("home_address_as_9th_option", _v6(ext=[_dstopts_raw(_PAD1 * 8 + _HOME_OPT + bytes(6))]),
     HashReport.TCPV6_EX),
    ("home_address_wrong_length", _v6(ext=[_dstopts_raw(
        _PAD1 * 4 + bytes([0xC9, 14]) + bytes(14) + bytes(2))]), HashReport.TCPV6_EX),
    ("home_address_cut_by_header_end", _v6(ext=[_dstopts_raw(
        _PAD1 * 2 + bytes([0xC9, 16]) + bytes(16)[:2])]), HashReport.TCPV6_EX),
    ("two_home_addresses", _v6(ext=[f.home_address(HOME), f.home_address(ROUTED)]),
     HashReport.TCPV6_EX),
    ("routing_type0", _v6(ext=[f.routing([ROUTED])]), HashReport.TCPV6_EX),
    ("routing_type2", _v6(ext=[f.routing_type2(ROUTED)]), HashReport.TCPV6_EX),
    ("routing_type2_two_addresses", _v6(ext=[f.routing([ROUTED, HOME], routing_type=2)]),
     HashReport.TCPV6_EX),
    ("two_routing_type2", _v6(ext=[f.routing_type2(ROUTED), f.routing_type2(HOME)]),
     HashReport.TCPV6_EX),
    ("routing_type0_then_type2", _v6(ext=[f.routing([HOME]), f.routing_type2(ROUTED)]),
     HashReport.TCPV6_EX),
    ("home_and_routing_type2", _v6(f.udp(1, 2), [f.hop_by_hop(), f.home_address(HOME),
                                                 f.routing_type2(ROUTED)]),
     HashReport.UDPV6_EX),
    ("fragment_atomic", _v6(ext=[f.fragment(0, False)]), HashReport.TCPV6_EX),
    ("fragment_first", _v6(ext=[f.fragment(0, True)]), HashReport.IPV6_EX),
    ("fragment_middle", _v6(ext=[f.fragment(100, True)]), HashReport.IPV6_EX),
    ("fragment_last", _v6(ext=[f.fragment(100, False)]), HashReport.IPV6_EX),
    ("fragment_reserved_bits", _v6(ext=[f.Ext(44, b"\x00\x06" + bytes(4))]),
     HashReport.TCPV6_EX),
    ("ah_tcp6", _v6(ext=[AH()]), HashReport.TCPV6_EX),
    ("ah_long_udp6", _v6(f.udp(1, 2), [AH(22)]), HashReport.UDPV6_EX),
    ("chain_of_8", _v6(ext=[f.hop_by_hop()] + [f.dest_options()] * 7), HashReport.TCPV6_EX),
    ("chain_of_9", _v6(ext=[f.hop_by_hop()] + [f.dest_options()] * 8), HashReport.TCPV6_EX),
    ("chain_of_12", _v6(ext=[f.hop_by_hop()] + [f.dest_options()] * 11), HashReport.TCPV6_EX),
    ("chain_of_9_home_last", _v6(ext=[f.dest_options()] * 8 + [f.home_address(HOME)]),
     HashReport.TCPV6_EX),
    ("chain_of_9_home_first", _v6(ext=[f.home_address(HOME)] + [f.dest_options()] * 8),
     HashReport.TCPV6_EX),
    # Headers past the first read of the frame (a window of 112 bytes from the ethertype).
    ("ports_past_first_read", _v6(ext=[f.hop_by_hop(bytes([1, 120]) + bytes(120))]),
     HashReport.TCPV6_EX),
    ("home_address_past_first_read", _v6(ext=[_dstopts_raw(_PAD1 * 150 + _HOME_OPT)]),
     HashReport.TCPV6_EX),
    ("home_address_after_first_read", _v6(ext=[_dstopts_raw(_PAD1 * 66 + _HOME_OPT)]),
     HashReport.TCPV6_EX),
    ("home_option_across_first_read", _v6(ext=[_dstopts_raw(_PAD1 * 67 + _HOME_OPT)]),
     HashReport.TCPV6_EX),
    ("routed_address_past_first_read", _v6(ext=[f.hop_by_hop(bytes([1, 60]) + bytes(60)),
                                                f.routing_type2(ROUTED)]),
     HashReport.TCPV6_EX),
    ("ext_header_truncated", _v6(ext=[f.hop_by_hop()])[:14 + 40 + 6], HashReport.IPV6_EX),
    ("ext_length_past_end", _v6(ext=[f.hop_by_hop(bytes([1, 60]) + bytes(60))])[:14 + 40 + 30],
     HashReport.IPV6_EX),
    ("ext_then_truncated_tcp", _v6(ext=[f.hop_by_hop()])[:14 + 40 + 8 + 10],
     HashReport.IPV6_EX),
    ("ext_then_icmp6", _v6(f.raw(58, bytes(8)), [f.hop_by_hop()]), HashReport.IPV6_EX),
    ("routing_type2_truncated_address", _v6(ext=[f.routing_type2(ROUTED)])[:14 + 40 + 20],
     HashReport.IPV6_EX),
]

# name, frame
MS_IPV4 = MICROSOFT_IPV4_VECTORS
MS_IPV6 = MICROSOFT_IPV6_VECTORS


def _config(types: int, key: bytes = MICROSOFT_KEY, table: tuple[int, ...] = (0, 1, 2, 3, 4),
            queues: int = 5, unclassified: int = 3) -> RssConfig:
    length = 1 << (len(table) - 1).bit_length()
    entries = [table[i % len(table)] for i in range(length)]
    return RssConfig(hash_types=types, key=key, indirection_table=entries, queues=queues,
                     unclassified_queue=unclassified)


def _states() -> list[tuple[str, SteeringState]]:
    on = [(f"types_0x{t:03x}", SteeringState(True, True, _config(t)))
          for t in [0x1FF, 0, 0x07, 0x38, 0x1C0, 0x49, 0x1F8, 0x3F]]
    on += [(f"only_{t.name}", SteeringState(True, True, _config(t))) for t in HashType]
    on += [
        ("short_key", SteeringState(True, True, _config(ALL, key=bytes(range(1, 9))))),
        ("one_byte_key", SteeringState(True, True, _config(ALL, key=b"\xa5"))),
        ("random_40_key_128_entries", SteeringState(True, True, _config(
            ALL, key=bytes((i * 37 + 11) % 256 for i in range(40)),
            table=tuple((i * 7) % 11 for i in range(128)), queues=11, unclassified=10))),
        ("table_of_one", SteeringState(True, True, _config(ALL, table=(2,), queues=3,
                                                           unclassified=1))),
        ("hash_only", SteeringState(True, False, _config(ALL))),
        ("disabled", SteeringState(False, False, None)),
    ]
    return on


STATES = _states()


def _apply(program: SteeringProgram, state: SteeringState) -> None:
    if state.config is None:
        program.disable()
    else:
        program.apply(state.config, redirect=state.redirect)
    assert program.read_state() == state


def _assert_conforms(program: SteeringProgram, state: SteeringState,
                     cases: list[tuple[str, bytes]]) -> None:
    """Every case the kernel can test-run (the others are run through a tap, live)."""
    _apply(program, state)
    cases = [(name, frame) for name, frame in cases if runnable(frame)]
    results = run_frames(program, [frame for _, frame in cases])
    for (name, frame), (retval, report) in zip(cases, results, strict=True):
        expected = expected_report(state, frame)
        assert (retval, report) == (expected.queue, expected), (name, frame.hex())
        if state.config is not None and report.report is not HashReport.NONE:
            hash_input = state.config.steer(frame).hash_input
            assert report.hash == toeplitz_oracle(state.config.key, hash_input), name


def test_edge_cases_hit_the_branch_they_name() -> None:
    state = SteeringState(True, True, _config(ALL))
    for name, frame, report in EDGE_CASES:
        assert expected_report(state, frame).report == report, name


@pytest.mark.parametrize(("name", "state"), STATES, ids=[name for name, _ in STATES])
def test_edge_cases_conform(program: SteeringProgram, name: str, state: SteeringState) -> None:
    _assert_conforms(program, state, [(case, frame) for case, frame, _ in EDGE_CASES])


TRUNCATED_BASES = {
    "tcp4_vlan_options": f.frame(f.ipv4("10.9.8.7", "10.6.5.4", f.tcp(1234, 80),
                                        options=bytes([1] * 8)),
                                 vlans=[(0x88A8, 3), (0x8100, 4)]),
    "udp6_ext_chain": _v6(f.udp(4000, 53), [f.hop_by_hop(), f.home_address(HOME),
                                            f.routing_type2(ROUTED), f.fragment(0, False),
                                            AH()]),
    "tcp6_long_chain": _v6(f.tcp(4000, 443), [f.hop_by_hop(bytes([1, 100]) + bytes(100)),
                                              _dstopts_raw(_PAD1 * 90 + _HOME_OPT),
                                              *[f.dest_options()] * 10,
                                              f.routing_type2(ROUTED), AH()]),
}


@pytest.mark.parametrize("base", list(TRUNCATED_BASES))
@pytest.mark.parametrize(("name", "state"), [STATES[0], STATES[-2]],
                         ids=[STATES[0][0], STATES[-2][0]])
def test_every_truncation_conforms(program: SteeringProgram, base: str, name: str,
                                   state: SteeringState) -> None:
    frame = TRUNCATED_BASES[base]
    cases = [(f"{base}[:{n}]", frame[:n]) for n in range(14, len(frame) + 1)]
    _assert_conforms(program, state, cases)


def test_microsoft_vectors(program: SteeringProgram) -> None:
    table = tuple(range(8))
    for types in (ALL, HashType.IPV4 | HashType.IPV6):
        state = SteeringState(True, True, _config(types, table=table, queues=8))
        _apply(program, state)
        cases = []
        for vectors, build in ((MS_IPV4, f.ipv4), (MS_IPV6, f.ipv6)):
            for src, sport, dst, dport, ip_hash, l4_hash in vectors:
                frame = f.frame(build(src, dst, f.tcp(sport, dport)))
                cases.append((frame, l4_hash if types == ALL else ip_hash))
        results = run_frames(program, [frame for frame, _ in cases])
        for (frame, published), (retval, report) in zip(cases, results, strict=True):
            assert report.hash == published, frame.hex()
            assert retval == report.queue == published & 7
            assert report == expected_report(state, frame)


def test_short_frames_cannot_be_test_run(program: SteeringProgram) -> None:
    """The kernel needs an Ethernet header, and a whole bare IP header for IP ethertypes."""
    with pytest.raises(ValueError, match="at least 14"):
        prog_test_run(program.fd, bytes(13))
    with pytest.raises(ValueError, match="at least 34"):
        prog_test_run(program.fd, _v4()[:33])
    with pytest.raises(ValueError, match="at least 54"):
        prog_test_run(program.fd, _v6()[:53])


def test_report_fields_of_a_vlan_ipv6_frame(program: SteeringProgram) -> None:
    """A report carries the flow and the L3 length a guest sees, hand-checked once."""
    state = SteeringState(True, True, _config(ALL))
    _apply(program, state)
    frame = f.frame(f.ipv6(V6S, V6D, f.udp(4321, 53, b"q" * 10), ext=[f.home_address(HOME)]),
                    vlans=[(0x8100, 9)])
    [(retval, report)] = run_frames(program, [frame])
    assert report.report is HashReport.UDPV6_EX
    assert report.ip_version == 6
    assert report.l4_proto == 17
    assert (report.src_port, report.dst_port) == (4321, 53)
    assert report.l3_offset == 18
    assert report.l3_len == len(frame) - 18 == 40 + 24 + 8 + 10
    assert report.src == struct.pack("!8H", 0x2001, 0xDB8, 1, 0, 0, 0, 0, 0x10)
    assert report.has_ext_headers and not report.fragment
    assert retval == report.queue
