"""Starting the daemon: with a QEMU it launches (`run`) or next to a running one (`attach`).

``run`` creates the multi-queue tap, loads the steering program, opens the tap's queues
and hands them to QEMU (QEMU then needs neither CAP_NET_ADMIN nor CAP_BPF), adds the
virtio-net device with RSS and hash reports offered, a QMP monitor on a socket it
listens on before QEMU starts, and the RSS trace events. QEMU's monitor socket stays in
the run directory, so a daemon started again later can ``attach`` to the same QEMU;
QEMU's own output goes to ``qemu.log`` there.

``attach`` connects to a QEMU's QMP socket, switches its RSS trace events on (or, if
that fails, follows the control queue instead) and takes over the steering of its tap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from vnetbackend import tap
from vnetbackend.daemon.lifecycle import Daemon, Ending
from vnetbackend.daemon.monitor import register_commands, version_info
from vnetbackend.daemon.qmp_server import QmpServer
from vnetbackend.qemu.command import DEVICE_ID, monitor_args, net_device_args
from vnetbackend.qemu.device import DeviceStateReader, find_net_device
from vnetbackend.qemu.follower import TRACE_EVENTS
from vnetbackend.qemu.process import QEMU_BINARY, exit_reason, listen_unix, start_qemu, stop_process
from vnetbackend.qemu.qmp import QemuCallFailed, call, reply_field
from vnetbackend.steering.program import SteeringProgram

log = logging.getLogger("vnetbackend.launch")

QMP_SOCKET = "qemu-qmp.sock"
MONITOR_SOCKET = "monitor.sock"
TRACE_LOG = "rss-trace.log"
QEMU_LOG = "qemu.log"
QEMU_STOP_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What ``vnetbackend run`` needs; *run_dir* holds sockets and the trace log.

    *pass_fds* are open fds QEMU inherits, for arguments such as ``-chardev socket,fd=N``.
    """

    qemu_args: tuple[str, ...]
    tap_name: str
    queues: int
    run_dir: Path
    monitor: Path
    mac: str | None = None
    pass_fds: tuple[int, ...] = ()
    qemu_binary: str = QEMU_BINARY


def qemu_argv(options: RunOptions, queue_fds: Sequence[int], qmp_fd: int) -> list[str]:
    """QEMU's command line: the user's arguments plus the tap, the device, QMP and trace
    timestamps. The trace events themselves are switched on over QMP (`_enable_trace`),
    as for a QEMU the daemon attaches to, so both ways follow the guest alike."""
    return [
        options.qemu_binary, *options.qemu_args,
        *net_device_args(queue_fds, mac=options.mac),
        *monitor_args("vnetbackend-qmp", qmp_fd), "-msg", "timestamp=on",
    ]


async def _disconnect(qmp: QMPClient) -> None:
    """Close the QMP connection; QEMU may be gone already (qemu.qmp re-raises its EOF)."""
    with contextlib.suppress(EOFError, ConnectionError):
        await qmp.disconnect()


@contextlib.asynccontextmanager
async def _monitored(daemon: Daemon, monitor: QmpServer) -> AsyncIterator[Daemon]:
    register_commands(monitor, daemon)
    async with monitor:
        yield daemon


async def _serve(daemons: contextlib.AbstractAsyncContextManager[Daemon]) -> tuple[Ending, str]:
    async with daemons as daemon:
        ending = await daemon.serve()
        return ending, daemon.ending_reason


def run(options: RunOptions) -> Awaitable[tuple[Ending, str]]:
    """Launch QEMU on a new tap and mirror its guest until something ends it."""
    return _serve(launched(options))


def attach(qmp_path: Path, tap_name: str, run_dir: Path, monitor_path: Path,
           device_id: str = DEVICE_ID, use_trace: bool = True,
           ) -> Awaitable[tuple[Ending, str]]:
    """Mirror the guest of an already running QEMU until something ends it."""
    return _serve(attached(qmp_path, tap_name, run_dir, monitor_path, device_id, use_trace))


