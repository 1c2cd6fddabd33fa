"""Building QEMU's command line for a virtio-net RSS guest on a tap, and running QEMU.

The fixed machine (q35, TCG, CPUs, memory) comes from ``qemu-configs/testvm.cfg`` via
``-readconfig``; everything that varies per VM (kernel, tap queue fds, the device's RSS
switches, sockets, logs) is added here. The tap queues are fds the caller opened and
QEMU inherits (``-netdev tap,fds=a:b:..``), so QEMU never needs to create or own the
tap. Monitors and the agent port are unix sockets this module binds and listens on
before QEMU starts, handed over by fd: they accept connections at once, with no wait
for QEMU to come up and no race on the socket file appearing.

Extra arguments and fds (``extra_args``, ``extra_fds``) let a caller such as the daemon
add, for instance, ``-trace 'virtio_net_rss*' -D FILE -msg timestamp=on``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"
#: The machine settings every test VM shares.
MACHINE_CONFIG = Path(__file__).resolve().parents[2] / "qemu-configs" / "testvm.cfg"
GUEST_MAC = "52:54:00:56:4e:01"
NET_DEVICE_ID = "vnet0"
NETDEV_ID = "tap0"
SUPPORTED_QUEUES = range(1, 9)
UNIX_PATH_MAX = 108
#: util-linux's setpriv sets the parent-death signal and execs QEMU (same pid).
SETPRIV = "setpriv"

_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class LaunchError(RuntimeError):
    """QEMU could not be started, or a VM description is unusable."""


@dataclass(frozen=True, slots=True)
class VmSpec:
    """One test VM. ``tap_fds`` are open tap queue fds, one per queue pair.

    ``run_dir`` holds the VM's sockets and logs (see `VmPaths`); ``paused`` starts it
    with ``-S`` so that the caller can connect everything before the guest runs.
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
                                                    self.paths.agent_socket))
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
    console_log: Path = field(init=False)
    qemu_log: Path = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "qmp_socket", self.run_dir / "qmp.sock")
        set_(self, "control_socket", self.run_dir / "control.sock")
        set_(self, "agent_socket", self.run_dir / "agent.sock")
        set_(self, "console_log", self.run_dir / "console.log")
        set_(self, "qemu_log", self.run_dir / "qemu.log")


def _opts(kind: str, **values: object) -> str:
    """A QEMU option string; booleans become on/off."""
    parts = [kind]
    for key, value in values.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key.replace('_', '-')}={value}")
    return ",".join(parts)


def qemu_command(spec: VmSpec, socket_fds: dict[str, int]) -> list[str]:
    """QEMU's argv for *spec*; *socket_fds* maps chardev ids to listening socket fds.

    Chardev ids: ``qmp`` (the monitor for users such as tests and the daemon),
    ``control`` (the monitor of whoever runs the VM) and ``agent`` (ttyS1).
    """
    n = spec.queues
    argv = [
        spec.binary, "-readconfig", str(spec.machine_config),
        "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config",
        *(["-smp", str(spec.cpus)] if spec.cpus else []),
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.append,
        "-chardev", _opts("file", id="console", path=spec.paths.console_log),
        "-serial", "chardev:console",
    ]
    if spec.agent_port:
        argv += ["-chardev", _opts("socket", id="agent", fd=socket_fds["agent"], server=True,
                                   wait=False),
                 "-serial", "chardev:agent"]
    for monitor in ("control", "qmp"):
        argv += ["-chardev", _opts("socket", id=monitor, fd=socket_fds[monitor], server=True,
                                   wait=False),
                 "-mon", f"chardev={monitor},mode=control"]
    argv += [
        "-netdev", _opts("tap", id=NETDEV_ID, fds=":".join(map(str, spec.tap_fds)),
                         vhost=False),
        "-device", _opts("virtio-net-pci", id=NET_DEVICE_ID, netdev=NETDEV_ID, mac=spec.mac,
                         mq=spec.mq, rss=spec.rss, hash=spec.hash_report,
                         vectors=2 * n + 2),
    ]
    if spec.paused:
        argv.append("-S")
    argv += spec.extra_args
    return argv


def listen_unix(path: Path) -> socket.socket:
    """A unix socket listening at *path* (a stale file there is replaced), for QEMU to
    inherit as a ``-chardev socket,fd=N,server=on`` so that clients can connect at once."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


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
        listeners: dict[str, socket.socket] = {}
        try:
            for name, path in wanted.items():
                listeners[name] = listen_unix(path)
            fds = {name: sock.fileno() for name, sock in listeners.items()}
            argv = qemu_command(spec, fds)
            prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if spec.die_with_parent else []
            with open(paths.qemu_log, "wb") as log:
                try:
                    process = await asyncio.create_subprocess_exec(
                        *prefix, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                        pass_fds=(*spec.tap_fds, *spec.extra_fds, *fds.values()),
                        start_new_session=True)
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


async def stop_process(process: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM, then SIGKILL after *grace* seconds; the exit status (-signal if killed)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode if process.returncode is not None else -1


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def quoted(argv: Sequence[str]) -> str:
    """*argv* as one shell-quoted line, for logs and error messages."""
    return shlex.join(argv)
