"""Starting the daemon: with a QEMU it launches (`run`) or next to a running one (`attach`).

``run`` creates the multi-queue tap, loads the steering program, opens the tap's queues
and hands them to QEMU, adds the virtio-net device with RSS and hash reports offered and
a QMP monitor on a socket it listens on before QEMU starts. QEMU starts with no
capability but those it needs to switch user, and switches to an unprivileged user
(`vnetbackend.daemon.privileges.QEMU_USER` unless told otherwise) inside a seccomp
sandbox once it has opened what its command line names: it needs neither CAP_NET_ADMIN
nor CAP_BPF, and opens nothing in the run directory. Its stdout and stderr go to
``qemu.log`` there, opened by the daemon, and so do its RSS trace events (switched on
over QMP), which the daemon follows in that file. QEMU's monitor socket stays in the run
directory, so a daemon started again later can ``attach`` to the same QEMU.

``attach`` connects to a QEMU's QMP socket, switches its RSS trace events on into
``rss-trace.log`` in the run directory (or, if that fails, follows the control queue
instead) and takes over the steering of its tap.

Each comes in two forms: `launched_vm` and `attached_vm` set up one VM's daemon (its
program instance, run directory, QEMU or QMP connection, and their cleanup) for a caller
that serves it, such as `vnetbackend.daemon.serve` with many VMs on one monitor;
`launched` and `attached` add a monitor of its own for that one VM, and `run` and
`attach` serve it as the whole process.

Once set up, a daemon started by `run` or `attach` keeps only the capabilities it still
needs (`vnetbackend.daemon.privileges`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, QMPClient

from vnetbackend import tap
from vnetbackend.daemon.lifecycle import Daemon, Ending
from vnetbackend.daemon.monitor import only, register_commands, version_info
from vnetbackend.daemon.privileges import (
    QEMU_USER,
    RUNNING_CAPABILITIES,
    QemuUser,
    capability_names,
    drop_capabilities,
    qemu_user,
)
from vnetbackend.daemon.qmp_server import QmpServer
from vnetbackend.daemon.run_dir import RunDir
from vnetbackend.errors import VnetError
from vnetbackend.qemu.command import (
    DEVICE_ID,
    monitor_args,
    net_device_args,
    unprivileged_args,
)
from vnetbackend.qemu.device import DeviceStateReader, find_net_device, query_qemu_version
from vnetbackend.qemu.follower import TRACE_EVENTS
from vnetbackend.qemu.installs import Qemu, choose_qemu
from vnetbackend.qemu.process import (
    exit_reason,
    start_confined_qemu,
    stop_process,
)
from vnetbackend.qemu.qmp import QemuCallFailed, call, reply_field
from vnetbackend.steering.instances import ProgramSource
from vnetbackend.steering.program import SteeringProgram

log = logging.getLogger("vnetbackend.launch")

QMP_SOCKET = "qemu-qmp.sock"
MONITOR_SOCKET = "monitor.sock"
TRACE_LOG = "rss-trace.log"
QEMU_LOG = "qemu.log"
QEMU_STOP_GRACE_S = 10.0

EventSink = Callable[[str, dict[str, Any]], None]
T = TypeVar("T")
R = TypeVar("R")


class QmpUnreachable(VnetError):
    """No QEMU answers on the QMP socket ``path`` (`attached_vm`)."""

    def __init__(self, path: Path, err: Exception) -> None:
        super().__init__(f"QEMU's QMP socket {path}: {err}")
        self.path = path


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What ``vnetbackend run`` needs; *run_dir* holds the sockets and QEMU's log.

    *pass_fds* are open fds QEMU inherits, for arguments such as ``-chardev socket,fd=N``.
    *qemu* chooses the QEMU, by path or version (`vnetbackend.qemu.installs`); *qemu_user*
    is the user it switches to. *monitor* is the daemon's own monitor socket, for
    `launched` (a daemon serving many VMs has one monitor for all).
    """

    qemu_args: tuple[str, ...]
    tap_name: str
    queues: int
    run_dir: Path
    monitor: Path | None = None
    mac: str | None = None
    pass_fds: tuple[int, ...] = ()
    qemu: str | None = None
    qemu_user: str = QEMU_USER


