"""One frame per benchmark case, built from Microsoft's verification addresses."""

from vnetbackend.testbed import frames as f


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
