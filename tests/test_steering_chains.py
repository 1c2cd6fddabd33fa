"""Long IPv6 extension chains and full option lists: program, model and frame agree.

The specification sets no bound on the extension chain or on a destination options
header's options; the program and the model walk them to their end. The frames here are
built with chains of 0 to 64 headers of every kind, and with destination options headers
whose option list (Pad1, PadN, unknown options, the home address option early, late or
not at all) fills the header, up to the largest header there is (2048 bytes).

Expectations come from how each frame was built: the builder knows which headers carry the
first home address and the first type 2 routing address, and whether a fragment header
makes the packet a fragment; the hash is `tests.oracle.toeplitz_oracle` (written apart
from the model) over that input. The program (BPF_PROG_TEST_RUN) must report it, and
equal the reference model.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.oracle import toeplitz_oracle
from tests.prereq import need_bcc
from vnetbackend.rss import HashReport, HashType, RssConfig
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.steering import SteeringProgram, SteeringState
from vnetbackend.steering.conformance import expected_report, run_frames
from vnetbackend.testbed import frames as f

SRC, DST = "2001:db8:1::10", "2001:db8:2::20"
PORTS = (40000, 443)
HOA = 0xC9
#: Largest extension header: the length field counts 8-byte units past the first.
MAX_HEADER = (255 + 1) * 8
#: Every hash type on, or only the plain ones (the _EX addresses then do not count).
EX_TYPES = HashType(0x1FF)
PLAIN_TYPES = HashType(0x3F)


class AuthHeader(f.Ext):
    """An authentication header: its length counts 4-byte units, minus 2."""

    def render(self, next_header: int) -> bytes:
        return bytes([next_header, (2 + len(self.body)) // 4 - 2]) + self.body


def _options_header(options: bytes) -> f.Ext:
    """A destination options header holding exactly *options* (8n + 6 bytes)."""
    assert (len(options) + 2) % 8 == 0, len(options)
    return f.Ext(60, options)


def _address(rng: random.Random) -> bytes:
    return bytes([0x20, 0x01, 0x0D, 0xB8]) + rng.randbytes(12)


@dataclass
class Built:
    """A frame and what it was built to carry."""

    name: str
    frame: bytes
    l4: int                 # 6 or 17, or 0 when the packet is a fragment
    home: bytes | None      # the first home address option's address
    routed: bytes | None    # the first type 2 routing header's address
    has_ext: bool

    def expected(self, types: HashType) -> tuple[HashReport, bytes]:
        """Report type and hash input by the specification's rules, from what was built:
        a packet with extension headers is hashed by the first _EX rule enabled for it,
        with the home and type 2 routing addresses; failing that, by the plain rules."""
        src, dst = f.ip_bytes(SRC, 6), f.ip_bytes(DST, 6)
        ports = PORTS[0].to_bytes(2, "big") + PORTS[1].to_bytes(2, "big")
        ex = (HashType.TCP_EX, HashType.UDP_EX, HashType.IP_EX,
              HashReport.TCPV6_EX, HashReport.UDPV6_EX, HashReport.IPV6_EX)
        plain = (HashType.TCPV6, HashType.UDPV6, HashType.IPV6,
                 HashReport.TCPV6, HashReport.UDPV6, HashReport.IPV6)
        for rules, ex_addresses in ((ex, True), (plain, False)):
            if ex_addresses and not self.has_ext:
                continue
            tcp, udp, ip, tcp_report, udp_report, ip_report = rules
            addresses = ((self.home or src) + (self.routed or dst) if ex_addresses
                         else src + dst)
            if self.l4 == 6 and types & tcp:
                return tcp_report, addresses + ports
            if self.l4 == 17 and types & udp:
                return udp_report, addresses + ports
            if types & ip:
                return ip_report, addresses
        return HashReport.NONE, b""


def _random_chain(rng: random.Random, count: int, udp: bool) -> Built:
    """*count* extension headers of random kinds before TCP or UDP."""
    ext: list[f.Ext] = []
    home = routed = None
    fragment = False
    for _ in range(count):
        kind = rng.choice(["hop", "dst", "home", "route0", "route2", "frag", "ah"])
        if kind == "hop":
            ext.append(f.hop_by_hop(rng.choice([b"", bytes([1, 10]) + bytes(10)])))
        elif kind == "dst":
            ext.append(f.dest_options(bytes([0x1E, 3]) + rng.randbytes(3)))
        elif kind == "home":
            address = _address(rng)
            home = home or address
            ext.append(f.home_address(address))
        elif kind == "route0":
            ext.append(f.routing([_address(rng)]))
        elif kind == "route2":
            address = _address(rng)
            routed = routed or address
            ext.append(f.routing_type2(address))
        elif kind == "frag":
            offset, more = rng.choice([(0, False), (0, False), (0, True), (9, False)])
            fragment = fragment or offset != 0 or more
            ext.append(f.fragment(offset, more))
        else:
            ext.append(AuthHeader(51, bytes(10 + 4 * rng.randrange(4))))
    l4 = f.udp(*PORTS, b"u") if udp else f.tcp(*PORTS, b"t")
    frame = f.frame(f.ipv6(SRC, DST, l4, ext=ext))
    return Built(f"chain_{count}_{'udp' if udp else 'tcp'}", frame,
                 0 if fragment else l4.proto, home, routed, bool(ext))


def _full_options(name: str, options: bytes, size: int, home_at: int | None) -> Built:
    """A destination options header of *size* bytes whose options are *options* repeated
    (cut to fit), with the home address option at option area offset *home_at*."""
    area = size - 2
    home = bytes.fromhex("20010db8aaaa00000000000000000001")
    layout = (options * (area // len(options) + 1))[:area]
    if home_at is not None:
        layout = layout[:home_at] + bytes([HOA, 16]) + home + layout[home_at + 18:]
        assert len(layout) == area
    frame = f.frame(f.ipv6(SRC, DST, f.tcp(*PORTS), ext=[_options_header(layout)]))
    return Built(name, frame, 6, home if home_at is not None else None, None, True)


def _cases() -> list[Built]:
    rng = random.Random(64)
    cases = [_random_chain(rng, count, udp)
             for count in range(65) for udp in (False, True)]
    cases += [
        Built(f"dest_options_{n}", f.frame(f.ipv6(SRC, DST, f.tcp(*PORTS),
                                                  ext=[f.dest_options()] * n)),
              6, None, None, n > 0)
        for n in (1, 8, 9, 11, 12, 64)
    ]
    pad1, padn0, padn5, unknown = b"\0", bytes([1, 0]), bytes([1, 5]) + bytes(5), b"\x1e\x01x"
    cases.append(_full_options("pad1_8_no_home", pad1, 8, None))
    for size in (64, 256, 1024, MAX_HEADER):
        last = size - 2 - 18
        # Pad1 runs break the option list into 1-byte options: the most options there are.
        cases += [
            _full_options(f"pad1_{size}_home_last", pad1, size, last),
            _full_options(f"pad1_{size}_no_home", pad1, size, None),
            _full_options(f"pad1_{size}_home_first", pad1, size, 0),
        ]
        if last % 2 == 0:
            cases.append(_full_options(f"padn0_{size}_home_last", padn0, size, last))
        if last % 7 == 0:
            cases.append(_full_options(f"padn5_{size}_home_last", padn5, size, last))
        if last % 3 == 0:
            cases.append(_full_options(f"unknown_{size}_home_last", unknown, size, last))
    # A wrong-length home address option is skipped by its length; the next one counts.
    wrong = bytes([HOA, 14]) + bytes(14)
    home2 = bytes.fromhex("20010db8bbbb00000000000000000002")
    options = wrong + b"\0" * 100 + bytes([HOA, 16]) + home2
    options += b"\0" * (-(len(options) + 2) % 8)
    frame = f.frame(f.ipv6(SRC, DST, f.udp(*PORTS), ext=[_options_header(options)]))
    cases.append(Built("wrong_length_home_then_home", frame, 17, home2, None, True))
    return cases


CASES = _cases()


def _config(types: HashType) -> RssConfig:
    return RssConfig(hash_types=types, key=MICROSOFT_KEY, indirection_table=range(8),
                     queues=8)


@pytest.fixture(scope="module")
def program() -> Iterator[SteeringProgram]:
    need_bcc()
    with SteeringProgram() as loaded:
        yield loaded


@settings(max_examples=400, deadline=None)
@given(rng=st.randoms(use_true_random=False), count=st.integers(0, 12), udp=st.booleans(),
       types=st.integers(0, 0x1FF))
def test_any_chain_is_hashed_by_the_specification(rng: random.Random, count: int, udp: bool,
                                                  types: int) -> None:
    """Chains drawn by hypothesis, every hash-type set: the _EX address choices and the
    hash input follow from how the frame was built, the hash from the oracle."""
    case = _random_chain(rng, count, udp)
    report, data = case.expected(HashType(types))
    steering = _config(HashType(types)).steer(case.frame)
    assert (steering.report, steering.hash_input) == (report, data), case.frame.hex()
    assert steering.hash == (toeplitz_oracle(MICROSOFT_KEY, data) if data else 0)


def test_the_cases_cover_what_they_name() -> None:
    counts = {case.name for case in CASES}
    assert {f"chain_{n}_tcp" for n in range(65)} <= counts
    assert max(len(case.frame) for case in CASES) == 14 + 40 + MAX_HEADER + 20
    assert any(case.home for case in CASES if case.name.startswith("pad1_2048"))
    reports = {case.expected(EX_TYPES)[0] for case in CASES}
    assert {HashReport.TCPV6_EX, HashReport.UDPV6_EX, HashReport.IPV6_EX,
            HashReport.TCPV6} <= reports


@pytest.mark.parametrize("types", [EX_TYPES, PLAIN_TYPES], ids=["ex", "plain"])
def test_the_model_gives_what_the_frames_carry(types: HashType) -> None:
    config = _config(types)
    for case in CASES:
        report, data = case.expected(types)
        steering = config.steer(case.frame)
        assert (steering.report, steering.hash_input) == (report, data), case.name
        assert steering.hash == toeplitz_oracle(MICROSOFT_KEY, data), case.name


@pytest.mark.parametrize("types", [EX_TYPES, PLAIN_TYPES], ids=["ex", "plain"])
def test_the_program_gives_what_the_frames_carry(program: SteeringProgram,
                                                  types: HashType) -> None:
    state = SteeringState(True, True, _config(types))
    program.apply(_config(types))
    results = run_frames(program, [case.frame for case in CASES])
    for case, (retval, report) in zip(CASES, results, strict=True):
        kind, data = case.expected(types)
        expected_hash = toeplitz_oracle(MICROSOFT_KEY, data) if data else 0
        assert (report.report, report.hash) == (kind, expected_hash), case.name
        assert retval == report.queue == (expected_hash & 7 if data else 0), case.name
        assert report == expected_report(state, case.frame), case.name
