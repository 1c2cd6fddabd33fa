"""A QMP client of a QEMU a test started, and the QEMU ended after it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.qmp import QMPClient

from vnetbackend.qemu.process import stop_process


@contextlib.asynccontextmanager
async def connected(process: asyncio.subprocess.Process, socket: Path,
                    ) -> AsyncIterator[tuple[asyncio.subprocess.Process, QMPClient]]:
    """(QEMU, a client connected to its monitor at *socket*); after, the client is closed
    and QEMU stopped, resumed first in case a test stopped it."""
    qmp = QMPClient("test")
    try:
        await qmp.connect(str(socket))
        yield process, qmp
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        await stop_process(process, 5.0)
