"""The daemon's run directory: its sockets and QEMU's log, safe from whoever else can write.

The rules, checked when the directory is opened (`RunDir.open`):

* It is created mode 0700 (its parent, if missing, 0755). One that exists must be
  a directory, not a symlink, owned by the daemon's user, and writable by nobody else
  (no group or other write); otherwise `RunDirError` says which rule it breaks.
* Everything in it is reached through the directory's fd, never through its path again,
  so renaming or replacing the path afterwards changes nothing the daemon touches.
* A file or socket the daemon makes replaces a stale one of the same kind left by an
  earlier daemon; anything else in its place (a symlink, a directory, ...) is refused.
  Files are created ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600; sockets are 0600.

The default directory is ``/run/vnetbackend/TAP``; `default_run_dir` checks the tap name
before it becomes part of a path.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from vnetbackend import tap
from vnetbackend.errors import VnetError
from vnetbackend.qemu.process import listen_unix

RUN_ROOT = Path("/run/vnetbackend")


class RunDirError(VnetError, OSError):
    """The run directory, or an entry in it, breaks a rule; ``path`` names it."""

    def __init__(self, path: Path, err: int, reason: str) -> None:
        super().__init__(err, f"run directory {path}: {reason}")
        self.path = path
        self.reason = reason


def default_run_dir(tap_name: str) -> Path:
    """``/run/vnetbackend/TAP``; `vnetbackend.tap.TapError` for a name the kernel refuses
    (which also rules out ``/``, ``.`` and ``..``)."""
    tap.check_name(tap_name)
    return RUN_ROOT / tap_name


def _kind(mode: int) -> str:
    kinds = {stat.S_ISLNK: "a symlink", stat.S_ISDIR: "a directory", stat.S_ISREG: "a file",
             stat.S_ISSOCK: "a socket", stat.S_ISFIFO: "a FIFO"}
    return next((name for test, name in kinds.items() if test(mode)), "a device node")


class RunDir:
    """An open run directory (see the module docstring). Close it, or use ``with``."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """Create or check *path* and open it; `RunDirError` if it breaks a rule."""
        path.parent.mkdir(0o755, parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise RunDirError(path, err.errno or errno.EIO, f"cannot create it: "
                                                            f"{err.strerror}") from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                found = _kind(os.lstat(path).st_mode)
                raise RunDirError(path, err.errno, f"is {found}, not a directory") from None
            raise RunDirError(path, err.errno or errno.EIO, err.strerror or str(err)) from None
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            os.close(fd)
            raise RunDirError(path, errno.EPERM, f"owned by uid {info.st_uid}, not by this "
                                                 f"daemon's uid {os.geteuid()}")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            os.close(fd)
            raise RunDirError(path, errno.EPERM, f"mode {stat.S_IMODE(info.st_mode):04o} lets "
                                                 "group or others write to it")
        return cls(path, fd)

    def inside(self, name: str) -> str:
        """A path to *name* through the directory's fd, for calls that take only a path."""
        return f"/proc/self/fd/{self.fd}/{self._checked(name)}"

    def create_file(self, name: str, *, append: bool = False) -> int:
        """A new file *name* (mode 0600), open for writing (appending with *append*);
        the caller closes the fd. A stale file is replaced; `RunDirError` otherwise."""
        self._clear(name, stat.S_ISREG)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags | (os.O_APPEND if append else 0), 0o600,
                           dir_fd=self.fd)
        except OSError as err:
            raise RunDirError(self.path / name, err.errno or errno.EIO,
                              f"cannot create it: {err.strerror}") from None

    def listen(self, name: str) -> socket.socket:
        """A unix socket listening at *name*, mode 0600 (see `listen_unix`). A stale socket
        is replaced; `RunDirError` for anything else there."""
        self._clear(name, stat.S_ISSOCK)
        try:
            return listen_unix(Path(self.inside(name)))
        except OSError as err:
            raise RunDirError(self.path / name, err.errno or errno.EIO,
                              f"cannot listen there: {err.strerror}") from None

    def _checked(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise RunDirError(self.path / name, errno.EINVAL, "not a plain file name")
        return name

    def _clear(self, name: str, stale: Callable[[int], bool]) -> None:
        """Remove a stale entry *name* of the kind *stale* tests for; refuse others."""
        try:
            mode = os.stat(self._checked(name), dir_fd=self.fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return
        if not stale(mode):
            raise RunDirError(self.path / name, errno.EEXIST,
                              f"{_kind(mode)} is in the way; remove it if it is not needed")
        os.unlink(name, dir_fd=self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
