"""Batches of crafted frames, each identifiable in the guest's records.

Every frame of a batch gets a distinct L3 length (its payload is padded to it), so the
guest's record of it is found by (length, ethertype). Frame classes cover what RSS
distinguishes: IPv4/IPv6 with TCP, UDP or another protocol, IPv4 options, fragments
(first and later), IPv6 extension headers (hop-by-hop, destination options with the
home address option, type 2 routing, authentication header, a long chain, atomic
fragments), VLAN tags (802.1Q, 802.1ad, QinQ, three tags) and non-IP. Addresses and
ports are drawn from a seeded generator so that hashes spread.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vnetbackend.rss.frame import ETH_HEADER_LEN, IPPROTO_AH, outer_ethertype
from vnetbackend.testbed import frames as f

IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
#: Keep every frame below the guest's 1500-byte MTU.
MAX_L3_LEN = 1500


class AuthHeader(f.Ext):
    """An IPv6 authentication header (its length counts 4-byte words, minus 2)."""

    def __init__(self, spi: int = 0x100, icv: bytes = bytes(4)) -> None:
        if (len(icv) + 12) % 8:
            raise ValueError("an IPv6 authentication header is a multiple of 8 bytes")
        super().__init__(IPPROTO_AH, struct.pack("!HII", 0, spi, 1) + icv)

    def render(self, next_header: int) -> bytes:
        total = 2 + len(self.body)
        return bytes([next_header, total // 4 - 2]) + self.body


@dataclass(frozen=True, slots=True)
class Probe:
    """One frame of a batch and the class it was built from."""

    frame_class: str
    frame: bytes

    @property
    def l3_len(self) -> int:
        """What the guest's tracepoint reports as ``len``: bytes after the MAC header."""
        return len(self.frame) - ETH_HEADER_LEN

    @property
    def ethertype(self) -> int:
        """What the guest reports as ``protocol`` (the first tag's TPID for VLAN frames)."""
        return outer_ethertype(self.frame)


#: A frame class: (random source, payload, destination MAC) -> Ethernet frame.
Builder = Callable[[random.Random, bytes, bytes], bytes]


def _v4(rng: random.Random) -> tuple[str, str]:
    return (f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}")


def _v6(rng: random.Random) -> tuple[str, str]:
    return (f"2001:db8:{rng.randrange(1 << 16):x}::{rng.randrange(1, 1 << 16):x}",
            f"fd00:{rng.randrange(1 << 16):x}::{rng.randrange(1, 1 << 16):x}")


def _port(rng: random.Random) -> int:
    return rng.randrange(1, 1 << 16)


def _home(rng: random.Random) -> str:
    return f"2001:db8:ffff::{rng.randrange(1, 1 << 16):x}"


def _ipv4_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv4(*_v4(rng), f.tcp(_port(rng), _port(rng), payload)), dst=mac)


def _ipv4_udp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv4(*_v4(rng), f.udp(_port(rng), _port(rng), payload)), dst=mac)


def _ipv4_icmp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv4(*_v4(rng), f.raw(IPPROTO_ICMP, b"\x08\0\0\0" + payload)), dst=mac)


def _ipv4_options_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    router_alert = b"\x94\x04\0\0"
    return f.frame(f.ipv4(*_v4(rng), f.tcp(_port(rng), _port(rng), payload),
                          options=router_alert), dst=mac)


def _ipv4_first_fragment_udp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv4(*_v4(rng), f.udp(_port(rng), _port(rng), payload),
                          more_fragments=True, ident=rng.randrange(1 << 16)), dst=mac)


def _ipv4_later_fragment_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv4(*_v4(rng), f.tcp(_port(rng), _port(rng), payload),
                          fragment_offset=rng.randrange(1, 100),
                          ident=rng.randrange(1 << 16)), dst=mac)


def _ipv6_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.tcp(_port(rng), _port(rng), payload)), dst=mac)


def _ipv6_udp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.udp(_port(rng), _port(rng), payload)), dst=mac)


def _ipv6_icmp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.raw(IPPROTO_ICMPV6, b"\x80\0\0\0" + payload)),
                   dst=mac)


