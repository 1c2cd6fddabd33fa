"""The test VM: the test machine booting the test guest on a tap, under QEMU.

The fixed machine (q35, TCG, CPUs, memory) comes from ``qemu-configs/testvm.cfg`` via
``-readconfig``; the guest (kernel, console, agent port) is added by `guest_args`, the
virtio-net device and monitors by `vnetbackend.qemu.command`, as for the daemon's own
QEMU. Monitors and the agent port are unix sockets bound and listening before QEMU
starts, handed over by fd: they accept connections at once, with no wait for QEMU to
come up and no race on the socket file appearing. ``extra_args`` and ``extra_fds`` let a
caller add more.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from vnetbackend.errors import VnetError
from vnetbackend.qemu.command import (
    monitor_args,
    net_device_args,
    option,
    socket_chardev_args,
)
from vnetbackend.qemu.process import QEMU_BINARY, listen_unix, start_qemu, stop_process

#: The machine settings every test VM shares.
MACHINE_CONFIG = Path(__file__).resolve().parents[2] / "qemu-configs" / "testvm.cfg"
#: The name of the virtio-serial port the guest-side recorder streams on.
RECORDS_PORT_NAME = "org.vnetbackend.records.0"
#: The test guest's MAC address.
GUEST_MAC = "52:54:00:56:4e:01"
GUEST_MAC_BYTES = bytes.fromhex(GUEST_MAC.replace(":", ""))
SUPPORTED_QUEUES = range(1, 9)
UNIX_PATH_MAX = 108

_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class LaunchError(VnetError):
    """QEMU could not be started, or a VM description is unusable."""


@dataclass(frozen=True, slots=True)
class VmSpec:
    """One test VM. ``tap_fds`` are open tap queue fds, one per queue pair.

    ``run_dir`` holds the VM's sockets and logs (see `VmPaths`); ``paused`` starts it
    with ``-S`` so that the caller can connect everything before the guest runs.
    ``records_port`` adds a virtio-serial port named `RECORDS_PORT_NAME` on a unix socket
    (``VmPaths.records_socket``) for the guest's recorder (``guest/vnet-recorder.c``).
    ``cpus`` overrides the machine config's CPU count. ``die_with_parent`` has the
    kernel kill QEMU when the process that started it dies, however it dies (QEMU
    runs in its own session, so it would not see the terminal's signals).
    """

    kernel: Path
    initrd: Path
    tap_fds: tuple[int, ...]
    run_dir: Path
    append: str = "console=ttyS0 panic=-1"
    mac: str = GUEST_MAC
    rss: bool = True
    hash_report: bool = True
    mq: bool = True
    cpus: int | None = None
    paused: bool = True
    agent_port: bool = True
    records_port: bool = False
    machine_config: Path = MACHINE_CONFIG
    extra_args: tuple[str, ...] = ()
    extra_fds: tuple[int, ...] = ()
    binary: str = QEMU_BINARY
    die_with_parent: bool = True

    @property
    def queues(self) -> int:
        return len(self.tap_fds)

    @property
    def paths(self) -> VmPaths:
        return VmPaths(self.run_dir)

    def check(self) -> None:
        """Raise `LaunchError` naming the first field QEMU would refuse or misread."""
        if self.queues not in SUPPORTED_QUEUES:
            raise LaunchError(f"tap_fds: {self.queues} queues, expected 1..8")
        for fd in self.tap_fds + self.extra_fds:
            try:
                os.fstat(fd)
            except OSError:
                raise LaunchError(f"fd {fd} is not open") from None
        if not _MAC_RE.match(self.mac):
            raise LaunchError(f"mac {self.mac!r} is not xx:xx:xx:xx:xx:xx (lower case)")
        for name in ("kernel", "initrd", "machine_config"):
            path = getattr(self, name)
            if not Path(path).is_file():
                raise LaunchError(f"{name}: {path} does not exist (scripts/build-guest?)")
        if not self.run_dir.is_dir():
            raise LaunchError(f"run_dir: {self.run_dir} is not a directory")
        longest = max(len(os.fsencode(p)) for p in (self.paths.qmp_socket,
                                                    self.paths.control_socket,
                                                    self.paths.agent_socket,
                                                    self.paths.records_socket))
        if longest >= UNIX_PATH_MAX:
            raise LaunchError(f"run_dir: {self.run_dir} is too long for unix socket paths "
                              f"(they must stay below {UNIX_PATH_MAX} bytes)")


@dataclass(frozen=True, slots=True)
class VmPaths:
    """Where a VM's sockets and logs are, inside its run directory."""

    run_dir: Path
    qmp_socket: Path = field(init=False)
    control_socket: Path = field(init=False)
    agent_socket: Path = field(init=False)
    records_socket: Path = field(init=False)
    console_log: Path = field(init=False)
    qemu_log: Path = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "qmp_socket", self.run_dir / "qmp.sock")
        set_(self, "control_socket", self.run_dir / "control.sock")
        set_(self, "agent_socket", self.run_dir / "agent.sock")
        set_(self, "records_socket", self.run_dir / "records.sock")
        set_(self, "console_log", self.run_dir / "console.log")
        set_(self, "qemu_log", self.run_dir / "qemu.log")


