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


class RemovalWatch:
    """Subscribed to link notices from construction on; `wait` returns once *name* is gone.

    An interface that does not exist at construction counts as removed already.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_LINK))
        try:
            self._index: int | None = socket.if_nametoindex(name)
        except OSError:
            self._index = None

    def _gone(self) -> bool:
        """Read the pending notices; whether one of them (or the kernel) says it is gone."""
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return False
            except OSError:  # ENOBUFS: notices were lost; ask the kernel directly
                return not _exists(self.name, self._index)
            if self._index in _removed_indexes(data):
                return True

    async def wait(self) -> None:
        if self._index is None or self._gone():
            return
        removed = asyncio.Event()

        def on_readable() -> None:
            if self._gone():
                removed.set()

        loop = asyncio.get_running_loop()
        loop.add_reader(self._sock.fileno(), on_readable)
        try:
            await removed.wait()
        finally:
            loop.remove_reader(self._sock.fileno())

    def close(self) -> None:
        self._sock.close()


def _exists(name: str, index: int | None) -> bool:
    try:
        return socket.if_nametoindex(name) == index
    except OSError:
        return False
