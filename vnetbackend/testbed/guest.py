"""Booting a test guest on a fresh tap, and tearing everything down whatever happens.

`boot_guest` is an async context manager: it creates a tap, opens one queue fd per queue
pair, starts QEMU paused on them, connects its control monitor and the agent port,
lets the guest run and waits for the guest's own ready line (booting once more if the
guest's console goes silent first, or QEMU dies of a crash `vnetbackend.testbed.qemu_issues`
knows: see `BOOT_ATTEMPTS`). On leaving (normally or by an
exception, including a failed boot) QEMU is stopped, the fds closed, the tap deleted and
the run directory removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from vnetbackend import tap
from vnetbackend.errors import VnetError
from vnetbackend.filewatch import FileWatch
from vnetbackend.qemu.installs import choose_qemu
from vnetbackend.qemu.process import quoted
from vnetbackend.testbed.agent import AgentError, GuestAgent
from vnetbackend.testbed.image import GuestImage, chosen_series, find_guest_image
from vnetbackend.testbed.qemu_issues import KnownQemuCrash, QemuCrash, known_crash
from vnetbackend.testbed.vm import GUEST_MAC_BYTES, QemuProcess, VmPaths, VmSpec

#: Boot-to-ready under TCG is ~5 s on an idle machine; the test machine is shared.
DEFAULT_READY_TIMEOUT = 180.0
#: The booting kernel writes to its console at least every ~1.5 s (guest time); a console
#: silent this long before the guest is ready belongs to a guest that has stopped.
DEFAULT_STALL_TIMEOUT = 30.0
#: Under TCG a guest kernel has been seen to stop for good in early boot (once in several
#: hundred boots, vCPUs oversubscribed two to one); one more boot gets past it.
BOOT_ATTEMPTS = 2
CONSOLE_TAIL_LINES = 60
#: How long a closed agent port may precede QEMU's exit.
QEMU_EXIT_GRACE = 5.0
_names = itertools.count()


def _console_tail(console: str) -> str:
    """The guest console's last lines under their heading, as failures quote them."""
    tail = "\n".join(console.splitlines()[-CONSOLE_TAIL_LINES:])
    return f"--- guest console (last {CONSOLE_TAIL_LINES} lines) ---\n{tail}"


def _evidence(console: str, qemu_log: str) -> str:
    """The guest console's last lines and QEMU's output, as failures quote them."""
    return f"{_console_tail(console)}\n--- qemu output ---\n{qemu_log.strip()}"


class GuestBootError(VnetError):
    """The guest did not become ready; the message carries its console and QEMU's log."""

    def __init__(self, reason: str, console: str, qemu_log: str, command: str = "") -> None:
        super().__init__(f"{reason}\n{_evidence(console, qemu_log)}\n"
                         f"--- qemu command ---\n{command}")
        self.reason = reason
        self.console = console
        self.qemu_log = qemu_log


class GuestStalled(UserWarning):
    """A booting guest's console went silent before it was ready: it is taken for hung.

    Issued as a warning when another boot follows; it carries the console, QEMU's log
    and command, and where each vCPU was (HMP ``info cpus``).
    """

    def __init__(self, reason: str, console: str, qemu_log: str, command: str,
                 vcpus: str) -> None:
        super().__init__(f"{reason}; booting again\n--- vCPUs ---\n{vcpus.strip()}\n"
                         f"{_console_tail(console)}")
        self.reason = reason
        self.console = console
        self.qemu_log = qemu_log
        self.command = command
        self.vcpus = vcpus


class _ConsoleSilent(AgentError):
    """Nothing reached the guest's console for the stall timeout."""


class _BootStalled(VnetError):
    """One boot hung; *stall* is the evidence, for the warning or the final error."""

    def __init__(self, stall: GuestStalled) -> None:
        super().__init__(str(stall))
        self.stall = stall


class _BootCrashed(VnetError):
    """One boot ended in a known crash (`vnetbackend.testbed.qemu_issues`)."""

    def __init__(self, crash: QemuCrash, failure: GuestBootError) -> None:
        super().__init__(f"the boot crashed as {crash.name} does: {crash.description}")
        self.failure = failure


@dataclass(frozen=True, slots=True)
class GuestOptions:
    """What to boot. ``kernel_args`` is appended to the kernel command line.

    ``cpus`` defaults to ``queues``: Linux 6.1's virtio_net starts with one queue pair per
    CPU and keeps that count as ``max_tx_vq`` in every later RSS command, even after
    ``ethtool -L`` raised the pairs in use. QEMU takes ``max_tx_vq`` as the number of
    active pairs, so frames RSS steers to a queue above it arrive on a lower queue.
    Booting with as many CPUs as queue pairs, and only lowering the count with
    ``ethtool -L``, keeps QEMU serving every queue the guest's table can name.

    ``records_port`` gives the guest the virtio-serial port its recorder streams on.

    ``image`` None boots the test guest of the default kernel series and ``qemu`` None
    the default QEMU (`vnetbackend.testbed.image`, `vnetbackend.qemu.installs`: the
    environment can choose both); ``qemu`` may name a path or a version.
    """

    queues: int = 2
    cpus: int | None = None
    rss: bool = True
    hash_report: bool = True
    kernel_args: str = ""
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    extra_args: tuple[str, ...] = ()
    image: GuestImage | None = None
    qemu: str | None = None
    records_port: bool = True


