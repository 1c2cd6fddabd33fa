"""A BPF ring buffer map read through libbcc's ring-buffer manager, by the map's fd alone.

It needs no bcc ``BPF`` object, so it serves a program bcc compiled and one loaded from a
cloned image (`vnetbackend.steering.instances`) alike.
"""

from __future__ import annotations

import ctypes as ct
import os
from collections.abc import Callable
from typing import Any

from vnetbackend.errors import VnetError

Callback = Callable[[Any, int, int], int]


class RingBufferError(VnetError):
    """A ring buffer could not be opened; ``map_fd`` names it."""

    def __init__(self, map_fd: int, reason: str) -> None:
        super().__init__(f"ring buffer (map fd {map_fd}): {reason}")
        self.map_fd = map_fd


class RingBuffer:
    """The reader side of the ring buffer map *map_fd* (one callback, set by `open`)."""

    def __init__(self, map_fd: int) -> None:
        self.map_fd = map_fd
        self._manager: int | None = None
        self._callback: Any = None  # kept alive as long as libbcc may call it

    def open(self, callback: Callback) -> None:
        """Have `consume` call *callback(ctx, data, size)* for every record."""
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib

        if self._manager is not None:
            raise RingBufferError(self.map_fd, "already open")
        self._callback = _RINGBUF_CB_TYPE(callback)
        manager = lib.bpf_new_ringbuf(self.map_fd, self._callback, None)
        if not manager:
            raise RingBufferError(self.map_fd, os.strerror(ct.get_errno() or 22))
        self._manager = manager

    def consume(self) -> None:
        """Call the callback for every record in the ring now (none before `open`)."""
        from bcc.libbcc import lib

        if self._manager is not None:
            lib.bpf_consume_ringbuf(self._manager)

    def close(self) -> None:
        from bcc.libbcc import lib

        if self._manager is not None:
            lib.bpf_free_ringbuf(self._manager)
            self._manager = None
