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
from vnetbackend.qemu.device import DeviceStateReader, find_net_device, query_qemu_version
from vnetbackend.qemu.process import QEMU_BINARY, listen_unix, start_qemu
from vnetbackend.qemu.qmp import call
from vnetbackend.qemu.snapshot import read_device_state

#: A running machine with a virtio-net device and no guest (its firmware runs).
NET_MACHINE = ("-machine", "q35", "-accel", "tcg", "-device", "virtio-net-pci,id=vnet0")


@contextlib.asynccontextmanager
async def bare_qemu(tmp_path: Path, machine: tuple[str, ...] = ("-machine", "none"),
                    ) -> AsyncIterator[tuple[QMPClient, DeviceStateReader]]:
    """A QEMU with *machine* (default: none), running (not started with -S), a client on
    its QMP and a snapshot reader on that client."""
    need_root()
    need_program(QEMU_BINARY)
    listener = listen_unix(tmp_path / "qmp.sock")
    try:
        process = await start_qemu(
            [QEMU_BINARY, *machine, "-nodefaults", "-display", "none",
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


async def test_the_device_is_read_as_its_section_is_written_and_the_whole_stream_agrees(
        tmp_path: Path) -> None:
    async with bare_qemu(tmp_path, NET_MACHINE) as (qmp, reader):
        device = await find_net_device(qmp, "vnet0")
        for _ in range(5):
            asked = time.time()
            state = await reader.read(device)
            stages = set(reader.last_stages_ms)
            # Read as soon as the device's section walked (QEMU's STOP heard, its
            # RESUME and reply not needed), or at the reply; never from a guess.
            assert stages in ({"qmp-request", "state-written", "read", "parse"},
                              {"qmp-request", "vm-pause", "qmp-resume", "read", "parse"})
            assert asked - 1e-5 <= reader.covers_until <= time.time()
            await reader.confirm()  # the reply, and the whole stream read again
            whole = read_device_state(await reader.snapshot(), device.pci_address,
                                      reader.qemu_version, 1)
            assert state == whole
            assert (state.rss, state.curr_queue_pairs) == (None, 1)
