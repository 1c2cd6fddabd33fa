"""Guest test bed: boot-to-ready time and frames checked per second in a real guest.

Boots the test guest (QEMU TCG, virtio-net with RSS and hash reports), sets a key and
table with ethtool, then repeats rounds of: inject a batch of every frame class, read
the guest's records, compare with the reference model. "Checked" counts frames whose
guest record was compared; mismatches are reported, not hidden.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from vnetbackend.choices import add_platform_options
from vnetbackend.qemu.departures import departures_for
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.testbed.batch import guest_verdicts, mismatches, observe_batch
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import GuestOptions, boot_guest
from vnetbackend.testbed.injector import silence_host_stack
from vnetbackend.testbed.observer import RxObserver
from vnetbackend.testbed.platform import Platform
from vnetbackend.testbed.traffic import FRAME_CLASSES, make_batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queues", type=int, default=4, help="queue pairs (default: 4)")
    parser.add_argument("--rounds", type=int, default=5, help="batches (default: 5)")
    parser.add_argument("--per-class", type=int, default=10,
                        help=f"frames per class and batch ({len(FRAME_CLASSES)} classes; "
                             "default: %(default)s)")
    add_platform_options(parser, guest=True)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    qemu, image = await Platform.from_args(args).resolve()
    async with boot_guest(GuestOptions(queues=args.queues, qemu=qemu.binary,
                                       image=image)) as guest:
        silence_host_stack(guest.tap_name)
        rss = GuestRss(guest.agent)
        await rss.enable_rxhash()
        await rss.set_rxfh(MICROSOFT_KEY, equal=args.queues)
        observer = RxObserver(guest.agent)
        await observer.start()
        config = await rss.read_config()
        checked = mismatched = 0
        batch_seconds = []
        for round_ in range(args.rounds):
            probes = make_batch(guest.mac, per_class=args.per_class, seed=round_)
            start = time.perf_counter()
            records = await observe_batch(guest.tap_name, observer, probes)
            failed = mismatches(guest_verdicts(config, probes, records,
                                              departures_for(guest.qemu_version)))
            batch_seconds.append(time.perf_counter() - start)
            checked += len(probes)
            mismatched += len(failed)
        elapsed = sum(batch_seconds)
        return {
            "benchmark": "guest",
            "qemu_version": qemu.version_text,
            "guest_kernel": guest.kernel_release,
            "queues": args.queues,
            "boot_to_ready_s": round(guest.boot_seconds, 2),
            "frames_checked": checked,
            "frames_mismatched": mismatched,
            "frames_checked_per_s": round(checked / elapsed, 1),
            "batch_frames": checked // args.rounds,
            "batch_s": [round(s, 3) for s in batch_seconds],
        }


def run(args: argparse.Namespace) -> dict[str, object]:
    return asyncio.run(_run(args))