def qemu_argv(options: RunOptions, qemu: Qemu, queue_fds: Sequence[int], qmp_fd: int,
              user: QemuUser) -> list[str]:
    """QEMU's command line: the user's arguments plus the tap, the device, QMP, trace
    timestamps, and (last, so that they win) the switch to *user* and the sandbox. The
    trace events themselves are switched on over QMP (`_enable_trace`), as for a QEMU the
    daemon attaches to, so both ways follow the guest alike."""
    return [
        qemu.binary, *options.qemu_args,
        *net_device_args(queue_fds, mac=options.mac),
        *monitor_args("vnetbackend-qmp", qmp_fd), "-msg", "timestamp=on",
        *unprivileged_args(user.name, qemu.version),
    ]


async def _disconnect(qmp: QMPClient) -> None:
    """Close the QMP connection; QEMU may be gone already (qemu.qmp re-raises its EOF)."""
    with contextlib.suppress(EOFError, ConnectionError):
        await qmp.disconnect()


def tagged(publish: EventSink, vm_id: str) -> EventSink:
    """*publish* with the VM's id put into every event's data as ``vm``."""
    def publish_for_vm(name: str, data: dict[str, Any]) -> None:
        publish(name, {"vm": vm_id, **data})
    return publish_for_vm


@contextlib.asynccontextmanager
async def _monitored(daemon: Daemon, vm_id: str, monitor: QmpServer) -> AsyncIterator[Daemon]:
    register_commands(monitor, only(vm_id, daemon), daemon.request_stop)
    async with monitor:
        yield daemon


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT call *stop* with the signal's name."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signal.Signals(signum).name)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _serve_one(daemon: Daemon) -> tuple[Ending, str]:
    with stop_on_signals(daemon.request_stop):
        ending = await daemon.serve()
    return ending, daemon.ending_reason


async def _serve_with_only(daemons: contextlib.AbstractAsyncContextManager[Daemon],
                           keep: Collection[int]) -> tuple[Ending, str]:
    """Set up the daemon *daemons* yields, keep only the capabilities *keep*, serve it."""
    return await serve_with_only(daemons, keep, _serve_one)


async def serve_with_only(setup: contextlib.AbstractAsyncContextManager[T],
                          keep: Collection[int], body: Callable[[T], Awaitable[R]]) -> R:
    """Enter *setup*, keep only the capabilities *keep*, then run *body* on what it yields.

    Capabilities belong to threads, so no thread of the setup may outlive it: its blocking
    calls run in a pool that is shut down before the drop (later threads are started by
    this one and inherit its sets), and child processes are waited for through pidfds
    (Python 3.11's default child watcher waits in a thread per child; 3.12 and later
    use pidfds themselves).
    """
    loop = asyncio.get_running_loop()
    if sys.version_info < (3, 12):
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        asyncio.set_child_watcher(watcher)
    setup_pool = ThreadPoolExecutor(thread_name_prefix="vnetbackend-setup")
    loop.set_default_executor(setup_pool)
    async with setup as served:
        setup_pool.shutdown(wait=True)
        loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="vnetbackend"))
        kept = drop_capabilities(keep)
        log.info("set up; capabilities kept: %s",
                 ", ".join(capability_names(kept.effective)) or "none")
        return await body(served)


async def run(options: RunOptions) -> tuple[Ending, str]:
    """Launch QEMU on a new tap and mirror its guest until something ends it.

    Once set up, the daemon keeps only `RUNNING_CAPABILITIES` (deleting the tap at exit,
    signalling QEMU).
    """
    return await _serve_with_only(launched(options), RUNNING_CAPABILITIES)


