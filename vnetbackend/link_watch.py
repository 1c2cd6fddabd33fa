"""Waiting for a network interface to disappear, from rtnetlink link notifications."""

from __future__ import annotations

import asyncio
import socket
import struct

NETLINK_ROUTE = 0
RTMGRP_LINK = 1
RTM_DELLINK = 17
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")


def _removed_indexes(data: bytes) -> set[int]:
    """Interface indexes named by the RTM_DELLINK messages in one netlink datagram."""
    removed = set()
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        body = offset + _NLMSGHDR.size
        if kind == RTM_DELLINK and body + _IFINFOMSG.size <= len(data):
            removed.add(_IFINFOMSG.unpack_from(data, body)[2])
        offset += (length + 3) & ~3
    return removed


async def wait_until_removed(name: str) -> None:
    """Return once the interface *name* is gone (at once if it does not exist now)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                       NETLINK_ROUTE) as sock:
        sock.bind((0, RTMGRP_LINK))
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            return
        removed = asyncio.Event()

        def on_readable() -> None:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    return
                except OSError:  # ENOBUFS: notices were lost; ask the kernel directly
                    data = b""
                if index in _removed_indexes(data) or not _exists(name, index):
                    removed.set()
                    return

        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), on_readable)
        try:
            await removed.wait()
        finally:
            loop.remove_reader(sock.fileno())


def _exists(name: str, index: int) -> bool:
    try:
        return socket.if_nametoindex(name) == index
    except OSError:
        return False
