"""Linux inotify through ctypes, as an event in the running asyncio loop."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from pathlib import Path

IN_MODIFY = 0x00000002
IN_DONT_FOLLOW = 0x02000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class FileWatch:
    """Sets `written` each time *path* is written to, until `close`.

    A symbolic link at *path* is watched as the link, never followed, unless `of_fd`
    made the watch.

    Create it inside the running loop, which watches the inotify fd; whoever waits on
    `written` clears it.
    """

    def __init__(self, path: Path, *, follow: bool = False) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        mask = IN_MODIFY if follow else IN_MODIFY | IN_DONT_FOLLOW
        if _libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self.written = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._on_written)

    @classmethod
    def of_fd(cls, fd: int) -> FileWatch:
        """A watch on the file open at this process's *fd* (a memory file has no other
        path): ``/proc/self/fd/FD`` is the kernel's link to it, not one planted there."""
        return cls(Path(f"/proc/self/fd/{fd}"), follow=True)

    def clear(self) -> None:
        """Forget the writes seen so far, also those not yet delivered to the loop."""
        self._on_written()
        self.written.clear()

    def _on_written(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        self.written.set()

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
