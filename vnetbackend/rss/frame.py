"""From an Ethernet frame to the RSS hash input, as the virtio specification defines it.

`parse_frame` reads the fields hashing can use; `select_hash_input` applies an enabled
hash-type mask to them. Neither raises on any byte string: a frame that is truncated or
malformed simply has fewer fields, and the specification's rules then give its answer
(often "no hash", VIRTIO_NET_HASH_REPORT_NONE).

Reading of the specification where it leaves room, shared with the eBPF program:

* Up to two VLAN tags (802.1Q 0x8100 or 802.1ad 0x88a8) are skipped.
* An IPv4 header needs IHL >= 5 and all of its options inside the frame.
* A packet "has a TCP/UDP header" when it is not a fragment (IPv4 MF or offset set;
  an IPv6 fragment header with M or offset set) and the whole minimal header
  (TCP 20 bytes, UDP 8 bytes) is inside the frame.
* IPv6 extension headers are hop-by-hop (0), routing (43), fragment (44),
  authentication (51) and destination options (60). The specification sets no bound on
  the chain: it is walked to its end, however many headers it has, and a chain that runs
  past the frame's end has no transport header. The `_EX` hash types apply only to
  packets that carry an extension header; a packet without one is hashed by the plain
  IPv6 rules whatever `_EX` bits are set.
* The home address option (type 0xC9, 16 bytes) is looked for among all the options of
  destination options headers; the type 2 routing header must have length 2 (one
  address). The first of each found is used.
"""

from __future__ import annotations

from typing import NamedTuple

from vnetbackend.rss.types import HashReport, HashType

ETH_HEADER_LEN = 14
ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8)
MAX_VLAN_TAGS = 2

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51
IPPROTO_DSTOPTS = 60
IPV6_EXT_HEADERS = frozenset(
    {IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_AH, IPPROTO_DSTOPTS}
)
HOME_ADDRESS_OPTION = 0xC9

_L4_MIN_HEADER = {IPPROTO_TCP: 20, IPPROTO_UDP: 8}


class ParsedFrame(NamedTuple):
    """What a frame offers to the hash. ``ip_version`` 0 means not IP (or unreadable).

    ``src``/``dst`` are the IP header's addresses; ``ex_src``/``ex_dst`` are the ones the
    `_EX` types use (home address option, type 2 routing header), equal to
    ``src``/``dst`` where those are absent. ``l4_proto`` is 6 or 17 only when the
    transport header counts as present; ``ports`` are then its first four bytes.
    """

    ip_version: int = 0
    l3_offset: int = 0
    src: bytes = b""
    dst: bytes = b""
    ex_src: bytes = b""
    ex_dst: bytes = b""
    has_ext_headers: bool = False
    fragment: bool = False
    l4_proto: int = 0
    ports: bytes = b""
    frame_len: int = 0

    @property
    def l3_len(self) -> int:
        """Bytes from the start of the IP header to the end of the frame."""
        return self.frame_len - self.l3_offset if self.ip_version else 0


def _u16(frame: bytes, pos: int) -> int:
    """The big-endian 16-bit field at *pos*."""
    return frame[pos] << 8 | frame[pos + 1]


def outer_ethertype(frame: bytes) -> int:
    """The ethertype after the MAC addresses (a VLAN TPID if tagged); 0 if too short."""
    if len(frame) < ETH_HEADER_LEN:
        return 0
    return _u16(frame, ETH_HEADER_LEN - 2)


def _l3_offset(frame: bytes) -> tuple[int, int]:
    """(ethertype, offset of the L3 header) after up to two VLAN tags; (0, 0) if short."""
    if len(frame) < ETH_HEADER_LEN:
        return 0, 0
    ethertype = _u16(frame, ETH_HEADER_LEN - 2)
    offset = ETH_HEADER_LEN
    for _ in range(MAX_VLAN_TAGS):
        if ethertype not in VLAN_TPIDS:
            break
        if len(frame) < offset + 4:
            return 0, 0
        ethertype = _u16(frame, offset + 2)
        offset += 4
    return ethertype, offset


def _transport(frame: bytes, proto: int, offset: int) -> tuple[int, bytes]:
    need = _L4_MIN_HEADER.get(proto)
    if need is None or len(frame) < offset + need:
        return 0, b""
    return proto, frame[offset : offset + 4]


def _parse_ipv4(frame: bytes, off: int) -> ParsedFrame:
    end = len(frame)
    if end < off + 20 or frame[off] >> 4 != 4:
        return ParsedFrame(frame_len=end)
    ihl = (frame[off] & 0x0F) * 4
    if ihl < 20 or end < off + ihl:
        return ParsedFrame(frame_len=end)
    fragment = _u16(frame, off + 6) & 0x3FFF != 0
    src, dst = frame[off + 12 : off + 16], frame[off + 16 : off + 20]
    l4_proto, ports = (0, b"") if fragment else _transport(frame, frame[off + 9], off + ihl)
    return ParsedFrame(4, off, src, dst, src, dst, False, fragment, l4_proto, ports, end)


def _home_address(frame: bytes, start: int, end: int) -> bytes | None:
    """The home address option inside a destination options header's option area."""
    pos = start
    while pos < end:
        opt_type = frame[pos]
        if opt_type == 0:  # Pad1
            pos += 1
            continue
        if pos + 2 > end:
            return None
        opt_len = frame[pos + 1]
        if opt_type == HOME_ADDRESS_OPTION and opt_len == 16 and pos + 18 <= end:
            return frame[pos + 2 : pos + 18]
        pos += 2 + opt_len
    return None