async def attach(qmp_path: Path, tap_name: str, run_dir: Path, monitor_path: Path,
                 device_id: str = DEVICE_ID, use_trace: bool = True) -> tuple[Ending, str]:
    """Mirror the guest of an already running QEMU until something ends it.

    Once set up, the daemon keeps no capability: it neither deletes the tap nor signals
    QEMU.
    """
    return await _serve_with_only(
        attached(qmp_path, tap_name, run_dir, monitor_path, device_id, use_trace), ())


@contextlib.asynccontextmanager
async def launched(options: RunOptions) -> AsyncIterator[Daemon]:
    """A daemon with its own tap and QEMU, its monitor (``options.monitor``) listening;
    `Daemon.serve` it. Its VM's id is the tap's name. Raises as `launched_vm` does."""
    if options.monitor is None:
        raise ValueError("launched needs RunOptions.monitor")
    monitor = QmpServer(options.monitor, version_info())
    async with (launched_vm(options, ProgramSource(), tagged(monitor.emit, options.tap_name))
                as daemon, _monitored(daemon, options.tap_name, monitor)):
        yield daemon


@contextlib.asynccontextmanager
async def launched_vm(options: RunOptions, programs: ProgramSource, publish: EventSink,
                      qemu: Qemu | None = None) -> AsyncIterator[Daemon]:
    """One VM's daemon with its own tap, program instance (from *programs*) and QEMU,
    publishing to *publish*; `Daemon.serve` it. On the way out QEMU is stopped, the
    program closed and the tap deleted. *qemu* is the QEMU ``options.qemu`` chooses, if
    the caller has resolved it already.

    Raises `vnetbackend.tap.TapError` for a tap name the kernel refuses (before any
    path is built from it), `vnetbackend.daemon.privileges.PrivilegeError` for a QEMU
    user that does not exist or is root, `vnetbackend.qemu.installs.QemuNotFound` or
    `vnetbackend.qemu.process.QemuVersionUnknown` for a QEMU that is not there or does
    not say its version, and
    `vnetbackend.daemon.run_dir.RunDirError` for a run directory that breaks its rules.
    """
    tap.check_name(options.tap_name)
    user = qemu_user(options.qemu_user)
    qemu = qemu or await choose_qemu(options.qemu)
    with RunDir.open(options.run_dir) as run_dir:
        await asyncio.to_thread(tap.create_tap, options.tap_name)
        try:
            program = await asyncio.to_thread(programs.instance)
            try:
                async with _launched_with(options, run_dir, user, qemu, program,
                                          publish) as daemon:
                    yield daemon
            finally:
                program.close()
        finally:
            await asyncio.to_thread(tap.delete_tap, options.tap_name)


@contextlib.asynccontextmanager
async def _launched_with(options: RunOptions, run_dir: RunDir, user: QemuUser,
                         qemu: Qemu, program: SteeringProgram,
                         publish: Callable[[str, dict[str, Any]], None],
                         ) -> AsyncIterator[Daemon]:
    queue_fds = [tap.open_queue(options.tap_name) for _ in range(options.queues)]
    control_fd = tap.open_control_queue(options.tap_name)
    listener = log_fd = None
    try:
        listener = run_dir.listen(QMP_SOCKET)
        # O_APPEND: QEMU writes at the end whatever the daemon has cut from the file.
        log_fd = run_dir.create_file(QEMU_LOG, append=True)
        argv = qemu_argv(options, qemu, queue_fds, listener.fileno(), user)
        log.info("starting %s, to run as %s (uid %d; its output goes to %s)",
                 " ".join(argv), user.name, user.uid, run_dir.path / QEMU_LOG)
        process = await start_confined_qemu(
            argv, pass_fds=(*queue_fds, listener.fileno(), *options.pass_fds),
            log_fd=log_fd)
    except BaseException:
        os.close(control_fd)
        raise
    finally:
        for fd in queue_fds:
            os.close(fd)
        if listener is not None:
            listener.close()
        if log_fd is not None:
            os.close(log_fd)
    qmp = QMPClient("vnetbackend")
    try:
        await qmp.connect(run_dir.inside(QMP_SOCKET))
        traced = await _enable_trace(qmp, None)
        async with DeviceStateReader(qmp, qemu.version, options.queues) as reader:
            yield Daemon(qmp=qmp, device=await find_net_device(qmp, DEVICE_ID),
                         state_reader=reader,
                         tap_name=options.tap_name, queues=options.queues, program=program,
                         control_fd=control_fd,
                         trace_log=run_dir.path / QEMU_LOG if traced else None,
                         publish=publish,
                         qemu_exited=asyncio.ensure_future(exit_reason(process)),
                         qemu_pid=process.pid)
    finally:
        await _disconnect(qmp)
        await stop_process(process, QEMU_STOP_GRACE_S)


