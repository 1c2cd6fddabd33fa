"""Where QEMU's RSS and the model (`vnetbackend.rss`) part, per QEMU version, as data.

Each `Departure` names a frame class, what the model gives, what QEMU does, the evidence,
the QEMU versions it was seen on, a predicate that recognises such frames and QEMU's
steering for them. The guest checks expect QEMU's behaviour for recognised frames, so a
difference is asserted to be exactly as documented rather than hidden
(`vnetbackend.checker`), and only on the versions it was seen on (`departures_for`).

Two kinds are told apart (`Kind`): QEMU departing from the virtio specification, and
places where the specification is silent or open, QEMU reads it one way and the model
another (the model's reading is stated in `vnetbackend.rss.frame`).

Found with the guest tests (Debian 6.1 guest on QEMU 7.2.22, Debian 6.12 guest on QEMU
10.0.2; hash types 0x3f, key and table read back with ethtool -x); the reported hashes
were recomputed by hand with `vnetbackend.rss.toeplitz` over the inputs named below.

Checked the same way and found to agree with the model on both versions (every key,
table and hash-type set of tests/guest/test_rss_in_guest.py): IPv4 and IPv6 with TCP,
UDP and ICMP; IPv4 options; IPv4 and IPv6 first and later fragments; hop-by-hop,
destination options with the home address option, type 2 routing; chains of nine
extension headers (QEMU's userspace walks the whole chain, as the model does: the
specification sets no bound); 802.1Q, 802.1ad, QinQ and three tags; ARP; IPv4 and IPv6
frames cut inside their TCP/UDP header or inside an extension header.
Not reachable from a Linux guest: the ``_EX`` hash types (its driver never sets them);
what QEMU does with them is documented from its source (`EX_WITHOUT_EXTENSION_HEADERS`).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vnetbackend.rss import HashReport, HashType, RssConfig, Steering, toeplitz
from vnetbackend.rss.frame import (
    ETH_P_IPV6,
    IPPROTO_AH,
    IPPROTO_FRAGMENT,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_EXT_HEADERS,
    ParsedFrame,
    outer_ethertype,
    parse_frame,
)

_L4_MIN_HEADER = {IPPROTO_TCP: 20, IPPROTO_UDP: 8}
_V6_L4 = {IPPROTO_TCP: (HashType.TCPV6, HashReport.TCPV6),
          IPPROTO_UDP: (HashType.UDPV6, HashReport.UDPV6)}


QemuSeries = tuple[int, int]


class Kind(enum.Enum):
    """Whose reading differs: QEMU's from the specification's, or QEMU's from the model's
    where the specification leaves the matter open."""

    DEPARTS = "QEMU departs from the virtio specification"
    SPEC_OPEN = "the virtio specification is silent or open; QEMU and the model read it differently"


@dataclass(frozen=True, slots=True)
class Departure:
    """One documented difference. ``seen_on`` lists the QEMU (major, minor) series it was
    seen on, with the evidence; ``recognises(config, frame)`` and ``qemu_steer(config,
    frame)`` give the frames concerned and QEMU's steering of them."""

    name: str
    kind: Kind
    frame_class: str
    spec: str
    qemu: str
    evidence: str
    seen_on: tuple[QemuSeries, ...]
    recognises: Callable[[RssConfig, bytes], bool]
    qemu_steer: Callable[[RssConfig, bytes], Steering]


@dataclass(frozen=True, slots=True)
class _Chain:
    """An IPv6 header chain walked the way QEMU 7.2 walks it (no limit on the count)."""

    l3_offset: int
    headers: tuple[tuple[int, int], ...]  # (type, offset) of each extension header
    l4_proto: int
    l4_offset: int


@functools.lru_cache(maxsize=256)
def _qemu_chain(frame: bytes) -> _Chain | None:
    """QEMU's walk: every extension header's length is (byte 1 + 1) * 8, AH included.

    Cached: each departure's predicate and steering walk the same frame again.
    """
    parsed = parse_frame(frame)
    if parsed.ip_version != 6 or outer_ethertype(frame) != ETH_P_IPV6:
        return None
    off = parsed.l3_offset
    next_header, pos = frame[off + 6], off + 40
    headers = []
    while next_header in IPV6_EXT_HEADERS:
        if pos + 8 > len(frame):
            return None
        headers.append((next_header, pos))
        next_header, pos = frame[pos], pos + (frame[pos + 1] + 1) * 8
    return _Chain(off, tuple(headers), next_header, pos)