def _parse_ipv6(frame: bytes, off: int) -> ParsedFrame:
    end = len(frame)
    if end < off + 40 or frame[off] >> 4 != 6:
        return ParsedFrame(frame_len=end)
    src, dst = frame[off + 8 : off + 24], frame[off + 24 : off + 40]
    next_header = frame[off + 6]
    pos = off + 40
    home = routed = None
    has_ext = fragment = False
    chain_ok = True
    while next_header in IPV6_EXT_HEADERS:
        has_ext = True
        if end < pos + 8:
            chain_ok = False
            break
        if next_header == IPPROTO_FRAGMENT:
            length = 8
            if _u16(frame, pos + 2) & 0xFFF9:
                fragment = True
        elif next_header == IPPROTO_AH:
            length = (frame[pos + 1] + 2) * 4
        else:
            length = (frame[pos + 1] + 1) * 8
        if end < pos + length:
            chain_ok = False
            break
        if next_header == IPPROTO_ROUTING and routed is None:
            if frame[pos + 2] == 2 and frame[pos + 1] == 2:
                routed = frame[pos + 8 : pos + 24]
        elif next_header == IPPROTO_DSTOPTS and home is None:
            home = _home_address(frame, pos + 2, pos + length)
        next_header = frame[pos]
        pos += length
    if chain_ok and not fragment:
        l4_proto, ports = _transport(frame, next_header, pos)
    else:
        l4_proto, ports = 0, b""
    return ParsedFrame(
        6, off, src, dst, home or src, routed or dst, has_ext, fragment, l4_proto, ports, end
    )


def parse_frame(frame: bytes) -> ParsedFrame:
    """Read the hashable fields of an Ethernet frame; never raises."""
    frame = bytes(frame)
    ethertype, off = _l3_offset(frame)
    if ethertype == ETH_P_IPV4:
        return _parse_ipv4(frame, off)
    if ethertype == ETH_P_IPV6:
        return _parse_ipv6(frame, off)
    return ParsedFrame(frame_len=len(frame))


#: Where a plain IPv4 frame (see `plain_ipv4_flow`) has its addresses and ports.
_PLAIN_IPV4_FLOW = slice(ETH_HEADER_LEN + 12, ETH_HEADER_LEN + 24)


def plain_ipv4_flow(frame: bytes) -> tuple[int, bytes] | None:
    """The commonest frame's flow, read directly: for untagged IPv4 with a 20-byte header,
    not a fragment, carrying a whole TCP or UDP header, (``l4_proto``, ``src + dst +
    ports``) as `parse_frame` would give them; None for every other frame.
    """
    if (len(frame) < ETH_HEADER_LEN + 20 or _u16(frame, ETH_HEADER_LEN - 2) != ETH_P_IPV4
            or frame[ETH_HEADER_LEN] != 0x45 or _u16(frame, ETH_HEADER_LEN + 6) & 0x3FFF):
        return None
    proto = frame[ETH_HEADER_LEN + 9]
    need = _L4_MIN_HEADER.get(proto)
    if need is None or len(frame) < ETH_HEADER_LEN + 20 + need:
        return None
    return proto, frame[_PLAIN_IPV4_FLOW]


_V4_RULES = (
    (IPPROTO_TCP, int(HashType.TCPV4), HashReport.TCPV4),
    (IPPROTO_UDP, int(HashType.UDPV4), HashReport.UDPV4),
    (0, int(HashType.IPV4), HashReport.IPV4),
)
_V6_RULES = (
    (IPPROTO_TCP, int(HashType.TCPV6), HashReport.TCPV6),
    (IPPROTO_UDP, int(HashType.UDPV6), HashReport.UDPV6),
    (0, int(HashType.IPV6), HashReport.IPV6),
)
_V6_EX_RULES = (
    (IPPROTO_TCP, int(HashType.TCP_EX), HashReport.TCPV6_EX),
    (IPPROTO_UDP, int(HashType.UDP_EX), HashReport.UDPV6_EX),
    (0, int(HashType.IP_EX), HashReport.IPV6_EX),
)

NO_HASH: tuple[HashReport, bytes] = (HashReport.NONE, b"")


def _first_rule(
    parsed: ParsedFrame, rules: tuple[tuple[int, int, HashReport], ...],
    hash_types: int, src: bytes, dst: bytes,
) -> tuple[HashReport, bytes] | None:
    for proto, enabling_type, report in rules:
        if not hash_types & enabling_type:
            continue
        if proto == 0:
            return report, src + dst
        if parsed.l4_proto == proto:
            return report, src + dst + parsed.ports
    return None


def select_hash_input(parsed: ParsedFrame, hash_types: int) -> tuple[HashReport, bytes]:
    """The report type and the bytes to hash for *parsed* under the enabled *hash_types*."""
    hash_types = int(hash_types)  # plain int: flag-enum arithmetic is slow on this path
    if parsed.ip_version == 4:
        return _first_rule(parsed, _V4_RULES, hash_types, parsed.src, parsed.dst) or NO_HASH
    if parsed.ip_version == 6:
        if parsed.has_ext_headers:
            chosen = _first_rule(parsed, _V6_EX_RULES, hash_types, parsed.ex_src, parsed.ex_dst)
            if chosen:
                return chosen
        return _first_rule(parsed, _V6_RULES, hash_types, parsed.src, parsed.dst) or NO_HASH
    return NO_HASH
