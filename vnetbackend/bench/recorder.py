"""The guest's recorder: records per second streamed from the guest to the host.

Boots the test guest, starts ``vnet-recorder`` in it, and sends UDP frames of 64 flows
(IPv4 and IPv6) into the tap from the host for ``--seconds``, in bursts of `BURST`
every `BURST_GAP` seconds. The figure is records parsed on the host per second, from the
first record to the last; beside it what was sent, what the guest's eth0 counted as
received, and every loss the stream reports (kernel buffer overflows, sequence gaps,
malformed lines), so that a rate bought with losses shows.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from vnetbackend.choices import add_platform_options
from vnetbackend.testbed.agent import GuestAgent
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import GuestOptions, boot_guest
from vnetbackend.testbed.injector import Injector, silence_host_stack
from vnetbackend.testbed.platform import Platform
from vnetbackend.testbed.recorder import GuestRecorder

BURST = 200
#: Seconds between bursts.
BURST_GAP = 0.005


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queues", type=int, default=4, help="queue pairs (default: 4)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long to send (default: %(default)s)")
    add_platform_options(parser, guest=True)


def _frames(mac: bytes) -> list[bytes]:
    frames = []
    for i in range(32):
        port = (40000 + i).to_bytes(2, "big")
        frames.append(mac + bytes.fromhex("020000000001" "0800" "4500002e00004000401100"
                                          "000a4d00010a4d0002") + port
                      + bytes.fromhex("1771001a0000") + bytes(18))
        frames.append(mac + bytes.fromhex("020000000001" "86dd" "6000000000101140"
                                          "fd770000000000000000000000000001"
                                          "fd770000000000000000000000000002") + port
                      + bytes.fromhex("177100100000") + bytes(8))
    return frames


async def _rx_packets(agent: GuestAgent) -> int:
    return int((await agent.check("cat /sys/class/net/eth0/statistics/rx_packets")).strip())


async def _run(args: argparse.Namespace) -> dict[str, object]:
    qemu, image = await Platform.from_args(args).resolve()
    async with boot_guest(GuestOptions(queues=args.queues, qemu=qemu.binary,
                                       image=image)) as guest:
        silence_host_stack(guest.tap_name)
        await GuestRss(guest.agent).enable_rxhash()
        recorder = GuestRecorder(guest.agent, guest.paths.records_socket)
        await recorder.start()
        try:
            rx_before = await _rx_packets(guest.agent)
            frames = _frames(guest.mac)
            sent = 0
            with Injector(guest.tap_name) as injector:
                deadline = time.monotonic() + args.seconds
                while time.monotonic() < deadline:
                    for i in range(BURST):
                        injector.send(frames[i % len(frames)])
                    sent += BURST
                    # Pacing: a burst every few ms keeps the tap's queues from overflowing
                    # (and lets the records be read meanwhile).
                    await asyncio.sleep(BURST_GAP)
            rx = await _rx_packets(guest.agent) - rx_before
            await recorder.wait_for(rx, timeout=30)
            await recorder.wait_quiet(30)
            first, last = recorder.first_at, recorder.last_at
        finally:
            await recorder.stop()
        parser = recorder.parser
        elapsed = (last or 0.0) - (first or 0.0)
        return {
            "benchmark": "recorder",
            "qemu_version": qemu.version_text,
            "guest_kernel": guest.kernel_release,
            "queues": args.queues,
            "frames_sent": sent,
            "guest_rx_packets": rx,
            "records": parser.records,
            "records_per_s": round(parser.records / elapsed, 1) if elapsed > 0 else None,
            "stream_s": round(elapsed, 3),
            "kernel_buffer_lost": parser.lost,
            "kernel_buffer_lost_unknown": parser.lost_unknown,
            "seq_gaps": parser.seq_gaps,
            "bad_lines": parser.bad_lines,
        }


def run(args: argparse.Namespace) -> dict[str, object]:
    return asyncio.run(_run(args))
