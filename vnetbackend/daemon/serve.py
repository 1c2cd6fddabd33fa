"""One daemon for many VMs: one process, one monitor, the program compiled once.

``vnetbackend serve`` compiles the steering program once, then serves VMs added on its
monitor (`register_vm_commands`): each one a `Vm` in the `VmRegistry`, set up by
`vnetbackend.daemon.launch` (``launched_vm``: a QEMU it launches on a tap it creates;
``attached_vm``: a running QEMU by its QMP socket and tap), with its own program
instance and maps, report ring, mirror, checker and run directory ``RUN_DIR/ID``.

Each VM runs in a task of its own. Whatever ends one (its QEMU exits, its tap is deleted,
it is removed, its own daemon fails) ends only that one: the entry keeps why, in
``query-vnet-vms``, until it is removed, and every other VM goes on. Besides each VM's
own events (`vnetbackend.daemon.monitor`), ``VNET_VM_ADDED`` (its entry) says a VM is
served and ``VNET_VM_ENDED`` (``vm``, ``ending``, ``reason``) that it ended and what it
held is cleaned up. A QEMU that stops
answering holds up nothing but its own VM's calls (each has its time limit). The daemon
ends on ``quit`` or SIGTERM/SIGINT, stopping every VM first.

Once the program is compiled, the daemon keeps only `SERVE_CAPABILITIES`: what adding a
VM needs (`vnetbackend.daemon.privileges`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vnetbackend import tap
from vnetbackend.daemon.launch import (
    EventSink,
    RunOptions,
    attached_vm,
    launched_vm,
    serve_with_only,
    stop_on_signals,
    tagged,
)
from vnetbackend.daemon.lifecycle import Daemon, Ending
from vnetbackend.daemon.monitor import register_commands, version_info
from vnetbackend.daemon.privileges import QEMU_USER, SERVE_CAPABILITIES
from vnetbackend.daemon.qmp_server import Param, QmpCommandError, QmpServer
from vnetbackend.daemon.run_dir import RUN_ROOT, RunDir
from vnetbackend.errors import VnetError
from vnetbackend.qemu.command import DEVICE_ID
from vnetbackend.qemu.installs import Qemu, choose_qemu
from vnetbackend.steering.instances import ProgramSource

log = logging.getLogger("vnetbackend.serve")

#: The default run directory of ``serve``: its monitor and one directory per VM.
SERVE_ROOT = RUN_ROOT / "serve"
MONITOR_SOCKET = "monitor.sock"
#: How long adding a VM may take before it is given up (a QEMU that never answers).
ADD_TIMEOUT_S = 60.0
MAX_QUEUES = 8
_VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class VmIdError(VnetError, ValueError):
    """A VM id that is not 1-64 of letters, digits, ``_.-`` starting with a letter or
    digit (it names the VM's run directory)."""

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"VM id {vm_id!r}: 1 to 64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
        self.vm_id = vm_id


def check_vm_id(vm_id: str) -> str:
    if not _VM_ID.fullmatch(vm_id):
        raise VmIdError(vm_id)
    return vm_id


class VmState(enum.Enum):
    SETTING_UP = "setting-up"
    RUNNING = "running"
    ENDED = "ended"


#: Sets up one VM's daemon, given where its events go.
VmSetup = Callable[[EventSink], contextlib.AbstractAsyncContextManager[Daemon]]


@dataclass
class Vm:
    """One VM the daemon serves (or served: an ended one keeps why until removed)."""

    id: str
    tap_name: str
    mode: str
    state: VmState = VmState.SETTING_UP
    daemon: Daemon | None = None
    ending: Ending | None = None
    reason: str = ""
    add_ms: float | None = None
    task: asyncio.Task[None] | None = None
    ready: asyncio.Future[None] = field(default_factory=asyncio.Future)

    def view(self) -> dict[str, Any]:
        view: dict[str, Any] = {"id": self.id, "tap": self.tap_name, "mode": self.mode,
                                "state": self.state.value, "add-ms": self.add_ms}
        if self.daemon is not None:
            view["qemu-pid"] = self.daemon.qemu_pid
        if self.state is VmState.ENDED:
            view["ending"] = self.ending.name.lower() if self.ending else "failed"
            view["reason"] = self.reason
        return view


class VmRegistry:
    """The VMs of one daemon, by id; each served in a task of its own."""

    def __init__(self, publish: EventSink) -> None:
        self._publish = publish
        self._vms: dict[str, Vm] = {}

    def __iter__(self) -> Any:
        return iter(list(self._vms.values()))

    def get(self, vm_id: str) -> Vm:
        try:
            return self._vms[vm_id]
        except KeyError:
            raise QmpCommandError(f"no VM with id '{vm_id}'", "DeviceNotFound") from None

    def daemon(self, vm_id: str | None) -> Daemon:
        """The running daemon of *vm_id* (of the only VM, when None)."""
        if vm_id is None:
            if len(self._vms) != 1:
                raise QmpCommandError(f"argument 'id' is needed: this daemon serves "
                                      f"{len(self._vms)} VMs")
            vm = next(iter(self._vms.values()))
        else:
            vm = self.get(vm_id)
        if vm.daemon is None or vm.state is not VmState.RUNNING:
            raise QmpCommandError(f"VM '{vm.id}' is {vm.state.value}"
                                  + (f": {vm.reason}" if vm.reason else ""))
        return vm.daemon

    async def add(self, vm_id: str, tap_name: str, mode: str, setup: VmSetup) -> Vm:
        """Set up a VM and start serving it; `QmpCommandError` with the reason if its
        setup fails (nothing of it is kept then) or takes over `ADD_TIMEOUT_S`."""
        if vm_id in self._vms:
            raise QmpCommandError(f"a VM with id '{vm_id}' exists already")
        taken = next((vm for vm in self._vms.values()
                      if vm.tap_name == tap_name and vm.state is not VmState.ENDED), None)
        if taken is not None:
            raise QmpCommandError(f"tap '{tap_name}' is VM '{taken.id}''s")
        vm = self._vms[vm_id] = Vm(vm_id, tap_name, mode)
        started = time.perf_counter()
        vm.task = asyncio.create_task(self._live(vm, setup), name=f"vm {vm_id}")
        try:
            async with asyncio.timeout(ADD_TIMEOUT_S):
                await asyncio.shield(vm.ready)
        except BaseException as err:
            vm.task.cancel()
            await asyncio.gather(vm.task, return_exceptions=True)
            del self._vms[vm_id]
            if isinstance(err, TimeoutError):
                raise QmpCommandError(f"VM '{vm_id}' was not set up within "
                                      f"{ADD_TIMEOUT_S:.0f} s") from None
            if isinstance(err, Exception):  # anything QEMU or the system did to the setup
                raise QmpCommandError(f"VM '{vm_id}' could not be set up: "
                                      f"{type(err).__name__}: {err}") from None
            raise
        vm.add_ms = round((time.perf_counter() - started) * 1000, 3)
        self._publish("VNET_VM_ADDED", {"vm": vm_id, **vm.view()})
        log.info("VM %s added on tap %s (%s) in %.1f ms", vm_id, tap_name, mode, vm.add_ms)
        return vm

    async def _live(self, vm: Vm, setup: VmSetup) -> None:
        """The VM's whole life: set up, serve, clean up; how it ended goes into *vm*."""
        try:
            async with setup(tagged(self._publish, vm.id)) as daemon:
                vm.daemon, vm.state = daemon, VmState.RUNNING
                vm.ready.set_result(None)
                vm.ending = await daemon.serve()
                vm.reason = daemon.ending_reason
        except asyncio.CancelledError:
            if not vm.ready.done():
                raise
            vm.ending, vm.reason = Ending.REQUESTED, "the daemon stopped"
        except Exception as err:
            if not vm.ready.done():
                vm.ready.set_exception(err)
                return
            log.exception("VM %s failed", vm.id)
            if vm.ending is None:
                vm.ending = Ending.FAILED
            vm.reason = vm.reason or f"cleaning up failed: {type(err).__name__}: {err}"
        finally:
            vm.state = VmState.ENDED
        log.log(logging.INFO if vm.ending is Ending.REQUESTED else logging.WARNING,
                "VM %s ended: %s", vm.id, vm.reason)
        view = vm.view()
        self._publish("VNET_VM_ENDED", {"vm": vm.id, "ending": view["ending"],
                                        "reason": vm.reason})

    async def remove(self, vm_id: str) -> Vm:
        """Stop *vm_id* (if it still runs), wait until it is cleaned up, forget it."""
        vm = self.get(vm_id)
        if vm.state is VmState.SETTING_UP:
            raise QmpCommandError(f"VM '{vm_id}' is still being set up")
        await self._stop(vm, "removed on the monitor")
        self._vms.pop(vm_id, None)
        return vm

    async def _stop(self, vm: Vm, reason: str) -> None:
        if vm.daemon is not None and vm.state is VmState.RUNNING:
            vm.daemon.request_stop(reason)
        elif vm.state is VmState.SETTING_UP and vm.task is not None:
            vm.task.cancel()
        if vm.task is not None:
            await asyncio.gather(vm.task, return_exceptions=True)

    async def close(self, reason: str) -> None:
        """Stop every VM and wait for them all."""
        await asyncio.gather(*(self._stop(vm, reason) for vm in self._vms.values()))


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What ``vnetbackend serve`` needs: its monitor and the root of the VMs' run
    directories; *qemu_user* and *qemu* (a path or version, `vnetbackend.qemu.installs`:
    the default for VMs that name none) for VMs it launches."""

    monitor: Path
    run_root: Path
    qemu_user: str = QEMU_USER
    qemu: str | None = None


def _strings(name: str, value: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(item, str) for item in value):
        raise QmpCommandError(f"argument '{name}' must be an array of strings")
    return tuple(value)


def register_vm_commands(server: QmpServer, registry: VmRegistry, programs: ProgramSource,
                         options: ServeOptions) -> None:
    """``vnet-add-vm``, ``vnet-remove-vm`` and ``query-vnet-vms`` on *server*.

    A VM's ``qemu`` (path or version, else the daemon's) is resolved at its first launch
    and kept (a binary replaced while the daemon runs is read as the one it replaced)."""
    chosen: dict[str | None, Qemu] = {}

    async def add_vm(args: dict[str, Any]) -> dict[str, Any]:
        try:
            vm_id = check_vm_id(args["id"])
            tap.check_name(args["tap"])
        except (VmIdError, tap.TapError) as err:
            raise QmpCommandError(str(err)) from None
        run_dir = options.run_root / vm_id
        launch_keys = {"qemu-args", "queues", "mac", "qemu"} & set(args)
        if ("qmp" in args) == bool(launch_keys) or ("qmp" not in args
                                                    and "qemu-args" not in args):
            raise QmpCommandError("give either 'qmp' (attach to a running QEMU) or "
                                  "'qemu-args' (launch one), not both")
        if "qmp" in args:
            qmp_path = Path(args["qmp"])
            device_id = args.get("device-id", DEVICE_ID)
            use_trace = not args.get("poll-control-queue", False)

            def attach(publish: EventSink) -> contextlib.AbstractAsyncContextManager[Daemon]:
                return attached_vm(qmp_path, args["tap"], run_dir, programs, publish,
                                   device_id, use_trace)
            vm = await registry.add(vm_id, args["tap"], "attached", attach)
        else:
            if "device-id" in args or "poll-control-queue" in args:
                raise QmpCommandError("'device-id' and 'poll-control-queue' are for 'qmp'")
            choice = args.get("qemu", options.qemu)
            if choice not in chosen:
                try:
                    chosen[choice] = await choose_qemu(choice)
                except VnetError as err:
                    raise QmpCommandError(str(err)) from None
            qemu = chosen[choice]
            run = RunOptions(qemu_args=_strings("qemu-args", args["qemu-args"]),
                             tap_name=args["tap"], queues=args.get("queues", 2),
                             run_dir=run_dir, mac=args.get("mac"),
                             qemu=qemu.binary, qemu_user=options.qemu_user)

            def launch(publish: EventSink) -> contextlib.AbstractAsyncContextManager[Daemon]:
                return launched_vm(run, programs, publish, qemu)
            vm = await registry.add(vm_id, args["tap"], "launched", launch)
        return vm.view()

    async def remove_vm(args: dict[str, Any]) -> dict[str, Any]:
        return (await registry.remove(args["id"])).view()

    async def query_vms(_: dict[str, Any]) -> list[dict[str, Any]]:
        return [vm.view() for vm in registry]

    server.register("vnet-add-vm", add_vm, {
        "id": Param(str), "tap": Param(str),
        "qmp": Param(str, required=False), "device-id": Param(str, required=False),
        "poll-control-queue": Param(bool, required=False),
        "qemu-args": Param(list, required=False),
        "queues": Param(int, required=False, minimum=1, maximum=MAX_QUEUES),
        "mac": Param(str, required=False), "qemu": Param(str, required=False),
    })
    server.register("vnet-remove-vm", remove_vm, {"id": Param(str)})
    server.register("query-vnet-vms", query_vms)


@dataclass
class Served:
    """The serving daemon: its registry and what ends it."""

    registry: VmRegistry
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""

    def request_stop(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.stop.set()


@contextlib.asynccontextmanager
async def serving(options: ServeOptions,
                  programs: ProgramSource | None = None) -> AsyncIterator[Served]:
    """The daemon with its program compiled and its monitor listening, no VM yet; every
    VM is stopped on the way out. Raises `vnetbackend.daemon.run_dir.RunDirError` for a
    run directory that breaks the rules of one (before anything is compiled)."""
    with RunDir.open(options.run_root):
        programs = programs or ProgramSource()
        await asyncio.to_thread(programs.compile)
        monitor = QmpServer(options.monitor, version_info())
        registry = VmRegistry(monitor.emit)
        served = Served(registry)
        register_commands(monitor, registry.daemon, served.request_stop)
        register_vm_commands(monitor, registry, programs, options)
        async with monitor:
            try:
                yield served
            finally:
                await registry.close(served.reason or "the daemon stopped")


async def _serve_until_stopped(served: Served) -> tuple[Ending, str]:
    with stop_on_signals(served.request_stop):
        await served.stop.wait()
    return Ending.REQUESTED, served.reason


async def serve(options: ServeOptions) -> tuple[Ending, str]:
    """Serve VMs until ``quit`` or a signal; only `SERVE_CAPABILITIES` once compiled."""
    return await serve_with_only(serving(options), SERVE_CAPABILITIES, _serve_until_stopped)
