"""The guest's recorder in the test bed: started through the agent, read on the host.

`GuestRecorder.start` connects to the VM's records socket (the virtio-serial port
``org.vnetbackend.records.0``), starts ``vnet-recorder`` in the guest and waits for its
header line; from then on every record is parsed (`vnetbackend.guest_records`) into
``records``. `wait_quiet` waits until the recorder has read every CPU's buffer again
after the latest record and found them empty (its pass lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from vnetbackend.guest_records import GuestRecord, RecordParser, stream_records
from vnetbackend.testbed.agent import GuestAgent

START_TIMEOUT = 30.0
_PID_FILE = "/tmp/vnet-recorder.pid"
_LOG_FILE = "/tmp/vnet-recorder.log"


async def start_in_guest(agent: GuestAgent, options: str = "") -> None:
    """Start ``vnet-recorder`` in the guest, in the background (whoever reads the records
    port should be connected first)."""
    await agent.check(f"vnet-recorder {options} </dev/null >{_LOG_FILE} 2>&1 &"
                      f" echo $! > {_PID_FILE}")


async def recorder_log(agent: GuestAgent) -> str:
    """What the guest's recorder wrote to its stderr (why it failed to start, say)."""
    return (await agent.run(f"cat {_LOG_FILE}")).output


async def stop_in_guest(agent: GuestAgent) -> None:
    """Stop the guest's recorder (nothing if it is not running)."""
    await agent.run(f"kill $(cat {_PID_FILE}) 2>/dev/null", timeout=30)


class GuestRecorder:
    def __init__(self, agent: GuestAgent, socket_path: Path) -> None:
        self.agent = agent
        self.socket_path = socket_path
        self.parser = RecordParser()
        self.records: list[GuestRecord] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        #: When the first and the latest records arrived (time.monotonic()).
        self.first_at: float | None = None
        self.last_at: float | None = None

    def _deliver(self, records: list[GuestRecord]) -> None:
        if records:
            now = time.monotonic()
            self.first_at = self.first_at or now
            self.last_at = now
        self.records.extend(records)
        self._changed.set()

    async def _wait(self, ready: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not ready():
                if self._task is not None and self._task.done():
                    raise ConnectionError("the records port closed")
                self._changed.clear()
                await self._changed.wait()

    async def start(self, options: str = "") -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
        self._task = asyncio.create_task(stream_records(reader, self.parser, self._deliver))
        self._task.add_done_callback(lambda _: self._changed.set())
        await start_in_guest(self.agent, options)
        try:
            await self._wait(lambda: self.parser.header is not None, START_TIMEOUT)
        except TimeoutError:
            log = await recorder_log(self.agent)
            raise TimeoutError(f"no header from the guest's recorder: {log}") from None

    async def wait_for(self, count: int, timeout: float) -> None:
        """Until *count* records arrived in all."""
        await self._wait(lambda: len(self.records) >= count, timeout)

    async def wait_quiet(self, timeout: float) -> None:
        """Until two pass lines came after the latest record: the recorder read every
        CPU's buffer again after it and found nothing more."""
        await self._wait(lambda: self.parser.passes_since_record >= 2, timeout)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await stop_in_guest(self.agent)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self._task
        if self._writer is not None:
            self._writer.close()