@contextlib.asynccontextmanager
async def launched(options: RunOptions) -> AsyncIterator[Daemon]:
    """A daemon with its own tap and QEMU, its monitor listening; `Daemon.serve` it."""
    options.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    trace_log = options.run_dir / TRACE_LOG
    trace_log.write_bytes(b"")
    monitor = QmpServer(options.monitor, version_info())
    await asyncio.to_thread(tap.create_tap, options.tap_name)
    try:
        program = await asyncio.to_thread(SteeringProgram)
        try:
            async with (_launched_with(options, program, trace_log, monitor.emit) as daemon,
                        _monitored(daemon, monitor)):
                yield daemon
        finally:
            program.close()
    finally:
        await asyncio.to_thread(tap.delete_tap, options.tap_name)


@contextlib.asynccontextmanager
async def _launched_with(options: RunOptions, program: SteeringProgram, trace_log: Path,
                         publish: Callable[[str, dict[str, Any]], None],
                         ) -> AsyncIterator[Daemon]:
    queue_fds = [tap.open_queue(options.tap_name) for _ in range(options.queues)]
    control_fd = tap.open_control_queue(options.tap_name)
    listener = listen_unix(options.run_dir / QMP_SOCKET)
    try:
        argv = qemu_argv(options, queue_fds, listener.fileno())
        qemu_log = options.run_dir / QEMU_LOG
        log.info("starting %s (its output goes to %s)", " ".join(argv), qemu_log)
        process = await start_qemu(argv, pass_fds=(*queue_fds, listener.fileno(),
                                                   *options.pass_fds), log_path=qemu_log)
    except BaseException:
        os.close(control_fd)
        raise
    finally:
        for fd in queue_fds:
            os.close(fd)
        listener.close()
    qmp = QMPClient("vnetbackend")
    try:
        await qmp.connect(str(options.run_dir / QMP_SOCKET))
        traced = await _enable_trace(qmp, trace_log)
        yield Daemon(qmp=qmp, device=await find_net_device(qmp, DEVICE_ID),
                     state_reader=DeviceStateReader(qmp),
                     tap_name=options.tap_name, queues=options.queues, program=program,
                     control_fd=control_fd, trace_log=trace_log if traced else None,
                     publish=publish,
                     qemu_exited=exit_reason(process), qemu_pid=process.pid)
    finally:
        await _disconnect(qmp)
        await stop_process(process, QEMU_STOP_GRACE_S)


async def _enable_trace(qmp: QMPClient, trace_log: Path) -> bool:
    """Switch QEMU's RSS trace events to *trace_log*; False if this QEMU cannot."""
    try:
        await call(qmp, "trace-event-set-state", {"name": TRACE_EVENTS, "enable": True})
        reply = await call(qmp, "human-monitor-command",
                           {"command-line": f"logfile {trace_log}"})
    except QemuCallFailed as err:
        log.warning("no RSS trace events from QEMU (%s); following the control queue", err)
        return False
    if reply:
        log.warning("QEMU refused the trace log file: %s", str(reply).strip())
        return False
    return True


@contextlib.asynccontextmanager
async def attached(qmp_path: Path, tap_name: str, run_dir: Path, monitor_path: Path,
                   device_id: str = DEVICE_ID, use_trace: bool = True,
                   ) -> AsyncIterator[Daemon]:
    """A daemon next to the QEMU at *qmp_path*, its monitor listening; `Daemon.serve` it.

    Without *use_trace* it follows the control queue's index instead of trace events.
    """
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    trace_log = run_dir / TRACE_LOG
    trace_log.write_bytes(b"")
    qmp = QMPClient("vnetbackend")
    await qmp.connect(str(qmp_path))
    try:
        device = await find_net_device(qmp, device_id)
        status = await call(qmp, "x-query-virtio-status", {"path": device.virtio_path})
        queues = (reply_field(status, "num-vqs", int, "x-query-virtio-status") - 1) // 2
        program = await asyncio.to_thread(SteeringProgram)
        try:
            control_fd = tap.open_control_queue(tap_name)
            traced = use_trace and await _enable_trace(qmp, trace_log)
            monitor = QmpServer(monitor_path, version_info())
            daemon = Daemon(qmp=qmp, device=device, state_reader=DeviceStateReader(qmp),
                            tap_name=tap_name, queues=queues,
                            program=program, control_fd=control_fd,
                            trace_log=trace_log if traced else None, publish=monitor.emit)
            async with _monitored(daemon, monitor):
                yield daemon
        finally:
            program.close()
    finally:
        await _disconnect(qmp)