def _v6_steer(config: RssConfig, frame: bytes, chain: _Chain, use_ports: bool,
              l4_types: dict[int, tuple[HashType, HashReport]] = _V6_L4) -> Steering:
    """Steering of an IPv6 frame over its header's addresses (and ports with
    *use_ports*), by the TCP/UDP hash types and reports in *l4_types*."""
    src = frame[chain.l3_offset + 8 : chain.l3_offset + 24]
    dst = frame[chain.l3_offset + 24 : chain.l3_offset + 40]
    l4 = l4_types.get(chain.l4_proto)
    need = _L4_MIN_HEADER.get(chain.l4_proto, 0)
    if use_ports and l4 and config.hash_types & l4[0] and chain.l4_offset + need <= len(frame):
        data, report = src + dst + frame[chain.l4_offset : chain.l4_offset + 4], l4[1]
    elif config.hash_types & HashType.IPV6:
        data, report = src + dst, HashReport.IPV6
    else:
        return Steering(0, HashReport.NONE, config.unclassified_queue, b"")
    value = toeplitz(config.key, data)
    table = config.indirection_table
    return Steering(value, report, table[value & (len(table) - 1)], data)


def _has_auth_header(_: RssConfig, frame: bytes) -> bool:
    chain = _qemu_chain(frame)
    return chain is not None and any(kind == IPPROTO_AH for kind, _ in chain.headers)


def _auth_header_steer(config: RssConfig, frame: bytes) -> Steering:
    chain = _qemu_chain(frame)
    assert chain is not None
    return _v6_steer(config, frame, chain, use_ports=True)


def _atomic_fragment(_: RssConfig, frame: bytes) -> bool:
    """An IPv6 fragment header with offset 0 and M clear (RFC 6946 "atomic fragment")."""
    chain = _qemu_chain(frame)
    if chain is None:
        return False
    return any(kind == IPPROTO_FRAGMENT and not parse_frame(frame).fragment
               for kind, _ in chain.headers)


def _atomic_fragment_steer(config: RssConfig, frame: bytes) -> Steering:
    chain = _qemu_chain(frame)
    assert chain is not None
    return _v6_steer(config, frame, chain, use_ports=False)


_EX_L4 = {IPPROTO_TCP: (HashType.TCP_EX, HashReport.TCPV6_EX),
          IPPROTO_UDP: (HashType.UDP_EX, HashReport.UDPV6_EX)}
_EX_TYPES = HashType.IP_EX | HashType.TCP_EX | HashType.UDP_EX


def _ex_without_extension_headers(config: RssConfig, frame: bytes) -> bool:
    """An IPv6 TCP/UDP frame with no extension header while the matching _EX type is on."""
    chain = _qemu_chain(frame)
    if chain is None or chain.headers or chain.l4_proto not in _EX_L4:
        return False
    return bool(config.hash_types & _EX_L4[chain.l4_proto][0]) and \
        chain.l4_offset + _L4_MIN_HEADER[chain.l4_proto] <= len(frame)


def _ex_without_extension_headers_steer(config: RssConfig, frame: bytes) -> Steering:
    chain = _qemu_chain(frame)
    assert chain is not None
    return _v6_steer(config, frame, chain, use_ports=True, l4_types=_EX_L4)


AUTH_HEADER_LENGTH = Departure(
    name="ipv6-ah-length",
    kind=Kind.DEPARTS,
    frame_class="IPv6 with an authentication header (51) before TCP/UDP",
    spec="AH's length field counts 4-byte words minus 2 (RFC 4302); the TCP/UDP header "
         "follows AH and its ports are hashed (TCPv6/UDPv6)",
    qemu="reads AH's length as 8-byte units like other extension headers, so it takes the "
         "4 bytes at AH + (len + 1) * 8 as the ports (an L4 hash over the wrong bytes); "
         "the frame is still reported as TCPv6/UDPv6",
    evidence="AH of 16 bytes (len 2) before TCP: the guest saw l4_hash=1 with "
             "hash = Toeplitz(src, dst, TCP bytes 8..11) instead of (src, dst, ports), "
             "on QEMU 7.2.22 and 10.0.2",
    seen_on=((7, 2), (10, 0)),
    recognises=_has_auth_header,
    qemu_steer=_auth_header_steer,
)

ATOMIC_FRAGMENT = Departure(
    name="ipv6-atomic-fragment",
    kind=Kind.SPEC_OPEN,
    frame_class="IPv6 with a fragment header of offset 0 and M clear before TCP/UDP",
    spec="the specification says nothing about fragments; the model reads an atomic "
         "fragment (RFC 6946) as the whole packet it is: TCPv6/UDPv6 over the ports",
    qemu="any fragment header marks the packet as a fragment: IPv6 hash over the "
         "addresses only, reported as IPv6",
    evidence="UDP behind an atomic fragment header: the guest saw l4_hash=0 with "
             "hash = Toeplitz(src, dst), on QEMU 7.2.22 and 10.0.2",
    seen_on=((7, 2), (10, 0)),
    recognises=_atomic_fragment,
    qemu_steer=_atomic_fragment_steer,
)