def _ipv6_hop_by_hop_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.tcp(_port(rng), _port(rng), payload),
                          ext=[f.hop_by_hop()]), dst=mac)


def _ipv6_home_address_udp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.udp(_port(rng), _port(rng), payload),
                          ext=[f.home_address(_home(rng))]), dst=mac)


def _ipv6_routing_type2_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.tcp(_port(rng), _port(rng), payload),
                          ext=[f.hop_by_hop(), f.routing_type2(_home(rng))]), dst=mac)


def _ipv6_auth_header_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.tcp(_port(rng), _port(rng), payload),
                          ext=[AuthHeader(icv=rng.randbytes(rng.choice((4, 12))))]),
                   dst=mac)


def _ipv6_long_chain_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    """Nine destination options headers before TCP: the specification walks any chain to
    its end."""
    return f.frame(f.ipv6(*_v6(rng), f.tcp(_port(rng), _port(rng), payload),
                          ext=[f.dest_options() for _ in range(9)]), dst=mac)


def _ipv6_first_fragment_udp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.udp(_port(rng), _port(rng), payload),
                          ext=[f.fragment(0, more=True, ident=rng.randrange(1 << 32))]), dst=mac)


def _ipv6_later_fragment_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.tcp(_port(rng), _port(rng), payload),
                          ext=[f.fragment(rng.randrange(1, 100), ident=rng.randrange(1 << 32))]),
                   dst=mac)


def _ipv6_atomic_fragment_udp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.udp(_port(rng), _port(rng), payload),
                          ext=[f.fragment(0, more=False, ident=rng.randrange(1 << 32))]), dst=mac)


def _vlan_ipv4_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv4(*_v4(rng), f.tcp(_port(rng), _port(rng), payload)), dst=mac,
                   vlans=[(0x8100, rng.randrange(1, 4095))])


def _qinq_ipv6_udp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv6(*_v6(rng), f.udp(_port(rng), _port(rng), payload)), dst=mac,
                   vlans=[(0x88A8, rng.randrange(1, 4095)), (0x8100, rng.randrange(1, 4095))])


def _svlan_ipv4_udp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    return f.frame(f.ipv4(*_v4(rng), f.udp(_port(rng), _port(rng), payload)), dst=mac,
                   vlans=[(0x88A8, rng.randrange(1, 4095))])


def _triple_vlan_ipv4_tcp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    """Three tags: one more than the specification's reading skips (MAX_VLAN_TAGS)."""
    return f.frame(f.ipv4(*_v4(rng), f.tcp(_port(rng), _port(rng), payload)), dst=mac,
                   vlans=[(0x88A8, rng.randrange(1, 4095)), (0x8100, rng.randrange(1, 4095)),
                          (0x8100, rng.randrange(1, 4095))])


def _arp(rng: random.Random, payload: bytes, mac: bytes) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, f.HOST_MAC, rng.randbytes(4),
                       bytes(6), rng.randbytes(4))
    return mac + f.HOST_MAC + b"\x08\x06" + body + payload


FRAME_CLASSES: dict[str, Builder] = {
    "ipv4_tcp": _ipv4_tcp,
    "ipv4_udp": _ipv4_udp,
    "ipv4_icmp": _ipv4_icmp,
    "ipv4_options_tcp": _ipv4_options_tcp,
    "ipv4_first_fragment_udp": _ipv4_first_fragment_udp,
    "ipv4_later_fragment_tcp": _ipv4_later_fragment_tcp,
    "ipv6_tcp": _ipv6_tcp,
    "ipv6_udp": _ipv6_udp,
    "ipv6_icmp": _ipv6_icmp,
    "ipv6_hop_by_hop_tcp": _ipv6_hop_by_hop_tcp,
    "ipv6_home_address_udp": _ipv6_home_address_udp,
    "ipv6_routing_type2_tcp": _ipv6_routing_type2_tcp,
    "ipv6_auth_header_tcp": _ipv6_auth_header_tcp,
    "ipv6_long_chain_tcp": _ipv6_long_chain_tcp,
    "ipv6_first_fragment_udp": _ipv6_first_fragment_udp,
    "ipv6_later_fragment_tcp": _ipv6_later_fragment_tcp,
    "ipv6_atomic_fragment_udp": _ipv6_atomic_fragment_udp,
    "vlan_ipv4_tcp": _vlan_ipv4_tcp,
    "qinq_ipv6_udp": _qinq_ipv6_udp,
    "svlan_ipv4_udp": _svlan_ipv4_udp,
    "triple_vlan_ipv4_tcp": _triple_vlan_ipv4_tcp,
    "arp": _arp,
}


