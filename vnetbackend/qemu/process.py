"""Starting QEMU with inherited fds, and ending it.

The daemon's ``run`` and the test VM both start QEMU through this module: sockets it
serves are bound and listening before it starts (`listen_unix`), fds it needs are
inherited, and its output goes to a log file. `start_confined_qemu` starts it with no
capabilities but those it needs to switch to an unprivileged user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from vnetbackend.errors import VnetError

QEMU_BINARY = "qemu-system-x86_64"
#: util-linux's setpriv sets the parent-death signal or the capability sets and execs
#: QEMU (same pid).
SETPRIV = "setpriv"
#: What a QEMU that switches user (``-runas``) needs from its bounding set to do so:
#: setgid/setgroups and setuid. Everything else is dropped before it starts.
SWITCH_USER_CAPABILITIES = ("setuid", "setgid")
_VERSION = re.compile(rb"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


class QemuVersionUnknown(VnetError):
    """``QEMU --version`` could not be run or did not say a version; ``binary`` names it."""

    def __init__(self, binary: str, reason: str) -> None:
        super().__init__(f"{binary} --version: {reason}")
        self.binary = binary


def listen_unix(path: Path) -> socket.socket:
    """A unix socket listening at *path*, mode 0600 (a stale file there is replaced), for
    QEMU to inherit as a ``-chardev socket,fd=N,server=on`` so that clients can connect at
    once."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the socket file with the socket's own mode less the umask.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


async def qemu_version(binary: str = QEMU_BINARY) -> tuple[int, int, int]:
    """The (major, minor, micro) version *binary* reports; `QemuVersionUnknown` if none."""
    try:
        process = await asyncio.create_subprocess_exec(
            binary, "--version", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await process.communicate()
    except OSError as err:
        raise QemuVersionUnknown(binary, err.strerror or str(err)) from None
    match = _VERSION.search(out)
    if process.returncode != 0 or match is None:
        raise QemuVersionUnknown(binary, f"status {process.returncode}, said "
                                         f"{out[:200].decode(errors='replace')!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


async def _spawn(prefix: Sequence[str], argv: Sequence[str], pass_fds: Sequence[int],
                 log_fd: int, new_session: bool) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *prefix, *argv, pass_fds=tuple(pass_fds), stdin=asyncio.subprocess.DEVNULL,
        stdout=log_fd, stderr=log_fd, start_new_session=new_session)


async def start_qemu(argv: Sequence[str], *, pass_fds: Sequence[int], log_path: Path,
                     die_with_parent: bool = False) -> asyncio.subprocess.Process:
    """Start *argv* with *pass_fds* inherited and stdout/stderr to *log_path*.

    *die_with_parent* has the kernel kill QEMU when this process dies, however it dies;
    QEMU then also runs in a session of its own, so it does not see the terminal's
    signals. Raises OSError when the binary cannot be run.
    """
    prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if die_with_parent else []
    with log_path.open("wb") as log:
        return await _spawn(prefix, argv, pass_fds, log.fileno(), die_with_parent)


async def start_confined_qemu(argv: Sequence[str], *, pass_fds: Sequence[int],
                              log_fd: int) -> asyncio.subprocess.Process:
    """Start *argv*, whose options switch QEMU to an unprivileged user (see
    `vnetbackend.qemu.command.unprivileged_args`), with *pass_fds* inherited and
    stdout/stderr on *log_fd* (open it with O_APPEND, so that it can be truncated).

    QEMU starts as root with only `SWITCH_USER_CAPABILITIES` in its bounding set (so it has
    no others before the switch and none after: the switch clears them), none inheritable,
    and no_new_privs set. Files it opens by path before the switch must therefore be
    readable by root without CAP_DAC_OVERRIDE. Raises OSError when setpriv or the binary
    cannot be run.
    """
    bounding = ",".join(["-all", *(f"+{cap}" for cap in SWITCH_USER_CAPABILITIES)])
    prefix = [SETPRIV, f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs",
              "--"]
    return await _spawn(prefix, argv, pass_fds, log_fd, False)


async def stop_process(process: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM, then SIGKILL after *grace* seconds; the exit status (-signal if killed)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode if process.returncode is not None else -1


async def exit_reason(process: asyncio.subprocess.Process) -> str:
    """Once QEMU has exited: how, in words."""
    status = await process.wait()
    if status < 0:
        return f"QEMU was killed by signal {-status}"
    return f"QEMU exited with status {status}"


def quoted(argv: Sequence[str]) -> str:
    """*argv* as one shell-quoted line, for logs and error messages."""
    return shlex.join(argv)
