"""Microsoft's published RSS verification vectors, through the whole reference model."""

from __future__ import annotations

import pytest

from tests.oracle import toeplitz_oracle
from vnetbackend.rss import HashReport, HashType, RssConfig, toeplitz, toeplitz_bitwise
from vnetbackend.rss.vectors import (
    MICROSOFT_IPV4_VECTORS,
    MICROSOFT_IPV6_VECTORS,
    MICROSOFT_KEY,
)
from vnetbackend.testbed import frames as f

# (source, source port, destination, destination port, IP-only hash, with-ports hash)
IPV4_VECTORS = MICROSOFT_IPV4_VECTORS
IPV6_VECTORS = MICROSOFT_IPV6_VECTORS
ALL = HashType(0x1FF)


def _config(types: int) -> RssConfig:
    return RssConfig(hash_types=types, key=MICROSOFT_KEY, indirection_table=range(128),
                     queues=128)


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "ip_hash", "tcp_hash"), IPV4_VECTORS)
def test_ipv4_vectors(src: str, sport: int, dst: str, dport: int, ip_hash: int,
                      tcp_hash: int) -> None:
    tcp_frame = f.frame(f.ipv4(src, dst, f.tcp(sport, dport)))
    udp_frame = f.frame(f.ipv4(src, dst, f.udp(sport, dport)))
    assert _config(ALL).steer(tcp_frame)[:3] == (tcp_hash, HashReport.TCPV4, tcp_hash & 127)
    assert _config(ALL).steer(udp_frame)[:2] == (tcp_hash, HashReport.UDPV4)
    assert _config(HashType.IPV4).steer(tcp_frame)[:2] == (ip_hash, HashReport.IPV4)


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "ip_hash", "tcp_hash"), IPV6_VECTORS)
def test_ipv6_vectors(src: str, sport: int, dst: str, dport: int, ip_hash: int,
                      tcp_hash: int) -> None:
    tcp_frame = f.frame(f.ipv6(src, dst, f.tcp(sport, dport)))
    assert _config(ALL).steer(tcp_frame)[:3] == (tcp_hash, HashReport.TCPV6, tcp_hash & 127)
    assert _config(HashType.IPV6).steer(tcp_frame)[:2] == (ip_hash, HashReport.IPV6)


@pytest.mark.parametrize("vector", IPV4_VECTORS + IPV6_VECTORS)
def test_tables_equal_bitwise_definition(vector: tuple) -> None:
    src, sport, dst, dport, _, _ = vector
    data = (f.ip_bytes(src, 6 if ":" in src else 4) + f.ip_bytes(dst, 6 if ":" in dst else 4)
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))
    assert toeplitz(MICROSOFT_KEY, data) == toeplitz_bitwise(MICROSOFT_KEY, data)


@pytest.mark.parametrize("vector", IPV4_VECTORS + IPV6_VECTORS)
def test_the_oracle_gives_the_published_hashes(vector: tuple) -> None:
    """The independent oracle the conformance tests use, anchored on the vectors."""
    src, sport, dst, dport, ip_hash, tcp_hash = vector
    version = 6 if ":" in src else 4
    addresses = f.ip_bytes(src, version) + f.ip_bytes(dst, version)
    ports = sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    assert toeplitz_oracle(MICROSOFT_KEY, addresses) == ip_hash
    assert toeplitz_oracle(MICROSOFT_KEY, addresses + ports) == tcp_hash
