"""Microsoft's published RSS verification vectors, through the whole reference model."""

from __future__ import annotations

import pytest

from vnetbackend import frames as f
from vnetbackend.rss import HashReport, HashType, RssConfig, toeplitz, toeplitz_bitwise
from vnetbackend.rss.samples import MICROSOFT_KEY

# (source, source port, destination, destination port, IP-only hash, with-ports hash)
IPV4_VECTORS = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
]
IPV6_VECTORS = [
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0F0C461C, 0xDDE51BBF),
    ("3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, "fe80::200:f8ff:fe21:67cf", 38024,
     0x4B61E985, 0x02D1FEEF),
]
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
