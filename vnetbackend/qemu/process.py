"""Starting QEMU with inherited fds, and ending it.

The daemon's ``run`` and the test VM both start QEMU through `start_qemu`: sockets it
serves are bound and listening before it starts (`listen_unix`), fds it needs are
inherited, and its output goes to a log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"
#: util-linux's setpriv sets the parent-death signal and execs QEMU (same pid).
SETPRIV = "setpriv"


def listen_unix(path: Path) -> socket.socket:
    """A unix socket listening at *path* (a stale file there is replaced), for QEMU to
    inherit as a ``-chardev socket,fd=N,server=on`` so that clients can connect at once."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


async def start_qemu(argv: Sequence[str], *, pass_fds: Sequence[int], log_path: Path,
                     die_with_parent: bool = False) -> asyncio.subprocess.Process:
    """Start *argv* with *pass_fds* inherited and stdout/stderr to *log_path*.

    *die_with_parent* has the kernel kill QEMU when this process dies, however it dies;
    QEMU then also runs in a session of its own, so it does not see the terminal's
    signals. Raises OSError when the binary cannot be run.
    """
    prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if die_with_parent else []
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            *prefix, *argv, pass_fds=tuple(pass_fds), stdin=asyncio.subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=die_with_parent)


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