@dataclass(slots=True)
class Guest:
    """A running guest: its tap, QEMU, agent and control monitor."""

    tap_name: str
    mac: bytes
    qemu: QemuProcess
    agent: GuestAgent
    control: QMPClient
    boot_seconds: float
    queue_fds: list[int] = field(default_factory=list)
    qemu_version: tuple[int, int, int] = (0, 0, 0)

    @property
    def kernel_release(self) -> str:
        """The guest kernel's release, as its ready line said."""
        return self.agent.kernel_release or ""

    @property
    def paths(self) -> VmPaths:
        return self.qemu.spec.paths

    @property
    def qmp_socket(self) -> Path:
        """The monitor left free for tests and the daemon (connect a `QMPClient` here)."""
        return self.paths.qmp_socket

    @property
    def queues(self) -> int:
        return self.qemu.spec.queues


def unique_tap_name() -> str:
    """A tap name no other process here picks: ``vg<pid>x<n>``."""
    return f"vg{os.getpid()}x{next(_names)}"[: tap.IFNAMSIZ - 1]


async def _agent_connected(control: QMPClient) -> bool:
    for chardev in await control.execute("query-chardev"):
        if chardev["label"] == "agent":
            return not str(chardev["filename"]).startswith("disconnected")
    raise AgentError("QEMU has no 'agent' chardev")


async def _let_guest_run(control: QMPClient, timeout: float) -> None:
    """Resume the paused VM once QEMU has accepted our agent connection.

    The guest's ready line would be dropped if it came before that, so this waits for
    QEMU to report the chardev connected (it accepts on its next main-loop turn).
    """
    deadline = time.monotonic() + timeout
    while not await _agent_connected(control):
        if time.monotonic() > deadline:
            raise AgentError("QEMU did not accept the agent connection")
        await asyncio.sleep(0.01)
    await control.execute("cont")


