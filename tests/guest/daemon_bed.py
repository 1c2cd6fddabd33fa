"""A real guest with the daemon attached in-process, for the daemon's guest tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from tests.guest.conftest import need_guest
from tests.prereq import need_bcc
from vnetbackend import tap
from vnetbackend.daemon import launch
from vnetbackend.qemu.process import listen_unix
from vnetbackend.rss import RssConfig
from vnetbackend.steering.reports import Report
from vnetbackend.testbed.agent import GuestAgent
from vnetbackend.testbed.batch import check_batch, report
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import Guest, GuestOptions, boot_guest, unique_tap_name
from vnetbackend.testbed.image import GuestImage, find_guest_image
from vnetbackend.testbed.injector import silence_host_stack
from vnetbackend.testbed.observer import RxObserver
from vnetbackend.testbed.traffic import make_batch
from vnetbackend.testbed.vm import guest_args

EVENT_TIMEOUT = 30.0
READY_TIMEOUT = 180.0


def same_rss(view: dict[str, Any] | None, config: RssConfig) -> bool:
    """Whether a query-vnet RSS view holds *config*'s key, table and hash types."""
    return view is not None and (view["key"], view["indirection-table"], view["hash-types"]) == (
        config.key.hex(), list(config.indirection_table), int(config.hash_types))


async def wait_mirrored(client: QMPClient, guest_config: RssConfig,
                        vm_id: str | None = None) -> dict[str, Any]:
    """Wait (on the daemon's events) until its maps and snapshot equal *guest_config*
    (those of VM *vm_id*, for a daemon serving many)."""
    async def settled() -> dict[str, Any]:
        while True:
            status = await client.execute("query-vnet", {"id": vm_id} if vm_id else None)
            if same_rss(status["rss"], guest_config) and same_rss(status["steering"]["rss"],
                                                                   guest_config):
                return status
            await client.events.get()
    return await asyncio.wait_for(settled(), EVENT_TIMEOUT)


@dataclass
class Attached:
    guest: Guest
    rss: GuestRss
    observer: RxObserver
    daemon: Any
    monitor: QMPClient


@contextlib.asynccontextmanager
async def attached_guest(tmp_path: Path, use_trace: bool = True, cpus: int | None = None,
                         rss: bool = True) -> AsyncIterator[Attached]:
    """A 4-pair guest with rxhash on and its observer started, the daemon attached to its
    QEMU and serving, and a client on the daemon's monitor. *rss* False offers hash
    reports without RSS."""
    need_guest()
    need_bcc()
    options = GuestOptions(queues=4, cpus=cpus, rss=rss,
                           extra_args=("-msg", "timestamp=on"))
    async with boot_guest(options) as guest:
        silence_host_stack(guest.tap_name)
        rss = GuestRss(guest.agent)
        await rss.enable_rxhash()
        observer = RxObserver(guest.agent)
        await observer.start()
        monitor_path = tmp_path / "monitor.sock"
        async with launch.attached(guest.qmp_socket, guest.tap_name, tmp_path / "run",
                                   monitor_path, use_trace=use_trace) as daemon:
            serving = asyncio.create_task(daemon.serve())
            client = QMPClient("test")
            await client.connect(str(monitor_path))
            try:
                yield Attached(guest, rss, observer, daemon, client)
            finally:
                daemon.request_stop("test over")
                await serving
                await client.disconnect()


async def check_traffic(bed: Attached, config: RssConfig, seed: int) -> None:
    """Inject a traffic mix: the program's reports must equal the reference model, and the
    guest must see what the model (or a documented QEMU departure) says."""
    probes = make_batch(bed.guest.mac, per_class=1, seed=seed)
    reader = bed.daemon.program.reports()
    reader.drain()
    failed = await check_batch(bed.guest.tap_name, bed.observer, config, probes)
    assert not failed, report(config, failed)
    reports: dict[int, Report] = {}
    while len(reports) < len(probes):
        found = await reader.next(timeout=EVENT_TIMEOUT)
        reports[found.frame_len] = found
    for probe in probes:
        expected = config.steer(probe.frame)
        found = reports[len(probe.frame)]
        assert (found.hash, found.report, found.queue) == (
            expected.hash, expected.report, expected.queue), (
            f"{probe.frame_class}: {probe.frame.hex()}")


