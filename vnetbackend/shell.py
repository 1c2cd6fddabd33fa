"""``vnetbackend vm``: the test guest under the daemon, with a shell in it for a person.

The daemon launches QEMU as ``vnetbackend run`` does (its own tap, the device with RSS
and hash reports offered, the unprivileged QEMU) with the test guest, whose init brings
eth0 up and, asked by ``vnet.shell`` on the kernel command line, starts a shell on the
console. The console is a unix socket; this command connects the terminal to it (raw
mode when the terminal is one) and prints the daemon's monitor path, so that a second
terminal can watch the mirror (``query-vnet``) while ethtool runs in the guest. Ctrl-]
or the end of the input leaves; the daemon then stops QEMU and removes its tap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

from vnetbackend.daemon import launch
from vnetbackend.qemu.process import listen_unix
from vnetbackend.testbed.agent import GuestAgent
from vnetbackend.testbed.platform import Platform
from vnetbackend.testbed.vm import GUEST_MAC, guest_args

#: The byte that leaves the session (Ctrl-], as telnet has it).
ESCAPE = b"\x1d"
READY_TIMEOUT = 180.0


def say(message: str) -> None:
    print(f"vnetbackend vm: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """*fd*'s terminal in raw mode while the block runs (nothing if it is no terminal)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _relay(console: Path, stdin_fd: int, stdout_fd: int) -> None:
    """Console output to *stdout_fd*, *stdin_fd* to the console, until Ctrl-], the end of
    the input or the console closing."""
    reader, writer = await asyncio.open_unix_connection(str(console))
    writer.write(b"\n")  # the shell's first prompt came before anyone listened: a fresh one
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def typed() -> None:
        data = os.read(stdin_fd, 4096)
        cut = data.find(ESCAPE)
        if cut >= 0 or not data:
            data = data[:max(cut, 0)]
            if not done.done():
                done.set_result(None)
        writer.write(data)

    async def shown() -> None:
        while chunk := await reader.read(4096):
            os.write(stdout_fd, chunk)

    loop.add_reader(stdin_fd, typed)
    showing = asyncio.create_task(shown())
    try:
        await asyncio.wait({done, showing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(stdin_fd)
        showing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await showing
        writer.close()


async def _session(options: launch.RunOptions, agent_path: Path, console_path: Path) -> None:
    async with launch.launched(options) as daemon:
        serving = asyncio.create_task(daemon.serve())
        agent = await GuestAgent.connect(agent_path)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                release = await agent.wait_ready()
            say(f"Linux {release} on QEMU "
                f"{'.'.join(map(str, daemon.state_reader.qemu_version))}, tap "
                f"{options.tap_name}, {options.queues} queue pairs")
            say(f"the daemon's monitor: {options.monitor} (query-vnet, ...)")
            say("a shell in the guest follows; Ctrl-] leaves")
            with _raw_terminal(sys.stdin.fileno()):
                await _relay(console_path, sys.stdin.fileno(), sys.stdout.fileno())
        finally:
            await agent.close()
            daemon.request_stop("vm session over")
            await serving


def main(tap_name: str, queues: int, run_dir: Path, monitor: Path, platform: Platform,
         work: Path) -> int:
    """Run the session; the exit status."""
    async def run() -> None:
        qemu, image = await platform.resolve()
        agent_path, console_path = work / "agent.sock", work / "console.sock"
        with listen_unix(agent_path) as agent, listen_unix(console_path) as console:
            args = guest_args(image.kernel, image.initrd,
                              append="console=ttyS0 panic=-1 vnet.shell",
                              console_log=work / "console.log", agent_fd=agent.fileno(),
                              console_fd=console.fileno(), cpus=queues)
            options = launch.RunOptions(
                qemu_args=tuple(args), tap_name=tap_name, queues=queues, run_dir=run_dir,
                monitor=monitor, mac=GUEST_MAC, pass_fds=(agent.fileno(), console.fileno()),
                qemu=qemu.binary)
            await _session(options, agent_path, console_path)

    asyncio.run(run())
    return 0
