"""What a real QEMU says around a device-state snapshot: its STOP and RESUME, and how the
reader times the snapshot and dates what it covers from them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.qmp import QMPClient

from tests.prereq import need_program, need_root
from tests.qemu_client import connected
from vnetbackend.qemu.command import monitor_args
from vnetbackend.qemu.device import DeviceStateReader, query_qemu_version
from vnetbackend.qemu.process import QEMU_BINARY, listen_unix, start_qemu
from vnetbackend.qemu.qmp import call


@contextlib.asynccontextmanager
async def bare_qemu(tmp_path: Path) -> AsyncIterator[tuple[QMPClient, DeviceStateReader]]:
    """A QEMU with no machine, running (not started with -S), a client on its QMP and a
    snapshot reader on that client."""
    need_root()
    need_program(QEMU_BINARY)
    listener = listen_unix(tmp_path / "qmp.sock")
    try:
        process = await start_qemu(
            [QEMU_BINARY, "-machine", "none", "-nodefaults", "-display", "none",
             *monitor_args("qmp", listener.fileno())],
            pass_fds=(listener.fileno(),), log_path=tmp_path / "qemu.log",
            die_with_parent=True)
    finally:
        listener.close()
    async with contextlib.AsyncExitStack() as stack:
        _, qmp = await stack.enter_async_context(connected(process, tmp_path / "qmp.sock"))
        reader = DeviceStateReader(qmp, await query_qemu_version(qmp), 1)
        yield qmp, await stack.enter_async_context(reader)


async def test_a_running_vm_is_paused_for_the_snapshot_and_its_pause_timed(
        tmp_path: Path) -> None:
    async with bare_qemu(tmp_path) as (qmp, reader):
        asked = time.time()
        stream = await reader.snapshot()
        answered = time.time()
        stages = reader.last_stages_ms
        # QEMU's STOP came after the command was sent and before the answer.
        assert asked - 1e-5 <= reader.covers_until <= answered
        assert set(stages) == {"qmp-request", "vm-pause", "qmp-resume", "read"}
        assert 0 < stages["vm-pause"] <= (answered - asked) * 1000
        assert (stages["qmp-request"] + stages["vm-pause"] + stages["qmp-resume"]
                <= (answered - asked) * 1000 + 0.01)
        assert stream.startswith(b"QEVM")
        assert (await call(qmp, "query-status"))["status"] == "running"


async def test_a_stopped_vm_is_not_paused_and_the_snapshot_covers_until_asked(
        tmp_path: Path) -> None:
    async with bare_qemu(tmp_path) as (qmp, reader):
        await call(qmp, "stop")
        asked = time.time()
        stream = await reader.snapshot()
        # No STOP/RESUME of the snapshot's own: nothing tells when QEMU saved, so
        # only what came before the command was sent counts as covered.
        assert set(reader.last_stages_ms) == {"snapshot", "read"}
        assert asked <= reader.covers_until <= time.time()
        assert stream.startswith(b"QEVM")
        await call(qmp, "cont")
        await reader.snapshot()
        assert "vm-pause" in reader.last_stages_ms
