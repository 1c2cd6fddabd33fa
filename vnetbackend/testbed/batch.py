"""One round: inject a batch into the tap, collect the guest's records of it, compare."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from vnetbackend.rss import RssConfig
from vnetbackend.testbed.check import Mismatch, compare
from vnetbackend.testbed.injector import Injector
from vnetbackend.testbed.observer import RxObserver, RxRecord
from vnetbackend.testbed.traffic import Probe

POLL_INTERVAL = 0.05


async def observe_batch(tap_name: str, observer: RxObserver, probes: Sequence[Probe],
                        timeout: float = 15.0) -> list[RxRecord]:
    """Send *probes* into the tap; the guest's records once every probe was seen once.

    Frames reach the guest asynchronously, so the trace is read until each probe's
    (length, ethertype) appears, or *timeout* passes (then whatever arrived is returned
    and the comparison reports the missing frames). The trace is cleared before and after.
    """
    await observer.clear()
    with Injector(tap_name) as injector:
        injector.send_all(probe.frame for probe in probes)
    wanted = {(p.l3_len, p.ethertype) for p in probes}
    deadline = time.monotonic() + timeout
    while True:
        records = await observer.collect(clear=False)
        if wanted <= {(r.l3_len, r.protocol) for r in records} or time.monotonic() > deadline:
            await observer.clear()
            return records
        await asyncio.sleep(POLL_INTERVAL)


async def check_batch(tap_name: str, observer: RxObserver, config: RssConfig,
                      probes: Sequence[Probe]) -> list[Mismatch]:
    """Inject, observe and compare with the model under *config*; the mismatches."""
    records = await observe_batch(tap_name, observer, probes)
    return compare(config, probes, records)


def report(config: RssConfig, mismatches: Sequence[Mismatch], limit: int = 20) -> str:
    """A readable list of the first *limit* mismatches."""
    lines = [f"{len(mismatches)} frames disagree:"]
    lines += [m.describe(config) for m in mismatches[:limit]]
    return "\n".join(lines)
