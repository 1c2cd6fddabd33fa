"""QMP calls against a real QEMU (no guest): bounded in time, failures as one error class."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.prereq import need_program
from tests.qemu_client import connected
from vnetbackend.errors import VnetError
from vnetbackend.qemu.process import QEMU_BINARY, listen_unix, start_qemu
from vnetbackend.qemu.qmp import (
    QemuCallFailed,
    QemuNotAnswering,
    QemuReplyError,
    call,
    reply_field,
)


@contextlib.asynccontextmanager
async def bare_qemu(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process,
                                                            QMPClient]]:
    """QEMU with no machine to run (and paused), only its QMP monitor: up in milliseconds."""
    need_program(QEMU_BINARY)
    listener = listen_unix(tmp_path / "qmp.sock")
    try:
        process = await start_qemu(
            [QEMU_BINARY, "-machine", "none", "-nodefaults", "-display", "none", "-S",
             "-chardev", f"socket,id=qmp,fd={listener.fileno()},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control"],
            pass_fds=(listener.fileno(),), log_path=tmp_path / "qemu.log",
            die_with_parent=True)
    finally:
        listener.close()
    async with connected(process, tmp_path / "qmp.sock") as running:
        yield running


async def test_a_stopped_qemu_is_not_answering_and_answers_again(tmp_path: Path) -> None:
    async with bare_qemu(tmp_path) as (process, qmp):
        status = await call(qmp, "query-status")
        assert reply_field(status, "running", bool, "query-status") is False
        os.kill(process.pid, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(QemuNotAnswering, match=r"query-status: no answer within 0\.3 s"):
            await call(qmp, "query-status", timeout=0.3)
        assert 0.3 <= loop.time() - started < 2.0
        os.kill(process.pid, signal.SIGCONT)
        # The late answer to the abandoned call is dropped; this one gets its own.
        assert "running" in await call(qmp, "query-status")


async def test_an_error_reply_is_a_failed_call(tmp_path: Path) -> None:
    async with bare_qemu(tmp_path) as (_, qmp):
        with pytest.raises(QemuCallFailed, match="x-query-virtio-status") as caught:
            await call(qmp, "x-query-virtio-status", {"path": "/machine/no-such-device"})
        assert caught.value.command == "x-query-virtio-status"
        assert isinstance(caught.value, VnetError)


async def test_a_reply_out_of_shape_names_the_field(tmp_path: Path) -> None:
    async with bare_qemu(tmp_path) as (_, qmp):
        status = await call(qmp, "query-status")
    with pytest.raises(QemuReplyError, match="'used-idx'"):
        reply_field(status, "used-idx", int, "query-status")
    with pytest.raises(QemuReplyError, match="'running' is False, not int"):
        reply_field(status, "running", int, "query-status")
    with pytest.raises(QemuReplyError, match="reply has no 'status'"):
        reply_field([status], "status", str, "query-status")


async def test_a_lost_connection_is_a_failed_call(tmp_path: Path) -> None:
    async with bare_qemu(tmp_path) as (process, qmp):
        process.kill()
        await process.wait()
        with pytest.raises(QemuCallFailed):
            await call(qmp, "query-status")
