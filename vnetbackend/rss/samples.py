"""Well-known values: Microsoft's RSS verification suite, and sample frames."""

from vnetbackend import frames as f

MICROSOFT_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
# The published vectors under MICROSOFT_KEY: (source, source port, destination,
# destination port, hash over the addresses, hash over addresses and ports).
MICROSOFT_IPV4_VECTORS = (
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
)
MICROSOFT_IPV6_VECTORS = (
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0F0C461C, 0xDDE51BBF),
    ("3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, "fe80::200:f8ff:fe21:67cf", 38024,
     0x4B61E985, 0x02D1FEEF),
)


def sample_frames() -> dict[str, bytes]:
    """One frame per benchmark case, named by its class."""
    v6s, v6d = "3ffe:2501:200:1fff::7", "3ffe:2501:200:3::1"
    return {
        "ipv4_tcp": f.frame(f.ipv4("66.9.149.187", "161.142.100.80", f.tcp(2794, 1766))),
        "ipv6_udp": f.frame(f.ipv6(v6s, v6d, f.udp(2794, 1766))),
        "ipv6_ext": f.frame(f.ipv6(v6s, v6d, f.tcp(2794, 1766), ext=[
            f.hop_by_hop(), f.home_address("2001:db8::1"), f.routing_type2("2001:db8::2")])),
        "non_ip": bytes(6) + bytes(6) + b"\x08\x06" + bytes(28),
    }
