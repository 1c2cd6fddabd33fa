"""What one ``vnetbackend serve`` daemon costs per VM: resident memory and time to add one.

Starts the daemon as a child process (as a user would), then adds VMs on its monitor
one by one, each a QEMU the daemon launches with the test device (virtio-net with RSS
and hash reports on a tap it creates) and paused (``-S``, no guest boot: what is
measured is the daemon, not the guest). ``add_ms`` is the monitor command's round trip
for the VM that brings the count to each of ``vms`` (tap, program instance, QEMU
launched and answering on QMP, the device found); ``rss_mb`` is the daemon's VmRSS then.
``per_vm_mb`` is what each VM after the first adds: (RSS at the most VMs - RSS at one)
divided by the VMs in between. ``rss_mb_no_vm`` is the daemon with the program
compiled and no VM: the fixed cost (bcc's LLVM stays resident after its one compile).
``run_rss_mb`` is, for comparison, a ``vnetbackend run`` daemon with one such VM: what
each VM costs with a daemon of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from vnetbackend.choices import add_platform_options
from vnetbackend.daemon.privileges import QEMU_USER

DEFAULT_VMS = (1, 4, 16)
#: QEMU with no guest: the daemon adds the tap, the device and QMP; ``-S`` keeps it paused.
PAUSED_QEMU = ("-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults",
               "-display", "none", "-S")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 120.0


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text!r}"
                                         ) from None
    if not counts or counts[0] < 1 or list(counts) != sorted(set(counts)) or counts[-1] > 64:
        raise argparse.ArgumentTypeError(f"counts must rise from 1 or more to at most 64, "
                                         f"got {text!r}")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vms", type=_counts, default=DEFAULT_VMS, metavar="N,N,...",
                        help="VM counts to measure at (default: 1,4,16)")
    parser.add_argument("--queues", type=int, default=4, choices=range(1, 9),
                        metavar="1..8", help="queue pairs per VM (default: %(default)s)")
    parser.add_argument("--qemu-user", default=QEMU_USER, metavar="USER",
                        help="the user the QEMUs switch to (default: %(default)s)")
    add_platform_options(parser, guest=False)


def resident_mb(pid: int) -> float:
    """VmRSS of *pid* in MB (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has no VmRSS (a zombie?)")


def serve_daemon(run_dir: Path, qemu_user: str, qemu: str | None = None,
                 ) -> contextlib.AbstractAsyncContextManager[tuple[asyncio.subprocess.Process,
                                                                  QMPClient]]:
    """``vnetbackend serve`` as a child process (launching *qemu*, a path or version) and a
    client on its monitor."""
    return daemon_process(["serve", "--run-dir", str(run_dir), "--qemu-user", qemu_user,
                           *(["--qemu", qemu] if qemu else [])],
                          run_dir / "monitor.sock")


@contextlib.asynccontextmanager
async def daemon_process(argv: Sequence[str], monitor: Path,
                         ) -> AsyncIterator[tuple[asyncio.subprocess.Process, QMPClient]]:
    """``vnetbackend ARGV...`` as a child process and a client on its *monitor* once it
    says it listens; after, the daemon is told to quit (it stops what it started) and
    waited for."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vnetbackend.cli", *argv, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    said: list[str] = []
    listening = asyncio.Event()

    async def read_log() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            said.append(line.decode(errors="replace"))
            if "QMP monitor listening" in said[-1]:
                listening.set()

    reading = asyncio.create_task(read_log())
    client = QMPClient("bench-scale")
    try:
        started = asyncio.create_task(listening.wait())
        await asyncio.wait({started, reading}, timeout=START_TIMEOUT_S,
                           return_when=asyncio.FIRST_COMPLETED)
        if not listening.is_set():
            started.cancel()
            raise RuntimeError(f"vnetbackend {argv[0]} did not start: " + "".join(said))
        await client.connect(str(monitor))
        yield process, client
    finally:
        if process.returncode is None:
            with contextlib.suppress(Exception):
                await client.execute("quit")
        with contextlib.suppress(Exception):
            await client.disconnect()  # also after an EOF, which it holds until then
        if process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.terminate()
                await process.wait()
        await reading


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    tag = os.getpid() % 100000
    rss_mb: list[float] = []
    add_ms: list[float] = []
    every_add_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vnetbackend-scale-") as scratch:
        one = Path(scratch) / "one"
        async with daemon_process(
                ["run", "--tap", f"vs{tag}r", "--queues", str(args.queues), "--run-dir",
                 str(one), "--qemu-user", args.qemu_user,
                 *(["--qemu", args.qemu] if args.qemu else []), "--", *PAUSED_QEMU],
                one / "monitor.sock") as (process, _):
            run_rss = resident_mb(process.pid)
        async with serve_daemon(Path(scratch) / "run", args.qemu_user,
                                args.qemu) as (process, client):
            no_vm = resident_mb(process.pid)
            for index in range(args.vms[-1]):
                started = time.perf_counter()
                await client.execute("vnet-add-vm", {
                    "id": f"vm{index}", "tap": f"vs{tag}x{index}", "queues": args.queues,
                    "qemu-args": list(PAUSED_QEMU)})
                every_add_ms.append((time.perf_counter() - started) * 1000)
                if index + 1 in args.vms:
                    rss_mb.append(resident_mb(process.pid))
                    add_ms.append(every_add_ms[-1])
            vms = await client.execute("query-vnet-vms")
            running = sum(vm["state"] == "running" for vm in vms)
    span = args.vms[-1] - args.vms[0]
    later = every_add_ms[1:]
    return {
        "benchmark": "scale",
        "vms": list(args.vms),
        "rss_mb": [round(mb, 1) for mb in rss_mb],
        "add_ms": [round(ms, 1) for ms in add_ms],
        "per_vm_mb": round((rss_mb[-1] - rss_mb[0]) / span, 2) if span else None,
        "rss_mb_no_vm": round(no_vm, 1),
        "run_rss_mb": round(run_rss, 1),
        "add_ms_after_first": {
            "median": round(statistics.median(later), 1) if later else None,
            "max": round(max(later), 1) if later else None,
        },
        "queues": args.queues,
        "running_at_end": running,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_run(args))
