"""The host side of the guest agent, against a unix socket that plays the guest."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from vnetbackend.testbed.agent import AgentError, GuestAgent

CONSOLE = "[   12.5] the guest's last console line"


async def _guest(path: Path, answer: bool) -> tuple[asyncio.Server, asyncio.Queue[bytes]]:
    """A socket that reads one request and answers it the way the guest's init does, or
    closes the channel; it puts the request's script on the queue."""
    scripts: asyncio.Queue[bytes] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        token, encoded = (await reader.readline()).split()
        await scripts.put(base64.b64decode(encoded))
        if answer:
            writer.write(b"VNET-BEGIN " + token + b"\nhello\n\nVNET-END " + token + b" 3\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(serve, str(path)), scripts


async def test_an_answer_gives_the_output_and_status(tmp_path: Path) -> None:
    server, scripts = await _guest(tmp_path / "agent", answer=True)
    async with server:
        agent = await GuestAgent.connect(tmp_path / "agent")
        agent.describe = lambda: CONSOLE
        result = await agent.run("echo hello; exit 3")
        assert await scripts.get() == b"echo hello; exit 3"
        assert (result.output, result.status) == ("hello\n", 3)
        await agent.close()


async def test_a_broken_channel_is_reported_with_what_is_known_of_the_guest(
        tmp_path: Path) -> None:
    server, scripts = await _guest(tmp_path / "agent", answer=False)
    async with server:
        agent = await GuestAgent.connect(tmp_path / "agent")
        agent.describe = lambda: CONSOLE
        with pytest.raises(AgentError, match="channel broke") as broke:
            await agent.run("true")
        assert await scripts.get() == b"true"
        assert str(broke.value).endswith("\n" + CONSOLE)
        await agent.close()


async def test_no_answer_in_time_is_reported_with_what_is_known_of_the_guest(
        tmp_path: Path) -> None:
    held = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        await held.wait()
        writer.close()

    async with await asyncio.start_unix_server(silent, str(tmp_path / "agent")):
        agent = await GuestAgent.connect(tmp_path / "agent")
        agent.describe = lambda: CONSOLE
        with pytest.raises(AgentError, match="no answer to 'true' within") as late:
            await agent.run("true", timeout=0.2)
        held.set()
        assert str(late.value).endswith("\n" + CONSOLE)