async def _wait_ready(qemu: QemuProcess, agent: GuestAgent, timeout: float,
                      stall_timeout: float) -> None:
    ready = asyncio.ensure_future(agent.wait_ready())
    exited = asyncio.ensure_future(qemu.wait())
    silent = asyncio.ensure_future(_console_goes_quiet(qemu.spec.paths.console_log,
                                                       stall_timeout))
    try:
        done, _ = await asyncio.wait({ready, exited, silent}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready in done and ready.exception() is not None and exited not in done:
            # QEMU closes the agent port as it exits: say so rather than "port closed".
            done |= (await asyncio.wait({exited}, timeout=QEMU_EXIT_GRACE))[0]
    finally:
        for task in (ready, exited, silent):
            task.cancel()
    if exited in done:
        raise AgentError(f"QEMU exited with status {qemu.returncode} before the guest was ready")
    if ready in done:
        ready.result()
        return
    if silent in done:
        silent.result()
        raise _ConsoleSilent(f"the guest's console was silent for {stall_timeout:g} s "
                             "before the guest was ready")
    raise AgentError(f"the guest was not ready within {timeout:g} s")


async def _console_goes_quiet(console_log: Path, quiet_for: float) -> None:
    """Return once nothing has been written to *console_log* for *quiet_for* seconds."""
    watch = FileWatch(console_log)
    try:
        while True:
            try:
                await asyncio.wait_for(watch.written.wait(), quiet_for)
            except TimeoutError:
                return
            watch.written.clear()
    finally:
        watch.close()


@contextlib.asynccontextmanager
async def boot_guest(options: GuestOptions = GuestOptions(),
                     prepare: Callable[[GuestAgent], Awaitable[None]] | None = None,
                     ) -> AsyncIterator[Guest]:
    """Boot a guest as *options* say; yield it once ready; always clean up after.

    A guest whose console stays silent for ``options.stall_timeout`` before it is ready
    is taken for hung and booted again, up to `BOOT_ATTEMPTS` times in all, each hang
    announced with a `GuestStalled` warning that carries its console and vCPU state.
    *prepare*, given the agent of a ready guest, is part of the boot: a boot that ends in
    a known crash while it runs (`vnetbackend.testbed.qemu_issues`) is booted again too.
    Raises `GuestBootError` (with the console log) if the guest is not ready in time, its
    QEMU exits, or every attempt hung. Every teardown step runs even if an earlier one
    fails.
    """
    image = options.image or find_guest_image()
    if image is None:
        raise FileNotFoundError(f"no Linux {chosen_series()} test guest: run scripts/setup")
    qemu = await choose_qemu(options.qemu)
    name = unique_tap_name()
    async with contextlib.AsyncExitStack() as cleanup:
        # tap.py talks netlink through pyroute2's synchronous API, which cannot run inside
        # a running event loop: give it a thread.
        await asyncio.to_thread(tap.create_tap, name)
        cleanup.push_async_callback(asyncio.to_thread, tap.delete_tap, name)
        fds: list[int] = []
        for _ in range(options.queues):
            fds.append(await asyncio.to_thread(tap.open_queue, name))
            cleanup.callback(os.close, fds[-1])
        # From now on the queue fds keep the tap alive: should this process die without
        # cleaning up, the kernel removes the tap once QEMU (killed with us) lets go too.
        fcntl.ioctl(fds[0], tap.TUNSETPERSIST, 0)
        append = f"console=ttyS0 panic=-1 {options.kernel_args}".strip()
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            for fd in fds:
                tap.attach_queue(fd)  # the QEMU of an earlier attempt may have detached it
            run_dir = Path(tempfile.mkdtemp(prefix=f"vnet-guest-{os.getpid()}-"))
            spec = VmSpec(kernel=image.kernel, initrd=image.initrd, tap_fds=tuple(fds),
                          run_dir=run_dir, append=append, rss=options.rss,
                          hash_report=options.hash_report, cpus=options.cpus or options.queues,
                          extra_args=options.extra_args, binary=qemu.binary,
                          records_port=options.records_port)
            vm = contextlib.AsyncExitStack()
            vm.callback(shutil.rmtree, run_dir, ignore_errors=True)
            try:
                guest = await _boot_vm(vm, name, spec, options, qemu.version, prepare)
            except _BootStalled as hung:
                await vm.aclose()
                stall = hung.stall
                if attempt == BOOT_ATTEMPTS:
                    raise GuestBootError(f"{stall.reason}, in each of {attempt} boots\n"
                                         f"--- vCPUs ---\n{stall.vcpus.strip()}",
                                         stall.console, stall.qemu_log,
                                         stall.command) from None
                warnings.warn(stall, stacklevel=2)
                continue
            except _BootCrashed as crashed:
                await vm.aclose()
                if attempt == BOOT_ATTEMPTS:
                    raise crashed.failure from None
                warnings.warn(KnownQemuCrash(f"{crashed}; booting again"), stacklevel=2)
                continue
            except BaseException:
                await vm.aclose()
                raise
            cleanup.push_async_exit(vm)
            break
        yield guest


async def _boot_vm(vm: contextlib.AsyncExitStack, tap_name: str, spec: VmSpec,
                   options: GuestOptions, qemu_version: tuple[int, int, int],
                   prepare: Callable[[GuestAgent], Awaitable[None]] | None) -> Guest:
    """Start QEMU on *spec*, wait for the guest to be ready and *prepare* it; *vm* takes
    its teardown.

    Raises `_BootStalled` when the console goes silent first, `GuestBootError` on any
    other failure.
    """
    started = time.monotonic()
    qemu = await QemuProcess.start(spec)
    vm.push_async_callback(qemu.stop)
    control = QMPClient(f"control-{tap_name}")
    vm.push_async_callback(_quietly_disconnect, control)
    try:
        agent = await GuestAgent.connect(spec.paths.agent_socket)
        vm.push_async_callback(agent.close)
        await control.connect(str(spec.paths.control_socket))
        await _let_guest_run(control, timeout=30.0)
        await _wait_ready(qemu, agent, options.ready_timeout, options.stall_timeout)
        if prepare is not None:
            await prepare(agent)
    except _ConsoleSilent as silent:
        raise _BootStalled(GuestStalled(str(silent), qemu.console_text(), qemu.log_text(),
                                        quoted(qemu.argv), await _vcpu_state(control))
                           ) from None
    except (AgentError, OSError, QMPError) as err:
        failure = GuestBootError(str(err), qemu.console_text(), qemu.log_text(),
                                 quoted(qemu.argv))
        crash = known_crash(qemu.log_text(), qemu.console_text(), qemu_version)
        if crash is not None:
            raise _BootCrashed(crash, failure) from None
        raise failure from None
    # From now on a request that fails quotes the guest itself (during the boot the
    # GuestBootError does).
    agent.describe = lambda: _evidence(qemu.console_text(), qemu.log_text())
    return Guest(tap_name=tap_name, mac=GUEST_MAC_BYTES, qemu=qemu,
                 agent=agent, control=control, boot_seconds=time.monotonic() - started,
                 queue_fds=list(spec.tap_fds), qemu_version=qemu_version)


async def _vcpu_state(control: QMPClient) -> str:
    """Where each vCPU is (HMP ``info cpus``), or why that could not be read."""
    try:
        return str(await control.execute("human-monitor-command",
                                          {"command-line": "info cpus"}))
    except (QMPError, OSError, EOFError) as err:
        return f"(vCPU state unavailable: {err!r})"


async def _quietly_disconnect(client: QMPClient) -> None:
    """Disconnect, ignoring what a monitor already gone with QEMU raises (EOFError, ...)."""
    with contextlib.suppress(Exception):
        await client.disconnect()