async def _enable_trace(qmp: QMPClient, trace_log: Path | None) -> bool:
    """Switch QEMU's RSS trace events on, to *trace_log* if given (QEMU opens it by path)
    or else wherever QEMU's log goes (its stderr); False if this QEMU cannot."""
    try:
        await call(qmp, "trace-event-set-state", {"name": TRACE_EVENTS, "enable": True})
        if trace_log is None:
            return True
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
    Its VM's id is the tap's name. Raises as `attached_vm` does."""
    monitor = QmpServer(monitor_path, version_info())
    async with (attached_vm(qmp_path, tap_name, run_dir, ProgramSource(),
                            tagged(monitor.emit, tap_name), device_id, use_trace) as daemon,
                _monitored(daemon, tap_name, monitor)):
        yield daemon


@contextlib.asynccontextmanager
async def attached_vm(qmp_path: Path, tap_name: str, run_dir: Path, programs: ProgramSource,
                      publish: EventSink, device_id: str = DEVICE_ID, use_trace: bool = True,
                      ) -> AsyncIterator[Daemon]:
    """One VM's daemon next to the QEMU at *qmp_path*, with a program instance from
    *programs*, publishing to *publish*; `Daemon.serve` it. On the way out the QMP
    connection is closed and the program with it; QEMU and the tap are left as found.

    Without *use_trace* it follows the control queue's index instead of trace events.
    Raises `QmpUnreachable` when nothing answers at *qmp_path*,
    `vnetbackend.tap.TapError` for a tap name the kernel refuses and
    `vnetbackend.daemon.run_dir.RunDirError` for a run directory that breaks its rules.
    """
    tap.check_name(tap_name)
    with RunDir.open(run_dir) as directory:
        os.close(directory.create_file(TRACE_LOG))
        trace_log = directory.path / TRACE_LOG
        qmp = QMPClient("vnetbackend")
        try:
            await qmp.connect(str(qmp_path))
        except ConnectError as err:
            raise QmpUnreachable(qmp_path, err) from None
        try:
            device = await find_net_device(qmp, device_id)
            status = await call(qmp, "x-query-virtio-status", {"path": device.virtio_path})
            queues = (reply_field(status, "num-vqs", int, "x-query-virtio-status") - 1) // 2
            program = await asyncio.to_thread(programs.instance)
            try:
                control_fd = tap.open_control_queue(tap_name)
                try:
                    traced = use_trace and await _enable_trace(qmp, trace_log)
                    version = await query_qemu_version(qmp)
                except BaseException:
                    os.close(control_fd)
                    raise
                async with DeviceStateReader(qmp, version, queues) as reader:
                    yield Daemon(qmp=qmp, device=device, state_reader=reader,
                                 tap_name=tap_name, queues=queues,
                                 program=program, control_fd=control_fd,
                                 trace_log=trace_log if traced else None, publish=publish)
            finally:
                program.close()
        finally:
            await _disconnect(qmp)
