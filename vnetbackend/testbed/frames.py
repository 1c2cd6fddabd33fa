"""Building Ethernet frames for tests, benchmarks and the traffic injector.

Small composable builders: ``frame(ipv4(..., tcp(...)))``. Checksums are filled in
so that a real network stack accepts the frames.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import NamedTuple

from vnetbackend.rss.frame import (
    ETH_P_IPV4,
    ETH_P_IPV6,
    HOME_ADDRESS_OPTION,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
)

BROADCAST_MAC = b"\xff" * 6
HOST_MAC = bytes.fromhex("02000000aa01")


def ip_bytes(text: str | bytes, version: int) -> bytes:
    """The packed form of an IPv4 or IPv6 address given as text or bytes."""
    packed = text if isinstance(text, bytes) else ipaddress.ip_address(text).packed
    if len(packed) != (4 if version == 4 else 16):
        raise ValueError(f"not an IPv{version} address: {text!r}")
    return packed


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class L3(NamedTuple):
    """An IP packet and the ethertype that carries it."""

    ethertype: int
    data: bytes


class L4:
    """A transport segment whose checksum needs the IP pseudo-header."""

    def __init__(self, proto: int, header: bytes, payload: bytes, csum_at: int) -> None:
        self.proto, self.header, self.payload, self.csum_at = proto, header, payload, csum_at

    def render(self, pseudo: bytes) -> bytes:
        segment = bytearray(self.header + self.payload)
        if self.csum_at >= 0:
            value = checksum(pseudo + bytes(segment))
            if self.proto == IPPROTO_UDP and value == 0:
                value = 0xFFFF
            segment[self.csum_at : self.csum_at + 2] = struct.pack("!H", value)
        return bytes(segment)


def tcp(sport: int, dport: int, payload: bytes = b"", *, flags: int = 0x02) -> L4:
    header = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    return L4(IPPROTO_TCP, header, payload, 16)


def udp(sport: int, dport: int, payload: bytes = b"") -> L4:
    header = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return L4(IPPROTO_UDP, header, payload, 6)


def raw(proto: int, data: bytes) -> L4:
    """Any other upper-layer payload (ICMP, GRE, ...), taken as it is."""
    return L4(proto, b"", data, -1)


def ipv4(src: str | bytes, dst: str | bytes, l4: L4, *, options: bytes = b"",
         fragment_offset: int = 0, more_fragments: bool = False, ident: int = 1) -> L3:
    """An IPv4 packet. *options* is padded to 4 bytes; offset is in 8-byte units."""
    s, d = ip_bytes(src, 4), ip_bytes(dst, 4)
    options += b"\0" * (-len(options) % 4)
    body = l4.render(s + d + struct.pack("!BBH", 0, l4.proto, len(l4.header + l4.payload)))
    ihl = 5 + len(options) // 4
    flags = (0x2000 if more_fragments else 0) | (fragment_offset & 0x1FFF)
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(body),
                                   ident, flags, 64, l4.proto, 0, s, d) + options)
    header[10:12] = struct.pack("!H", checksum(bytes(header)))
    return L3(ETH_P_IPV4, bytes(header) + body)


class Ext:
    """An IPv6 extension header; its next-header byte is filled in when chained."""

    def __init__(self, kind: int, body: bytes) -> None:
        self.kind, self.body = kind, body

    def render(self, next_header: int) -> bytes:
        if self.kind == IPPROTO_FRAGMENT:
            return bytes([next_header, 0]) + self.body
        length = 2 + len(self.body)
        padded = self.body + _pad_options(-length % 8)
        return bytes([next_header, (2 + len(padded)) // 8 - 1]) + padded


def _pad_options(size: int) -> bytes:
    if size == 0:
        return b""
    if size == 1:
        return b"\0"
    return bytes([1, size - 2]) + b"\0" * (size - 2)


def hop_by_hop(options: bytes = b"") -> Ext:
    return Ext(IPPROTO_HOPOPTS, options)


def dest_options(options: bytes = b"") -> Ext:
    return Ext(IPPROTO_DSTOPTS, options)


def home_address(addr: str | bytes) -> Ext:
    """A destination options header carrying the home address option (at 8n+6)."""
    return Ext(IPPROTO_DSTOPTS, _pad_options(4) + bytes([HOME_ADDRESS_OPTION, 16])
               + ip_bytes(addr, 6))


def routing_type2(addr: str | bytes) -> Ext:
    return Ext(IPPROTO_ROUTING, bytes([2, 1]) + b"\0" * 4 + ip_bytes(addr, 6))


def routing(segments: Sequence[str | bytes], routing_type: int = 0) -> Ext:
    addrs = b"".join(ip_bytes(a, 6) for a in segments)
    return Ext(IPPROTO_ROUTING, bytes([routing_type, len(segments)]) + b"\0" * 4 + addrs)


def fragment(offset: int = 0, more: bool = False, ident: int = 1) -> Ext:
    return Ext(IPPROTO_FRAGMENT, struct.pack("!HI", (offset << 3) | int(more), ident))


def ipv6(src: str | bytes, dst: str | bytes, l4: L4, *, ext: Sequence[Ext] = ()) -> L3:
    """An IPv6 packet with the extension headers *ext* in order before *l4*."""
    s, d = ip_bytes(src, 6), ip_bytes(dst, 6)
    seg_len = len(l4.header + l4.payload)
    body = l4.render(s + d + struct.pack("!IxxxB", seg_len, l4.proto))
    kinds = [e.kind for e in ext] + [l4.proto]
    chain = b"".join(e.render(kinds[i + 1]) for i, e in enumerate(ext))
    payload = chain + body
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), kinds[0], 64, s, d)
    return L3(ETH_P_IPV6, header + payload)


def frame(packet: L3, *, dst: bytes = BROADCAST_MAC, src: bytes = HOST_MAC,
          vlans: Sequence[tuple[int, int]] = ()) -> bytes:
    """An Ethernet frame around *packet*; *vlans* lists (tpid, vlan id), outermost first."""
    tags = b"".join(struct.pack("!HH", tpid, vid & 0xFFF) for tpid, vid in vlans)
    return dst + src + tags + struct.pack("!H", packet.ethertype) + packet.data
