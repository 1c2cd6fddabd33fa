"""The host side of the guest agent on the guest's second serial port.

The guest's init (``qemu-configs/guest-init.sh``) serves one request per line,
``<token> <base64 of a sh script>``, and answers ``VNET-BEGIN <token>``, the script's
output, then ``\\nVNET-END <token> <status>``. The token is fresh for every request, so
output can never be mistaken for the end of the frame. The connection (QEMU's socket
chardev, QEMU being the server) stays open for the VM's life: the guest keeps its tty
open too, because re-opening it between requests lost bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vnetbackend.errors import VnetError

READY = b"VNET-GUEST-READY"
FAILED = b"VNET-GUEST-FAILED"
#: Longest reply accepted; ``cat`` of a full trace buffer stays well below.
MAX_REPLY = 64 << 20


class AgentError(VnetError):
    """The agent channel broke, timed out or the guest reported it cannot serve."""


class GuestCommandError(AgentError):
    """A command ran in the guest and exited with a non-zero status."""

    def __init__(self, command: str, result: CommandResult) -> None:
        super().__init__(f"guest command {command!r} exited {result.status}: "
                         f"{result.output.strip()[-2000:]}")
        self.command = command
        self.result = result


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a guest command printed (stdout and stderr together) and its exit status."""

    output: str
    status: int


class GuestAgent:
    """One open connection to the agent port; requests run one at a time.

    ``describe``, when set, tells what else is known of the guest (its console, say): an
    `AgentError` for a request that got no answer or a channel that broke carries it.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.describe: Callable[[], str] | None = None
        self._lock = asyncio.Lock()
        self._serial = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self.kernel_release: str | None = None

    @classmethod
    async def connect(cls, path: Path) -> GuestAgent:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_REPLY)
        return cls(reader, writer)

    def _failure(self, what: str) -> AgentError:
        return AgentError(what if self.describe is None else f"{what}\n{self.describe()}")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def wait_ready(self) -> str:
        """Wait for the guest's ready line; return the kernel release it names.

        Raises `AgentError` if the guest reports failure or the port closes. Lines before
        the ready line (none are expected) are ignored. The caller bounds the wait.
        """
        while True:
            line = await self._reader.readline()
            if not line:
                raise AgentError("agent port closed before the guest was ready")
            text = line.strip()
            if text.startswith(FAILED):
                raise AgentError(f"guest init failed: {text.decode(errors='replace')}")
            if text.startswith(READY):
                self.kernel_release = text[len(READY):].strip().decode(errors="replace")
                return self.kernel_release

    async def run(self, script: str, timeout: float = 60.0) -> CommandResult:
        """Run the sh *script* in the guest; its output and exit status.

        Raises `AgentError` if no complete answer comes within *timeout* seconds; the
        channel is then closed, since a late answer would be misread as the next one.
        """
        async with self._lock:
            token = f"{self._prefix}-{next(self._serial)}".encode()
            encoded = base64.b64encode(script.encode())
            try:
                self._writer.write(token + b" " + encoded + b"\n")
                await self._writer.drain()
                return await asyncio.wait_for(self._answer(token), timeout)
            except TimeoutError:
                await self.close()
                raise self._failure(f"no answer to {script!r} within {timeout} s") from None
            except (ConnectionError, asyncio.IncompleteReadError) as err:
                raise self._failure(f"agent channel broke during {script!r}: {err}") from None
            except asyncio.LimitOverrunError:
                await self.close()
                raise AgentError(f"answer to {script!r} exceeds {MAX_REPLY} bytes") from None

    async def _answer(self, token: bytes) -> CommandResult:
        await self._reader.readuntil(b"VNET-BEGIN " + token + b"\n")
        body = await self._reader.readuntil(b"\nVNET-END " + token + b" ")
        status_line = await self._reader.readline()
        output = body[: -len(b"\nVNET-END " + token + b" ")]
        try:
            status = int(status_line.strip())
        except ValueError:
            raise AgentError(f"garbled status line {status_line!r}") from None
        return CommandResult(output.decode(errors="replace"), status)

    async def check(self, script: str, timeout: float = 60.0) -> str:
        """Run *script*; its output, or `GuestCommandError` if it exits non-zero."""
        result = await self.run(script, timeout)
        if result.status != 0:
            raise GuestCommandError(script, result)
        return result.output