EX_WITHOUT_EXTENSION_HEADERS = Departure(
    name="ipv6-ex-without-extension-headers",
    kind=Kind.SPEC_OPEN,
    frame_class="IPv6 TCP/UDP without extension headers, TCP_EX/UDP_EX enabled",
    spec="the specification's text applies the _EX types to packets that carry "
         "extension headers; the model hashes a packet without them by TCPv6/UDPv6 (or "
         "IPv6) and reports that type. NDIS lets a NIC report either",
    qemu="with TCP_EX (UDP_EX) set, every IPv6 TCP (UDP) packet is hashed the _EX way, "
         "over its header's addresses and ports, and reported as TCPv6_EX (UDPv6_EX)",
    evidence="QEMU's source, hw/net/virtio-net.c (virtio_net_get_hash_type, 7.2 and 10.0): "
             "the _EX bit alone picks the _EX hash for any IPv6 TCP/UDP packet. "
             "Not reachable from a Linux guest, whose driver never sets _EX types",
    seen_on=((7, 2), (10, 0)),
    recognises=_ex_without_extension_headers,
    qemu_steer=_ex_without_extension_headers_steer,
)

def _cut_before_extension_length(_: RssConfig, frame: bytes) -> bool:
    """An IPv6 frame that ends one byte into an extension header: its next-header byte
    is there, its length byte is not."""
    parsed = parse_frame(frame)
    if parsed.ip_version != 6 or outer_ethertype(frame) != ETH_P_IPV6:
        return False
    next_header, pos = frame[parsed.l3_offset + 6], parsed.l3_offset + 40
    while next_header in IPV6_EXT_HEADERS and pos + 2 <= len(frame):
        next_header, pos = frame[pos], pos + (frame[pos + 1] + 1) * 8
    return next_header in IPV6_EXT_HEADERS and len(frame) - pos == 1


def _not_hashed(config: RssConfig, _: bytes) -> Steering:
    return Steering(0, HashReport.NONE, config.unclassified_queue, b"")


EXTENSION_HEADER_CUT_BEFORE_LENGTH = Departure(
    name="ipv6-extension-header-cut-before-length",
    kind=Kind.SPEC_OPEN,
    frame_class="IPv6 frame ending one byte into an extension header",
    spec="the specification says nothing of malformed packets; the model hashes an IPv6 "
         "packet whose extension chain is cut by its IPv6 addresses (IPv6)",
    qemu="QEMU 10.0 does not take the packet for IPv6 at all: no hash, report NONE, "
         "the default queue (QEMU 7.2 hashes the addresses, as the model does)",
    evidence="ipv6_truncated_ext_udp cut one byte into its hop-by-hop header (L3 length "
             "41): on QEMU 10.0.2 the guest saw hash 0 on queue 0; on 7.2.22 the model's "
             "IPv6 hash. Cut 2 to 15 bytes in, both versions agree with the model",
    seen_on=((10, 0),),
    recognises=_cut_before_extension_length,
    qemu_steer=_not_hashed,
)

DEPARTURES: tuple[Departure, ...] = (AUTH_HEADER_LENGTH, ATOMIC_FRAGMENT,
                                     EX_WITHOUT_EXTENSION_HEADERS,
                                     EXTENSION_HEADER_CUT_BEFORE_LENGTH)


def departures_for(qemu_version: Sequence[int]) -> tuple[Departure, ...]:
    """The departures seen on QEMU *qemu_version*'s (major, minor) series; none for a
    series nobody has looked at, so that there every difference shows as one."""
    series = (qemu_version[0], qemu_version[1])
    return tuple(departure for departure in DEPARTURES if series in departure.seen_on)


def may_depart(config: RssConfig, parsed: ParsedFrame) -> bool:
    """Whether any departure here can concern the frame: all are about IPv6 extension
    headers or the _EX types, so other frames need not be tried against each predicate."""
    return parsed.ip_version == 6 and (parsed.has_ext_headers
                                       or bool(config.hash_types & _EX_TYPES))


def find_departure(config: RssConfig, frame: bytes, parsed: ParsedFrame,
                   departures: Sequence[Departure] = DEPARTURES) -> Departure | None:
    """The departure that concerns *frame* (read as *parsed*) under *config*, if any."""
    if may_depart(config, parsed):
        for departure in departures:
            if departure.recognises(config, frame):
                return departure
    return None