async def next_event(client: QMPClient, name: str) -> dict[str, Any]:
    """The next event *name* on the daemon's monitor (others are passed over)."""
    async def wanted() -> dict[str, Any]:
        while (event := await client.events.get())["event"] != name:
            pass
        return event
    return await asyncio.wait_for(wanted(), EVENT_TIMEOUT)


async def disconnect_after_shutdown(client: QMPClient) -> None:
    """Disconnect from a monitor whose daemon is gone (qemu.qmp re-raises the EOF)."""
    with contextlib.suppress(EOFError, ConnectionResetError):
        await client.disconnect()


class DaemonProcess:
    """``vnetbackend`` as a child process; its log lines are collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log: list[str] = []
        self.listening = asyncio.Event()
        self._reading = asyncio.create_task(self._read_log())

    @classmethod
    async def start(cls, *args: str, pass_fds: tuple[int, ...] = ()) -> DaemonProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vnetbackend.cli", *args, pass_fds=pass_fds,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        return cls(process)

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.log.append(line.decode(errors="replace"))
            if "QMP monitor listening" in self.log[-1]:
                self.listening.set()

    async def monitor(self, path: Path) -> QMPClient:
        """A client of the daemon's monitor, once the daemon says it listens."""
        listening = asyncio.create_task(self.listening.wait())
        exited = asyncio.create_task(self.process.wait())
        done, _ = await asyncio.wait({listening, exited}, timeout=120,
                                     return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        exited.cancel()
        assert listening in done, f"daemon not listening: {''.join(self.log)}"
        client = QMPClient("test")
        await client.connect(str(path))
        return client

    async def finish(self) -> tuple[int, str]:
        """Wait for the exit; (status, everything it logged)."""
        await asyncio.wait_for(self.process.wait(), 60)
        await self._reading
        return self.process.returncode or 0, "".join(self.log)

    async def kill(self) -> None:
        """SIGKILL; a QEMU it started keeps its stderr open, so stop reading it here."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading


@dataclass
class RunningDaemon:
    daemon: DaemonProcess
    tap_name: str
    run_dir: Path
    rss: GuestRss
    monitor: QMPClient

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.monitor.execute("query-vnet")
        return result


@contextlib.asynccontextmanager
async def run_daemon(tmp_path: Path, image: GuestImage | None = None,
                     console_dir: Path | None = None) -> AsyncIterator[RunningDaemon]:
    """``vnetbackend run`` as a child process with the test guest (or *image*, its console
    log in *console_dir*), the agent connected and the guest ready, a client on the
    daemon's monitor; everything it started is ended after."""
    need_guest()
    need_bcc()
    image = image or find_guest_image()
    assert image is not None
    name = unique_tap_name()
    run_dir = tmp_path / "run"
    agent_path = tmp_path / "agent.sock"
    agent_listener = listen_unix(agent_path)
    fd = agent_listener.fileno()
    daemon = await DaemonProcess.start(
        "run", "--tap", name, "--queues", "2", "--run-dir", str(run_dir), "--pass-fd", str(fd),
        "--", *guest_args(image.kernel, image.initrd, append="console=ttyS0 panic=-1",
                          console_log=(console_dir or tmp_path) / "console.log", agent_fd=fd),
        pass_fds=(fd,))
    agent_listener.close()
    qemu_pid = None
    agent = None
    try:
        agent = await GuestAgent.connect(agent_path)
        await asyncio.wait_for(agent.wait_ready(), READY_TIMEOUT)
        monitor = await daemon.monitor(run_dir / launch.MONITOR_SOCKET)
        running = RunningDaemon(daemon, name, run_dir, GuestRss(agent), monitor)
        qemu_pid = (await running.status())["qemu-pid"]
        yield running
    finally:
        if agent is not None:
            await agent.close()
        await daemon.kill()
        if qemu_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu_pid, signal.SIGKILL)
        await asyncio.to_thread(tap.delete_tap, name)