def guest_args(kernel: Path, initrd: Path, *, append: str, console_log: Path,
               agent_fd: int | None, cpus: int | None = None,
               machine_config: Path = MACHINE_CONFIG,
               console_fd: int | None = None) -> list[str]:
    """The test machine with the test guest's kernel: console to *console_log* (and, if
    *console_fd*, a listening unix socket, served there too), and the agent on ttyS1 if
    *agent_fd* (a listening unix socket) is given."""
    console = (option("file", id="console", path=console_log) if console_fd is None else
               option("socket", id="console", fd=console_fd, server=True, wait=False,
                      logfile=console_log))
    argv = [
        "-readconfig", str(machine_config),
        "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config",
        *(["-smp", str(cpus)] if cpus else []),
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        "-chardev", console, "-serial", "chardev:console",
    ]
    if agent_fd is not None:
        argv += [*socket_chardev_args("agent", agent_fd), "-serial", "chardev:agent"]
    return argv


def records_port_args(records_fd: int) -> list[str]:
    """A virtio-serial port named `RECORDS_PORT_NAME` on *records_fd* (a listening unix
    socket): where the guest's recorder streams what its driver received."""
    return [*socket_chardev_args("records", records_fd),
            "-device", "virtio-serial-pci,id=vnet-serial0",
            "-device", option("virtserialport", bus="vnet-serial0.0", chardev="records",
                              name=RECORDS_PORT_NAME)]


def qemu_command(spec: VmSpec, socket_fds: dict[str, int]) -> list[str]:
    """QEMU's argv for *spec*; *socket_fds* maps chardev ids to listening socket fds.

    Chardev ids: ``qmp`` (the monitor for users such as tests and the daemon),
    ``control`` (the monitor of whoever runs the VM), ``agent`` (ttyS1) and ``records``
    (the recorder's virtio-serial port).
    """
    argv = [
        spec.binary,
        *guest_args(spec.kernel, spec.initrd, append=spec.append,
                    console_log=spec.paths.console_log, agent_fd=socket_fds.get("agent"),
                    cpus=spec.cpus, machine_config=spec.machine_config),
        *monitor_args("control", socket_fds["control"]),
        *monitor_args("qmp", socket_fds["qmp"]),
        *net_device_args(spec.tap_fds, mac=spec.mac, rss=spec.rss,
                         hash_report=spec.hash_report, mq=spec.mq),
    ]
    if "records" in socket_fds:
        argv += records_port_args(socket_fds["records"])
    if spec.paused:
        argv.append("-S")
    argv += spec.extra_args
    return argv


class QemuProcess:
    """A running QEMU for a `VmSpec`. `stop` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, spec: VmSpec, process: asyncio.subprocess.Process,
                 argv: list[str]) -> None:
        self.spec = spec
        self.process = process
        self.argv = argv

    @classmethod
    async def start(cls, spec: VmSpec) -> QemuProcess:
        """Check *spec*, bind its sockets and start QEMU; raise `LaunchError` on failure."""
        spec.check()
        paths = spec.paths
        wanted = {"control": paths.control_socket, "qmp": paths.qmp_socket}
        if spec.agent_port:
            wanted["agent"] = paths.agent_socket
        if spec.records_port:
            wanted["records"] = paths.records_socket
        listeners: dict[str, socket.socket] = {}
        try:
            for name, path in wanted.items():
                listeners[name] = listen_unix(path)
            fds = {name: sock.fileno() for name, sock in listeners.items()}
            argv = qemu_command(spec, fds)
            try:
                process = await start_qemu(argv, pass_fds=(*spec.tap_fds, *spec.extra_fds,
                                                            *fds.values()),
                                           log_path=paths.qemu_log,
                                           die_with_parent=spec.die_with_parent)
            except OSError as err:
                raise LaunchError(f"cannot run {spec.binary}: {err}") from None
        finally:
            for sock in listeners.values():
                sock.close()
        return cls(spec, process, argv)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        return await self.process.wait()

    def log_text(self) -> str:
        """What QEMU wrote on stdout/stderr so far."""
        return _read_text(self.spec.paths.qemu_log)

    def console_text(self) -> str:
        """The guest's console (ttyS0) so far."""
        return _read_text(self.spec.paths.console_log)

    async def stop(self, grace: float = 5.0) -> int:
        """End QEMU: SIGTERM, then SIGKILL after *grace* seconds. Returns its exit status."""
        return await stop_process(self.process, grace)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
