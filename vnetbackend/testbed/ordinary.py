"""Ordinary traffic between the host and the test guest: real stacks at both ends.

`address_both_ends` gives the tap (host side) and the guest's eth0 IPv4 and IPv6
addresses, and switches segmentation offloads off on the tap (``ethtool -K TAP gso off
tso off``): the host's TCP then builds frames of at most the MTU. With GSO on, the tap
selects the queue (runs the steering program, which reports once) for a whole GSO
packet of up to 64 KiB and segments it only after, so one report stands for several
frames the guest receives; the flow join pairs one report with one frame. (GRO in the
guest is no concern: the recorder's tracepoint fires before GRO merges anything.)

`Traffic` runs, from the host: parallel TCP bulk flows to busybox ``nc`` listeners in
the guest (paced, so that a TCG guest keeps up and its ethtool commands get through),
UDP datagrams, busybox ``ping`` and ``ping6``; and from the guest a ``ping`` to the host
(its echo replies come back through the tap).
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vnetbackend.testbed.agent import GuestAgent

HOST_V4, GUEST_V4, PREFIX_V4 = "10.77.0.1", "10.77.0.2", 24
HOST_V6, GUEST_V6, PREFIX_V6 = "fd77::1", "fd77::2", 64
TCP_PORT_BASE = 5001
UDP_PORT = 6001


def _host(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


async def address_both_ends(tap_name: str, agent: GuestAgent) -> None:
    """IPv4 and IPv6 on both ends (no duplicate address detection, so the IPv6
    addresses work at once); no segmentation offload on the tap (see the module)."""
    conf = Path(f"/proc/sys/net/ipv6/conf/{tap_name}")
    (conf / "disable_ipv6").write_text("0\n")
    (conf / "accept_dad").write_text("0\n")
    _host("ethtool", "-K", tap_name, "gso", "off", "tso", "off")
    _host("ip", "addr", "add", f"{HOST_V4}/{PREFIX_V4}", "dev", tap_name)
    _host("ip", "-6", "addr", "add", f"{HOST_V6}/{PREFIX_V6}", "dev", tap_name, "nodad")
    await agent.check(
        "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad"
        f" && ip addr add {GUEST_V4}/{PREFIX_V4} dev eth0"
        f" && ip -6 addr add {GUEST_V6}/{PREFIX_V6} dev eth0")


async def listen_in_guest(agent: GuestAgent, tcp_ports: list[int]) -> None:
    """A busybox nc listener per TCP port. (Debian's busybox nc has no UDP mode: the
    guest's stack receives the UDP datagrams and answers port unreachable, rate-limited.)"""
    script = [f"nc -l -p {port} > /dev/null 2>&1 &" for port in tcp_ports]
    await agent.check("\n".join(script) + "\ntrue")


SIOCOUTQ = 0x5411
#: Linux's SO_MAX_PACING_RATE (bytes per second; TCP paces itself without fq).
SO_MAX_PACING_RATE = 47


async def tcp_bulk(address: str, port: int, at_least: int, stop: asyncio.Event,
                   rate: int, sent_more: Callable[[int], None], chunk: int = 1 << 15) -> int:
    """Send to the guest's listener at *rate* bytes/s, at least *at_least* bytes and
    until *stop* is set, telling *sent_more* of every chunk the kernel took; returns what
    was sent, once the guest acknowledged all of it (so no data frame of the flow is
    still on its way)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(address, port, family=family), 30)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, rate)
    sent = 0
    payload = bytes(chunk)
    try:
        while sent < at_least or not stop.is_set():
            writer.write(payload)
            sent += chunk
            await writer.drain()
            sent_more(chunk)
        await asyncio.wait_for(_all_acknowledged(writer.get_extra_info("socket")), 120)
    finally:
        writer.close()
        await writer.wait_closed()
    return sent


async def _all_acknowledged(sock: socket.socket) -> None:
    """Until the socket's send queue (unsent and unacknowledged bytes, SIOCOUTQ) is empty.
    The kernel gives no event for it: look every 10 ms."""
    while struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]:
        await asyncio.sleep(0.01)


async def udp_stream(address: str, port: int, size: int, interval: float,
                     stop: asyncio.Event) -> int:
    """Datagrams of *size* bytes to the guest, one every *interval* seconds, until
    *stop* is set; returns how many."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    count = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        # Not connected: the guest's port-unreachable answers are no errors to the sender.
        sock.setblocking(False)
        while not stop.is_set():
            sock.sendto(bytes(size), (address, port))
            count += 1
            await asyncio.sleep(interval)
    return count


async def host_ping(address: str, count: int, interval: float) -> str:
    """busybox ``ping`` (``ping6`` for IPv6) from the host; its summary."""
    argv = ["busybox", "ping6" if ":" in address else "ping", "-q", "-c", str(count),
            "-i", str(interval), address]
    process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT)
    output, _ = await process.communicate()
    return output.decode(errors="replace")


async def ping_until(address: str, stop: asyncio.Event, interval: float) -> int:
    """Rounds of 20 pings until *stop* is set; returns how many were sent."""
    rounds = 0
    while not stop.is_set():
        await host_ping(address, 20, interval)
        rounds += 1
    return 20 * rounds


@dataclass
class Traffic:
    """What `run` sends: TCP flows paced at ``tcp_rate`` bytes/s each, UDP and pings,
    until told to stop; ``sent`` counts it afterwards, `until_sent` waits for the TCP
    flows' progress."""

    tcp_flows_v4: int = 4
    tcp_flows_v6: int = 2
    tcp_at_least: int = 1 << 20
    tcp_rate: int = 1 << 20
    sent: dict[str, int] = field(default_factory=dict)
    tcp_sent: int = 0
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    def _sent_more(self, count: int) -> None:
        self.tcp_sent += count
        self._progress.set()

    async def until_sent(self, tcp_bytes: int) -> None:
        """Until the TCP flows have handed *tcp_bytes* in all to the host's stack."""
        while self.tcp_sent < tcp_bytes:
            self._progress.clear()
            await self._progress.wait()

    @property
    def tcp_ports(self) -> list[int]:
        return list(range(TCP_PORT_BASE, TCP_PORT_BASE + self.tcp_flows_v4 + self.tcp_flows_v6))

    async def run(self, agent: GuestAgent, stop: asyncio.Event) -> None:
        ports = self.tcp_ports
        await agent.check(f"ping -q -c 400 -i 0.05 {HOST_V4} > /tmp/guest-ping.log 2>&1 &")
        tcp = [tcp_bulk(GUEST_V4 if i < self.tcp_flows_v4 else GUEST_V6, port,
                        self.tcp_at_least, stop, self.tcp_rate, self._sent_more)
               for i, port in enumerate(ports)]
        results = await asyncio.gather(
            *tcp, udp_stream(GUEST_V4, UDP_PORT, 200, 0.01, stop),
            udp_stream(GUEST_V6, UDP_PORT + 1, 300, 0.01, stop),
            ping_until(GUEST_V4, stop, 0.02), ping_until(GUEST_V6, stop, 0.02))
        self.sent = {"tcp-bytes": sum(results[: len(tcp)]),
                     "udp-datagrams": results[len(tcp)] + results[len(tcp) + 1],
                     "pings": results[len(tcp) + 2] + results[len(tcp) + 3]}