def make_batch(dst_mac: bytes, per_class: int = 4, seed: int = 0,
               classes: Sequence[str] | None = None) -> list[Probe]:
    """*per_class* frames of each class (all by default), every one of a distinct L3 length.

    The same seed gives the same batch. Raises ValueError for an unknown class or when
    the lengths would pass the MTU.
    """
    names = list(FRAME_CLASSES) if classes is None else list(classes)
    unknown = [n for n in names if n not in FRAME_CLASSES]
    if unknown:
        raise ValueError(f"unknown frame classes {unknown}; known: {list(FRAME_CLASSES)}")
    rng = random.Random(seed)
    probes: list[Probe] = []
    next_len = 0
    for _ in range(per_class):
        for name in names:
            build = FRAME_CLASSES[name]
            state = rng.getstate()
            base = len(build(rng, b"", dst_mac)) - ETH_HEADER_LEN
            want = max(base, next_len)
            rng.setstate(state)
            probe = Probe(name, build(rng, bytes(want - base), dst_mac))
            if probe.l3_len != want:
                raise AssertionError(f"{name}: padding gave {probe.l3_len}, wanted {want}")
            if want > MAX_L3_LEN:
                raise ValueError(f"batch too large: L3 length {want} passes {MAX_L3_LEN}")
            probes.append(probe)
            next_len = want + 1
    return probes


def _truncated_ipv4(rng: random.Random, l3_len: int, mac: bytes) -> Probe:
    """IPv4 cut at *l3_len*: the header (with options) whole, the transport part cut."""
    options = rng.choice([j for j in range(11) if 0 <= l3_len - 20 - 4 * j < 20])
    proto = rng.choice((f.tcp, f.udp))
    packet = f.ipv4(*_v4(rng), proto(_port(rng), _port(rng), bytes(20)),
                    options=b"\x01" * (4 * options))
    kind = "tcp" if proto is f.tcp else "udp"
    return Probe(f"ipv4_truncated_{kind}", f.frame(packet, dst=mac)[: ETH_HEADER_LEN + l3_len])


def _truncated_ipv6(rng: random.Random, l3_len: int, mac: bytes) -> Probe:
    """IPv6 cut at *l3_len*: inside its transport header or inside an extension header."""
    proto = rng.choice((f.tcp, f.udp))
    ext_len = rng.choice([n for n in (0, 8, 16) if l3_len > 40 + n or n == 16])
    ext = [f.hop_by_hop(bytes(ext_len - 2))] if ext_len else []
    packet = f.ipv6(*_v6(rng), proto(_port(rng), _port(rng), bytes(40)), ext=ext)
    where = "ext" if l3_len < 40 + ext_len else "l4"
    kind = "tcp" if proto is f.tcp else "udp"
    frame = f.frame(packet, dst=mac)[: ETH_HEADER_LEN + l3_len]
    return Probe(f"ipv6_truncated_{where}_{kind}", frame)


def make_truncated_batch(dst_mac: bytes, seed: int = 0) -> list[Probe]:
    """Frames that end inside their transport or an IPv6 extension header.

    Each L3 length is used once per ethertype (IPv4: 20..79, IPv6: 41..87), so every
    frame is still found by (length, ethertype); the cut, not padding, sets the length.
    """
    rng = random.Random(seed)
    probes = [_truncated_ipv4(rng, length, dst_mac) for length in range(20, 80)]
    probes += [_truncated_ipv6(rng, length, dst_mac) for length in range(41, 88)]
    if len({(p.l3_len, p.ethertype) for p in probes}) != len(probes):
        raise AssertionError("truncated batch: two frames share a length")
    return probes
