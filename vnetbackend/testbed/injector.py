"""Sending crafted frames into a tap so that they reach the guest behind it.

An AF_PACKET socket bound to the tap transmits on it: host -> tap -> (steering program,
if any) -> a tap queue -> QEMU -> the guest. Frames are sent as they are; the caller
makes them identifiable in the guest (see `vnetbackend.testbed.traffic`).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from vnetbackend.errors import VnetError


class InjectError(VnetError, OSError):
    """A frame could not be sent into the tap."""


def silence_host_stack(tap_name: str) -> None:
    """Stop the host's own IPv6 traffic (router/neighbour solicitations, MLD) on the tap.

    Otherwise the guest receives frames nobody injected, which could be confused with
    injected ones.
    """
    Path(f"/proc/sys/net/ipv6/conf/{tap_name}/disable_ipv6").write_text("1\n")


class Injector:
    """An AF_PACKET socket that sends whole Ethernet frames out of one interface."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            self._sock.bind((interface, 0))
        except OSError as err:
            self._sock.close()
            raise InjectError(err.errno, f"bind AF_PACKET to {interface!r}: {err.strerror}",
                              ) from None

    def send(self, frame: bytes) -> None:
        if len(frame) < 14:
            raise InjectError(errno.EINVAL, f"frame of {len(frame)} bytes has no Ethernet header")
        try:
            sent = self._sock.send(frame)
        except OSError as err:
            raise InjectError(err.errno, f"send {len(frame)} bytes on {self.interface!r}: "
                              f"{err.strerror}") from None
        if sent != len(frame):
            raise InjectError(errno.EIO, f"sent {sent} of {len(frame)} bytes on "
                              f"{self.interface!r}")

    def send_all(self, frames: Iterable[bytes]) -> int:
        count = 0
        for frame in frames:
            self.send(frame)
            count += 1
        return count

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
